"""Training throughput: stoker's trainer against a plain PyTorch loop on the same model and batch.

    python benchmarks/train_throughput.py --preset mini --dtype bf16 --nproc 1

The plain loop is the model, AdamW and gradient clipping written out directly (no config,
loader, checkpointing or metrics): the ratio stoker / plain is stoker's overhead. With
`--baseline nanogpt` the loop runs nanoGPT's model shape instead (fused q/k/v, exact GELU,
written in this file) and, with `--compile`, compiles it whole as nanoGPT does: the ratio is
then stoker against the well-known way to train the same shape. The two
are measured in the same script in two ways, `--repeats` rounds each:
- sequentially, each alone with every core: tokens/s and MFU from the fastest step after
  warm-up (on a shared machine noise only ever adds time);
- paired (one process only): both at once, each pinned to its own core with one thread, so
  that the machine's drift (whole runs here vary by +-20%) hits both alike; the cores are
  swapped each round. The stoker/plain ratio comes from these, as a geometric mean. Prints a table and writes JSON (default runs/bench/train_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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

WARMUP = 2  # steps left out of the median: first-call kernel selection and allocations


def synthetic_data(root: Path, vocab: int, tokens: int = 2_000_000) -> Path:
    """A data directory of uniform random tokens in stoker's format: throughput does not depend
    on what the tokens say, and the benchmark then needs no corpus."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 20)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(d / f"{split}_00000.bin")
    sizes = {"train": tokens, "val": tokens // 20}
    meta = {"vocab_size": vocab, "dtype": "uint16", "eot_id": 0,
            "splits": {s: {"shards": [f"{s}_00000.bin"], "tokens": n, "shard_tokens": [n]} for s, n in sizes.items()}}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "tokenizer.json").write_text("{}")  # copied into the run directory, never read here
    return d


