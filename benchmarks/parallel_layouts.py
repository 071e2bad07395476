"""Memory per rank and throughput of each parallel layout, for one model size.

Runs `stoker train` per layout on the same data, model, global batch and seed, then reads
each run's layout.json (bytes of parameters, gradients and optimizer state per rank, peak
resident memory) and metrics.jsonl (tokens/s, loss). Bytes on the wire are measured on the
loopback interface (all ranks talk over it): each layout runs twice, for `--steps` and for
2 x `--steps` steps, and the difference divided by the extra steps and the ranks is what one
training step sends per rank, set-up and checkpointing cancelled out. Prints a table, writes
JSON and a plot. Throughput is reported against the single-process run, as a ratio.

    python benchmarks/parallel_layouts.py --preset tiny --steps 8 --out runs/bench/layouts

On a machine with fewer cores than processes the ranks share cores: the ratios then show
communication and scheduling overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from stoker.config import load_config

LAYOUTS = {
    "1 process": [],
    "DDP 2": ["--parallel.dp_replicate=2"],
    "FSDP 2": ["--parallel.dp_shard=2"],
    "TP 2": ["--parallel.tp=2"],
    "PP 2 (1f1b)": ["--parallel.pp=2", "--parallel.pp_schedule=1f1b"],
    "HSDP 2x2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
    "FSDP 2 x TP 2": ["--parallel.dp_shard=2", "--parallel.tp=2"],
    "PP 2 x FSDP 2": ["--parallel.pp=2", "--parallel.dp_shard=2"],
    "TP 2 x PP 2": ["--parallel.tp=2", "--parallel.pp=2"],
}


def nproc(args: list[str]) -> int:
    return load_config(overrides=args).parallel.world


def ensure_data(path: Path) -> Path:
    if (path / "meta.json").is_file():
        return path
    from stoker.data.prepare import default_sources, prepare

    stdlib = default_sources()[0]
    prepare([stdlib / d for d in ("json", "email", "asyncio", "unittest", "http")], path, vocab_size=8192,
            progress=False)
    return path


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (Linux)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])  # transmit bytes
    return 0


def _train(name: str, args: list[str], common: list[str], steps: int, run_dir: Path) -> int:
    """One run; returns the loopback bytes it sent."""
    n = nproc(args)
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // n)))
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "stoker", "train", *common, *args, f"--train.steps={steps}",
           f"--train.out_dir={run_dir}", f"--nproc={n}"]
    before = loopback_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sent = loopback_bytes() - before
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return sent


def run_layout(name: str, args: list[str], common: list[str], steps: int, out: Path) -> dict:
    n = nproc(args)
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    short = _train(name, args, common, steps, run_dir)
    long = _train(name, args, common, 2 * steps, run_dir)
    layout = json.loads((run_dir / "layout.json").read_text())
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    warm = [r["tokens_per_s"] for r in recs[2:]] or [recs[-1]["tokens_per_s"]]
    ranks = layout["per_rank"]
    return {
        "layout": name, "processes": n, "tokens_per_s": statistics.median(warm),
        "wire_mb_per_step_per_rank": max(0, long - short) / steps / n / 2**20 if n > 1 else 0.0,
        "final_loss": recs[-1]["loss"],
        "params_mb_max": max(r["params"] for r in ranks) / 2**20,
        "state_mb_max": max(r["params"] + r["grads"] + r["optimizer"] for r in ranks) / 2**20,
        "peak_rss_mb_max": max(r["peak_rss"] for r in ranks) / 2**20,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    columns = [("state_mb_max", "model state per rank, MiB\n(params + grads + AdamW)", "tab:blue"),
               ("wire_mb_per_step_per_rank", "sent per step per rank, MiB", "tab:green"),
               ("tokens_per_s", "tokens/s (all ranks together)", "tab:orange")]
    for i, (ax, (key, label, color)) in enumerate(zip(axes, columns)):
        ax.barh(names, [r[key] for r in rows], color=color)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        if i:
            ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", default="runs/bench/layout_data", help="a prepared data dir (made if missing)")
    p.add_argument("--out", default="runs/bench/layouts")
    p.add_argument("--only", nargs="*", help="layout names to run (default: all)")
    p.add_argument("--plot", default=None, help="also save the plot here (default: OUT/layouts.png)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_data(Path(a.data))
    common = [f"--model.preset={a.preset}", f"--data.dir={data}",
              f"--train.batch_size={a.batch_size}", f"--train.seq_len={a.seq_len}", "--train.eval_every=0",
              "--train.eval_batches=1", "--train.ckpt_every=0", "--train.progress=false"]
    rows = []
    for name, args in LAYOUTS.items():
        if a.only and name not in a.only:
            continue
        rows.append(run_layout(name, args, common, a.steps, out))
        print(f"done: {name}", flush=True)
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    print(f"\npreset {a.preset}, batch {a.batch_size} x {a.seq_len} tokens, {2 * a.steps} steps, "
          f"{os.cpu_count()} cores\n")
    print("| layout | processes | params / rank (MiB) | params+grads+AdamW / rank (MiB) | peak RSS / rank (MiB) "
          "| sent / step / rank (MiB) | tokens/s | vs 1 process | final loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['layout']} | {r['processes']} | {r['params_mb_max']:.1f} | {r['state_mb_max']:.1f} | "
              f"{r['peak_rss_mb_max']:.0f} | {r['wire_mb_per_step_per_rank']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['final_loss']:.4f} |")
    (out / "layouts.json").write_text(json.dumps({"preset": a.preset, "rows": rows}, indent=1))
    plot(rows, Path(a.plot) if a.plot else out / "layouts.png")


if __name__ == "__main__":
    main()
