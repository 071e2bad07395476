"""Training throughput: stoker's trainer against a plain PyTorch loop on the same model and batch.

    python benchmarks/train_throughput.py --preset mini --dtype bf16 --nproc 1

The plain loop is the model, AdamW and gradient clipping written out directly (no config,
loader, checkpointing or metrics): the ratio stoker / plain is stoker's overhead. The two
are run alternately, `--repeats` times each, in the same script; each figure comes from the
fastest step after warm-up: on a shared machine noise only ever adds time, so the minimum is
the steadiest estimate of what a step costs. Prints a table and writes JSON (default runs/bench/train_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stoker.models.gpt import GPT, GPTConfig, flops_per_token, loss_fn
from stoker.train.metrics import peak_flops

VOCAB = 8192
WARMUP = 2  # steps left out of the median: first-call kernel selection and allocations


def synthetic_data(root: Path, tokens: int = 2_000_000) -> Path:
    """A data directory of uniform random tokens in stoker's format: throughput does not depend
    on what the tokens say, and the benchmark then needs no corpus."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 20)):
        rng.integers(0, VOCAB, n, dtype=np.uint16).tofile(d / f"{split}_00000.bin")
    meta = {"vocab_size": VOCAB, "dtype": "uint16", "eot_id": 0,
            "splits": {s: {"shards": [f"{s}_00000.bin"]} for s in ("train", "val")}}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "tokenizer.json").write_text("{}")  # copied into the run directory, never read here
    return d


def plain_worker(args: argparse.Namespace) -> None:
    """The baseline: one process, or one rank under torchrun with DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, vocab_size=VOCAB, block_size=args.seq_len)
    model = GPT(cfg)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    local = args.batch_size // world
    x = torch.randint(0, VOCAB, (local, args.seq_len + 1))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = loss_fn(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"step_times": times}))


def run_plain(args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--plain-worker", f"--preset={args.preset}", f"--dtype={args.dtype}",
           f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}", f"--steps={args.steps}"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", *cmd[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    times = json.loads(out.strip().splitlines()[-1])["step_times"][WARMUP:]
    return args.batch_size * args.seq_len / min(times)


def run_stoker(args: argparse.Namespace, data: Path, root: Path) -> float:
    out = root / f"run_{time.time_ns()}"
    cmd = [sys.executable, "-m", "stoker", "train", f"--model.preset={args.preset}", f"--data.dir={data}",
           f"--train.out_dir={out}", f"--train.steps={args.steps}", f"--train.batch_size={args.batch_size}",
           f"--train.seq_len={args.seq_len}", f"--train.dtype={args.dtype}", "--train.eval_every=0",
           "--train.eval_batches=1", "--train.ckpt_every=0", "--train.progress=false", f"--nproc={args.nproc}"]
    if args.nproc > 1:
        cmd.append(f"--parallel.dp_replicate={args.nproc}")
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in recs if "step_time_s" in r][WARMUP:]
    return args.batch_size * args.seq_len / min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench/train_throughput.json")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        return plain_worker(args)

    cfg = GPTConfig.from_preset(args.preset, vocab_size=VOCAB, block_size=args.seq_len)
    fpt = flops_per_token(cfg, args.seq_len)
    peak = peak_flops(torch.device("cpu"), args.dtype)
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp))
        for _ in range(args.repeats):  # alternate, so drifts in machine speed hit both alike
            plain.append(run_plain(args))
            ours.append(run_stoker(args, data, Path(tmp)))
    p_tps, s_tps = max(plain), max(ours)
    result = {
        "preset": args.preset, "params": sum(p.numel() for p in GPT(cfg).parameters()), "dtype": args.dtype,
        "nproc": args.nproc, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "peak_flops": peak, "flops_per_token": fpt,
        "plain": {"tokens_per_s": p_tps, "mfu": p_tps * fpt / peak, "runs": plain},
        "stoker": {"tokens_per_s": s_tps, "mfu": s_tps * fpt / peak, "runs": ours},
        "ratio": s_tps / p_tps,
    }
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.preset} ({result['params'] / 1e6:.1f}M), {args.dtype}, {args.nproc} proc, "
                    f"batch {args.batch_size}x{args.seq_len}, peak {peak / 1e12:.3f} TFLOP/s")
    for c in ("loop", "tokens/s", "MFU", "vs plain"):
        t.add_column(c, justify="right")
    t.add_row("plain PyTorch", f"{p_tps:,.0f}", f"{result['plain']['mfu']:.1%}", "1.00x")
    t.add_row("stoker train", f"{s_tps:,.0f}", f"{result['stoker']['mfu']:.1%}", f"{result['ratio']:.2f}x")
    Console().print(t)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