class NanoBlock(torch.nn.Module):
    """nanoGPT's block, written here: fused q/k/v (c_attn), exact GELU, LayerNorm with bias."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.c_attn, self.c_proj = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
        self.c_fc, self.mlp_proj = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(torch.nn.Module):
    """nanoGPT's model shape (Karpathy's model.py), for the baseline: tied head, learned positions."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = torch.nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = torch.nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = torch.nn.ModuleList(NanoBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = torch.nn.LayerNorm(cfg.n_embd)
        self.lm_head = torch.nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight")
                                      else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def plain_worker(args: argparse.Namespace) -> None:
    """The baseline: one process, or one rank under torchrun with DDP. `--baseline plain` is
    stoker's model in a bare loop; `nanogpt` is nanoGPT's model shape and loop, compiled whole
    with `--compile` as nanoGPT does (stoker's model compiles block by block)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, vocab_size=args.vocab, block_size=args.seq_len)
    if args.baseline == "nanogpt":
        model = NanoGPT(cfg)
        if args.compile:
            model = torch.compile(model)
    else:
        model = GPT(cfg)
        if args.compile:
            from stoker.parallel.parallelize import apply_compile

            apply_compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    local = args.batch_size // world
    x = torch.randint(0, args.vocab, (local, args.seq_len + 1))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            if args.baseline == "nanogpt":  # nanoGPT's loss: cross entropy over the whole batch's logits
                loss = loss_fn(model(x[:, :-1]), x[:, 1:])
            else:
                loss = model(x[:, :-1], x[:, 1:])
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


def _plain_cmd(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, __file__, "--plain-worker", f"--preset={args.preset}", f"--dtype={args.dtype}",
           f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}", f"--steps={args.steps}", f"--vocab={args.vocab}",
           f"--baseline={args.baseline}"] + (["--compile"] if args.compile else [])
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", *cmd[1:]]
    return cmd


def _stoker_cmd(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "stoker", "train", f"--model.preset={args.preset}", f"--data.dir={data}",
           f"--train.out_dir={out}", f"--train.steps={args.steps}", f"--train.batch_size={args.batch_size}",
           f"--train.seq_len={args.seq_len}", f"--train.dtype={args.dtype}", "--train.eval_every=0",
           "--train.eval_batches=1", "--train.ckpt_every=0", "--train.progress=false", f"--nproc={args.nproc}",
           f"--train.compile={'true' if args.compile else 'false'}"]
    if args.nproc > 1:
        cmd.append(f"--parallel.dp_replicate={args.nproc}")
    return cmd


def _start(cmd: list[str], cpu: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if cpu is not None:  # one core, one thread
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(proc.args)} failed:\n{err[-2000:]}")
    return out


def _plain_times(out: str) -> list[float]:
    return json.loads(out.strip().splitlines()[-1])["step_times"][WARMUP:]


def _stoker_times(out: Path) -> list[float]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs if "step_time_s" in r][WARMUP:]


def sequential(args: argparse.Namespace, data: Path, root: Path) -> tuple[float, float]:
    """Each loop alone with every core; the fastest step of each, in tokens/s."""
    tokens = args.batch_size * args.seq_len
    plain = _plain_times(_finish(_start(_plain_cmd(args), None)))
    out = root / f"run_{time.time_ns()}"
    _finish(_start(_stoker_cmd(args, data, out), None))
    return tokens / min(plain), tokens / min(_stoker_times(out))


def paired(args: argparse.Namespace, data: Path, root: Path, plain_cpu: int, stoker_cpu: int) -> float:
    """Both loops at once, one core and one thread each: whatever else the machine does at that
    moment slows both alike. Returns stoker / plain from their median steps."""
    out = root / f"run_{time.time_ns()}"
    a = _start(_plain_cmd(args), plain_cpu)
    b = _start(_stoker_cmd(args, data, out), stoker_cpu)
    plain = _plain_times(_finish(a))
    _finish(b)
    return statistics.median(plain) / statistics.median(_stoker_times(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (up to 65536: the data is uint16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="steps per run, the first two left out as warm-up")
    p.add_argument("--repeats", type=int, default=2, help="rounds of each measurement")
    p.add_argument("--baseline", default="plain", choices=("plain", "nanogpt"),
                   help="plain: stoker's model in a bare loop (stoker's overhead); nanogpt: nanoGPT's model and loop")
    p.add_argument("--compile", action="store_true", help="torch.compile both (nanoGPT whole-model, stoker per block)")
    p.add_argument("--out", default="runs/bench/train_throughput.json")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        return plain_worker(args)

    cfg = GPTConfig.from_preset(args.preset, vocab_size=args.vocab, block_size=args.seq_len)
    fpt = flops_per_token(cfg, args.seq_len)
    peak = peak_flops(torch.device("cpu"), args.dtype)
    plain, ours, pairs = [], [], []
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), args.vocab)
        for i in range(args.repeats):
            p_tps, s_tps = sequential(args, data, Path(tmp))
            plain.append(p_tps)
            ours.append(s_tps)
            if args.nproc == 1 and len(cpus) >= 2:  # swap the cores each round: cancels any core's own bias
                pairs.append(paired(args, data, Path(tmp), cpus[i % 2], cpus[1 - i % 2]))
    p_tps, s_tps = max(plain), max(ours)
    # The ratio: from the paired runs where there are some (steadier), else from the sequential ones.
    ratio = math.exp(statistics.mean(math.log(r) for r in pairs)) if pairs else s_tps / p_tps
    result = {
        "preset": args.preset, "vocab": args.vocab, "params": sum(p.numel() for p in GPT(cfg).parameters()), "dtype": args.dtype,
        "baseline": args.baseline, "compile": args.compile,
        "nproc": args.nproc, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "peak_flops": peak, "flops_per_token": fpt,
        "plain": {"tokens_per_s": p_tps, "mfu": p_tps * fpt / peak, "runs": plain},
        "stoker": {"tokens_per_s": s_tps, "mfu": s_tps * fpt / peak, "runs": ours},
        "ratio": ratio, "ratio_source": "paired" if pairs else "sequential", "paired_ratios": pairs,
    }
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.preset} ({result['params'] / 1e6:.1f}M), {args.dtype}, {args.nproc} proc, "
                    f"batch {args.batch_size}x{args.seq_len}, peak {peak / 1e12:.3f} TFLOP/s")
    for c in ("loop", "tokens/s", "MFU", "vs baseline"):
        t.add_column(c, justify="right")
    t.add_row("nanoGPT-shaped loop" if args.baseline == "nanogpt" else "plain PyTorch", f"{p_tps:,.0f}",
              f"{result['plain']['mfu']:.1%}", "1.00x")
    t.add_row("stoker train", f"{s_tps:,.0f}", f"{result['stoker']['mfu']:.1%}",
              f"{ratio:.3f}x ({result['ratio_source']})")
    Console().print(t)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
