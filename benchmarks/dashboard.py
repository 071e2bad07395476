"""How the dashboard copes with long runs: the metrics API and the run page in headless Chromium,
for a run of --steps logged steps against a 1,000-step run (the baseline), in one process.

    python benchmarks/dashboard.py [--steps 100000] [--runs 20] [--out benchmarks/results/dashboard.json]

Measures: the first load of a run's metrics (parse + JSON), a repeated load (cached), a poll with
100 new lines, the runs table over --runs runs, and the page's time to draw its charts (when
Chromium is installed: Debian's `chromium`)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from stoker.dashboard import Settings, create_app
from stoker.serve.server import BackgroundServer


def fake_run(path: Path, steps: int, eval_every: int = 100) -> None:
    """A run directory as `stoker train` leaves it: config, model, layout, metrics."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'[model]\npreset = "debug"\n[train]\nsteps = {steps + 100}\nbatch_size = 8\nseq_len = 64\n')
    (path / "model.json").write_text(json.dumps({"n_layer": 4, "n_embd": 32, "n_head": 4, "vocab_size": 512, "block_size": 64}))
    (path / "layout.json").write_text(json.dumps({"layout": "single process", "world": 1, "per_rank": [
        {"params": 277248, "grads": 277248, "optimizer": 554496, "peak_rss": 345645056}]}))
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            loss = 6 * math.exp(-s / (steps / 3)) + 2 + 0.1 * math.sin(s)
            f.write(json.dumps({"step": s, "loss": loss, "lr": 3e-3, "grad_norm": 1.0, "tokens_per_s": 30000.0 + s % 97,
                                "mfu": 0.1, "step_time_s": 0.015}) + "\n")
            if s % eval_every == 0:
                f.write(json.dumps({"step": s, "val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1)}) + "\n")


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def api_figures(c: TestClient, name: str, path: Path) -> dict:
    from stoker.runs import _PARSED

    def first():
        _PARSED.clear()
        return c.get(f"/api/runs/{name}/metrics")

    t_first, r = timed(first)
    t_cached, _ = timed(lambda: c.get(f"/api/runs/{name}/metrics"))
    m = r.json()
    last = m["train"]["step"][-1]
    with open(path / "metrics.jsonl", "a") as f:
        for s in range(last + 1, last + 101):
            f.write(json.dumps({"step": s, "loss": 2.0}) + "\n")
    t_poll, p = timed(lambda: c.get(f"/api/runs/{name}/metrics?offset={m['offset']}&inode={m['inode']}"))
    assert len(p.json()["train"]["step"]) == 100
    return {"metrics_first_s": t_first, "metrics_cached_s": t_cached, "poll_100_lines_s": t_poll,
            "metrics_bytes": len(r.content), "points": len(m["train"]["step"])}


def page_figures(url: str, name: str, profile: Path) -> dict | None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from dashboard import browser

    if browser.find() is None:
        return None
    b = browser.Browser(profile)
    try:
        times = []
        for _ in range(3):
            b.goto(url + "/")
            t = time.perf_counter()
            b.eval(f"location.hash = '#/runs/{name}'; true")
            b.wait_for("+document.querySelector('#loss-chart')?.getAttribute('data-points') > 0", timeout=120)
            times.append(time.perf_counter() - t)
        drawn = int(b.eval("+document.querySelector('#loss-chart').getAttribute('data-points')"))
        return {"page_draw_s": statistics.median(times), "points_drawn": drawn}
    finally:
        b.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000, help="logged steps of the long run (default 100000)")
    ap.add_argument("--runs", type=int, default=20, help="runs in the table, 10,000 steps each (default 20)")
    ap.add_argument("--out", default="benchmarks/results/dashboard.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stoker-dash-"))
    try:
        root = tmp / "runs"
        fake_run(root / "base", 1000)
        fake_run(root / "long", args.steps)
        for i in range(args.runs):
            fake_run(root / "team" / f"r{i:02d}", 10_000)
        c = TestClient(create_app(Settings(root, jobs_home=tmp / "jobs")), base_url="http://127.0.0.1")
        res = {"steps": args.steps, "runs": args.runs + 2}
        res["base"], res["long"] = api_figures(c, "base", root / "base"), api_figures(c, "long", root / "long")
        from stoker.runs import _PARSED

        def table():
            _PARSED.clear()
            return c.get("/api/runs")

        res["runs_table_s"], rows = timed(table, repeat=3)
        res["runs_table_cached_s"], _ = timed(lambda: c.get("/api/runs"), repeat=3)
        assert len(rows.json()) == args.runs + 2
        with BackgroundServer(create_app(Settings(root, jobs_home=tmp / "jobs"))) as url:
            for k in ("base", "long"):
                page = page_figures(url, k, tmp / "chromium")
                if page:
                    res[k].update(page)
    finally:
        shutil.rmtree(tmp)
    b, lg = res["base"], res["long"]
    rows = [("metrics, first load", "metrics_first_s"), ("metrics, unchanged file", "metrics_cached_s"),
            ("poll, 100 new lines", "poll_100_lines_s")] + ([("page: charts drawn", "page_draw_s")] if "page_draw_s" in lg else [])
    print(f"{'':28} {'1,000 steps':>12} {f'{args.steps:,} steps':>14} {'ratio':>7}")
    for label, k in rows:
        print(f"{label:28} {b[k] * 1000:10.1f} ms {lg[k] * 1000:12.1f} ms {lg[k] / b[k]:6.1f}x")
    print(f"{'metrics JSON':28} {b['metrics_bytes'] / 1e6:9.2f} MB {lg['metrics_bytes'] / 1e6:11.2f} MB")
    if "points_drawn" in lg:
        print(f"{'loss points drawn':28} {b['points_drawn']:12,} {lg['points_drawn']:14,}")
    print(f"runs table, {res['runs']} runs: {res['runs_table_s'] * 1000:.0f} ms (files parsed), "
          f"{res['runs_table_cached_s'] * 1000:.0f} ms (unchanged)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
