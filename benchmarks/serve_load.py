"""Load test of `stoker serve`: continuous batching against one-request-at-a-time serving.

Starts two servers on the same run directory, one with --max-batch 1 (the unbatched baseline)
and one with --max-batch B, each in its own process, and sends N concurrent streaming
completions over HTTP from this process (N = 1, 8, 32). For each N the baseline and the batched
server are measured back to back, so the ratio holds on a noisy machine. Reports generated
tokens/s, time to first token, latency p50/p99 and batched/unbatched throughput; prints a table
and writes JSON.

    python benchmarks/serve_load.py                      # trains a `mini` model for a few steps first
    python benchmarks/serve_load.py --run runs/mine --max-tokens 64 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROMPT_SOURCE = Path(json.__file__)  # real text every Python has; each request takes a different slice


def ensure_run(run: Path, data: Path, steps: int) -> None:
    from stoker.train.checkpoint import latest_checkpoint

    if latest_checkpoint(run) is not None:
        return
    if not (data / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "stoker", "prepare", "--out", str(data)], check=True)
    # Throughput does not depend on how well the weights are trained: a few steps give a checkpoint.
    subprocess.run([sys.executable, "-m", "stoker", "train", "--model.preset=mini", f"--data.dir={data}",
                    f"--train.steps={steps}", "--train.batch_size=4", "--train.seq_len=256", "--train.warmup_steps=1",
                    "--train.eval_every=0", "--train.progress=false", f"--train.out_dir={run}"], check=True)


def start_server(run: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "stoker", "serve", str(run), "--port", "0", "--max-batch",
                             str(max_batch), "--max-queue", "1024", "--kv-budget-mb", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    m = re.search(r"on (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, m.group(1)


def one_request(url: str, prompt: str, max_tokens: int, seed: int, out: list, i: int) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    out[i] = {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "tokens": tokens}


def _p99(n: int) -> int:
    """Index of the 99th percentile by nearest rank: with up to 100 requests, the slowest one."""
    return min(n - 1, math.ceil(0.99 * n) - 1)


def load(url: str, prompts: list[str], max_tokens: int) -> dict:
    results: list = [None] * len(prompts)
    threads = [threading.Thread(target=one_request, args=(url, p, max_tokens, i, results, i)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in results),
        "ttft_p99_s": sorted(r["ttft_s"] for r in results)[_p99(len(results))],
        "latency_p50_s": statistics.median(lat),
        "latency_p99_s": lat[_p99(len(lat))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench/serve-mini"), help="run directory to serve "
                    "(trained here as preset mini for --train-steps steps when it holds no checkpoint)")
    ap.add_argument("--data", type=Path, default=Path("data/stdlib"), help="prepared data for that training")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="about this many tokens per prompt")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per setting; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve_load.json"))
    args = ap.parse_args()

    ensure_run(args.run, args.data, args.train_steps)
    text = PROMPT_SOURCE.read_text()
    chars = args.prompt_tokens * 3  # ~3.6 bytes per token on Python source
    prompts = [text[i * chars: (i + 1) * chars] for i in range(max(args.concurrency))]
    servers = {"unbatched": start_server(args.run, 1, args.threads),
               "batched": start_server(args.run, args.max_batch, args.threads)}
    rows = []
    try:
        for _, url in servers.values():
            load(url, prompts[:2], args.max_tokens)  # load the model, warm up
        for n in args.concurrency:
            for mode, (_, url) in servers.items():
                # The best of a few rounds: other work on the machine only ever slows a round down.
                runs = [load(url, prompts[:n], args.max_tokens) for _ in range(args.rounds)]
                rows.append({"mode": mode, "concurrency": n, **max(runs, key=lambda r: r["tokens_per_s"])})
            rows[-1]["vs_unbatched"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    table = Table(title=f"serve load: {args.run}, {args.max_tokens} new tokens per request, "
                        f"{args.threads} thread(s) per server")
    for col in ("N", "server", "tokens/s", "TTFT p50", "latency p50", "latency p99", "vs unbatched"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["concurrency"]), r["mode"] if r["mode"] == "unbatched" else f"batched ({args.max_batch})",
                      f"{r['tokens_per_s']:,.0f}", f"{r['ttft_p50_s']:.2f} s", f"{r['latency_p50_s']:.2f} s",
                      f"{r['latency_p99_s']:.2f} s", f"{r['vs_unbatched']:.2f}x" if "vs_unbatched" in r else "1.00x")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
