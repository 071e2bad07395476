"""Load test of `stoker serve` against transformers `generate` and the machine's roofline.

On one model shape (default 12 x 768, GPT-2 small's, random weights after one training step),
in one run, with the same thread count:
- transformers `generate` on the same weights (exported with `stoker export --format hf`),
  static batches of 1 and B, greedy, every sequence made to run to max-tokens;
- `stoker serve --max-batch B`: N = 1 and N = B concurrent streaming requests (greedy), fresh
  prompts each round;
- the same B requests with a shared prompt prefix (a system prompt of --prefix-tokens), on a
  server with the prefix cache and on one without it;
- the roofline of a decode step: max(FLOPs / measured matmul peak, bytes / measured memory
  bandwidth), the bytes being the weights plus the keys and values read, at the batch's mean
  context; stoker's tokens/s as a share of it.
Each round runs every setting once, so that both sides of a ratio are measured minutes apart at
most (this shared machine's speed drifts); each setting's fastest round is reported, and every
round's own ratios beside them.

    python benchmarks/serve_load.py                 # trains the model for one step first; --dtype auto
    python benchmarks/serve_load.py --threads 2 --dtype fp32 --out runs/bench/serve_fp32.json
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
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

STDLIB = Path(json.__file__).parent.parent  # real text every Python has; each request takes a different slice


def source_text(chars: int = 1_500_000) -> str:
    text, parts = 0, []
    for f in sorted(STDLIB.glob("*.py")):
        parts.append(f.read_text(errors="replace"))
        text += len(parts[-1])
        if text >= chars:
            break
    return "".join(parts)


def ensure_run(run: Path, data: Path, preset: str, context: int) -> Path:
    """A run directory of `preset` (one training step: throughput does not depend on how well
    the weights are trained) and its transformers export beside it; returns the export."""
    from stoker.models.hf import export_hf
    from stoker.train.checkpoint import latest_checkpoint

    if latest_checkpoint(run) is None:
        if not (data / "meta.json").is_file():
            subprocess.run([sys.executable, "-m", "stoker", "prepare", "--out", str(data)], check=True)
        subprocess.run([sys.executable, "-m", "stoker", "train", f"--model.preset={preset}", f"--data.dir={data}",
                        "--train.steps=1", "--train.batch_size=1", f"--train.seq_len={context}",
                        "--train.warmup_steps=1", "--train.eval_every=0", "--train.eval_batches=1",
                        "--train.progress=false", f"--train.out_dir={run}"], check=True)
    hf = run.with_name(run.name + "-hf")
    if not (hf / "config.json").is_file():
        export_hf(run, hf)
    return hf


def start_server(run: Path, max_batch: int, threads: int, dtype: str, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "stoker", "serve", str(run), "--port", "0", "--max-batch",
                             str(max_batch), "--max-queue", "1024", "--kv-budget-mb", "4096", "--dtype", dtype, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    m = re.search(r"on (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, m.group(1)


def one_request(url: str, prompt: str, max_tokens: int, out: list, i: int, model: str | None = None) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
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


def load(url: str, prompts: list[str], max_tokens: int, models: list[str] | None = None) -> dict:
    """Every prompt at once, streaming (request i asks for models[i], or the first model)."""
    results: list = [None] * len(prompts)
    threads = [threading.Thread(target=one_request, args=(url, p, max_tokens, results, i, models and models[i]))
               for i, p in enumerate(prompts)]
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


def hf_generate(model, prompts: list[list[int]], max_tokens: int) -> dict:
    """transformers `generate`, one static batch, greedy, every row run to max_tokens; prompts
    left-padded as its decoder-only models expect."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t0
    tokens = (out.size(1) - width) * len(prompts)
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def roofline(cfg, batch: int, context: float, dtype: str, threads: int) -> dict:
    """Tokens/s a decode step of `batch` rows at mean `context` could reach on this machine:
    FLOPs against the measured matmul peak, bytes (weights, then each row's keys and values)
    against the measured memory bandwidth, whichever takes longer."""
    import torch

    from stoker.models.gpt import count_params
    from stoker.train.metrics import measure_matmul_flops

    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.set_num_threads(threads)
    peak = measure_matmul_flops(tdtype)
    src = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB: far beyond any cache
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    bandwidth = 2 * src.nbytes / best  # read and write
    n = count_params(cfg) - (cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0)
    size = tdtype.itemsize
    kv_per_token = cfg.n_layer * 2 * cfg.kv_heads * cfg.head_dim * size
    flops = batch * (2 * n + 4 * cfg.n_layer * context * cfg.n_embd)
    nbytes = n * size + batch * context * kv_per_token
    step = max(flops / peak, nbytes / bandwidth)
    return {"peak_flops": peak, "bandwidth_bytes_s": bandwidth, "step_flops": flops, "step_bytes": nbytes,
            "bound": "compute" if flops / peak > nbytes / bandwidth else "memory", "tokens_per_s": batch / step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench/serve-125m"), help="run directory to serve "
                    "(trained here for one step of --preset when it holds no checkpoint)")
    ap.add_argument("--preset", default="gpt3-125m", help="the model's shape (default 12 x 768)")
    ap.add_argument("--context", type=int, default=512, help="the model's context")
    ap.add_argument("--data", type=Path, default=Path("data/stdlib"), help="prepared data for that training step")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch, and the static batch")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="about this many tokens per prompt")
    ap.add_argument("--prefix-tokens", type=int, default=200, help="the shared prefix of the prefix workload")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every setting once, and each "
                    "setting's fastest round is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server and of transformers")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="weights and cache, both sides; auto (default): what `stoker serve` picks on this machine "
                         "(transformers then runs it too, and fp32, its own default, when that differs)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve_load.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from stoker.data.tokenizer import Tokenizer
    from stoker.models.gpt import GPTConfig

    hf_dir = ensure_run(args.run, args.data, args.preset, args.context)
    if args.dtype == "auto":
        from stoker.serve.server import serve_dtype

        torch.set_num_threads(args.threads)
        args.dtype = serve_dtype("auto", args.max_batch)
        print(f"--dtype auto: stoker serve picks {args.dtype} here", flush=True)
    tok = Tokenizer.load(args.run)
    cfg = GPTConfig(**json.loads((args.run / "model.json").read_text()))
    text = source_text()
    B = args.max_batch

    def prompts(n: int, round_: int, tokens: int, prefix: str = "") -> list[str]:
        """n different prompts of about `tokens` tokens, fresh for each round: nothing is cached from before."""
        chars, base = tokens * 3, 200_000 + round_ * n * tokens * 3  # ~3.6 bytes per token on Python source
        assert base + (n + 1) * chars < len(text), "not enough text for fresh prompts"
        return [prefix + text[base + i * chars: base + (i + 1) * chars] for i in range(n)]

    # Every setting once per round, the rounds one after another, so that a change in this
    # shared machine's speed during the run reaches both sides of each ratio alike (measuring
    # one side's rounds, then the other's, moved the ratios by up to 2x here).
    settings: dict[str, tuple[str, Callable[[int], dict]]] = {}
    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    hf32 = hf if args.dtype == "fp32" else AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    ids = lambda ps: [tok.encode(p) for p in ps]  # noqa: E731
    # and, serving bf16, the plain loop as a newcomer runs it: fp32, transformers' default
    models = [("", "", hf)] + ([("_fp32", ", fp32", hf32)] if hf32 is not hf else [])
    for suffix, label, model in models:
        hf_generate(model, ids(prompts(2, 99, args.prompt_tokens)), 4)  # warm-up
        for n, key in ((1, "1"), (B, "B")):
            settings[f"hf_{key}{suffix}"] = (
                f"transformers generate, batch {n}{label}",
                lambda r, n=n, model=model: hf_generate(model, ids(prompts(n, r, args.prompt_tokens)), args.max_tokens))

    shared = text[100_000: 100_000 + args.prefix_tokens * 3]
    servers = {"cached": start_server(args.run, B, args.threads, args.dtype),
               "uncached": start_server(args.run, B, args.threads, args.dtype, "--prefix-cache-mb", "0")}
    url = servers["cached"][1]
    settings["stoker_1"] = (f"stoker serve --max-batch {B}, 1 request",
                            lambda r: load(url, prompts(1, 10 + r, args.prompt_tokens), args.max_tokens))
    settings["stoker_B"] = (f"stoker serve --max-batch {B}, {B} concurrent",
                            lambda r: load(url, prompts(B, 20 + r, args.prompt_tokens), args.max_tokens))
    for mode, (_, u) in servers.items():
        settings[f"prefix_{mode}"] = (
            f"{B} concurrent, a shared {args.prefix_tokens}-token prefix, prefix cache {'on' if mode == 'cached' else 'off'}",
            lambda r, u=u: load(u, prompts(B, 30 + r, args.prompt_tokens, shared), args.max_tokens))
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    try:
        for _, u in servers.values():
            load(u, prompts(2, 98, 8), 4)  # load the model, warm up
        for r in range(args.rounds):
            for key, (label, fn) in settings.items():
                runs[key].append(fn(r))
                print(f"  round {r + 1}/{args.rounds}, {label}: {runs[key][-1]['tokens_per_s']:,.1f} tokens/s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    rows = {k: {"setting": settings[k][0], **max(v, key=lambda x: x["tokens_per_s"]),
                "rounds_tokens_per_s": [x["tokens_per_s"] for x in v]} for k, v in runs.items()}
    roof = roofline(cfg, B, args.prompt_tokens + args.max_tokens / 2, args.dtype, args.threads)
    pairs = {
        f"stoker {B} concurrent / transformers batch {B}": ("stoker_B", "hf_B"),
        "stoker 1 request / transformers batch 1": ("stoker_1", "hf_1"),
        **({f"stoker {B} concurrent / transformers batch {B} in fp32": ("stoker_B", "hf_B_fp32"),
            "stoker 1 request / transformers batch 1 in fp32": ("stoker_1", "hf_1_fp32")} if "hf_B_fp32" in rows else {}),
        "prefix cache on / off": ("prefix_cached", "prefix_uncached"),
    }
    # Best against best; and each round's own ratio (both sides measured minutes apart at most).
    ratios = {k: rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"] for k, (a, b) in pairs.items()}
    ratios[f"stoker {B} concurrent / roofline"] = rows["stoker_B"]["tokens_per_s"] / roof["tokens_per_s"]
    round_ratios = {k: [x / y for x, y in zip(rows[a]["rounds_tokens_per_s"], rows[b]["rounds_tokens_per_s"])]
                    for k, (a, b) in pairs.items()}
    table = Table(title=f"serve: {args.preset} ({cfg.n_layer} x {cfg.n_embd}), {args.dtype}, {args.threads} thread(s), "
                        f"{args.max_tokens} new tokens per request, prompts ~{args.prompt_tokens} tokens")
    for col in ("setting", "tokens/s", "TTFT p50", "latency p99"):
        table.add_column(col, justify="right")
    for r in rows.values():
        table.add_row(r["setting"], f"{r['tokens_per_s']:,.1f}", f"{r['ttft_p50_s']:.2f} s" if "ttft_p50_s" in r else "",
                      f"{r['latency_p99_s']:.2f} s" if "latency_p99_s" in r else "")
    table.add_row(f"roofline, batch {B} ({roof['bound']}-bound)", f"{roof['tokens_per_s']:,.1f}", "", "")
    Console().print(table)
    for k, v in ratios.items():
        each = f"  (rounds: {', '.join(f'{x:.2f}' for x in round_ratios[k])})" if k in round_ratios else ""
        print(f"{k}: {v:.2f}x{each}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "roofline": roof, "ratios": ratios,
                                    "round_ratios": round_ratios}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
