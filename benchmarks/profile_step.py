"""Where a training step's time goes: one process, the model and step stoker's trainer runs,
timed by phase (forward, loss, backward, gradient clipping, optimizer) and, inside them, by
operator kind from torch.profiler (matmuls, attention, the loss over the vocabulary, norms,
elementwise, the optimizer's kernels).

    python benchmarks/profile_step.py --preset mini --dtype fp32 --out benchmarks/results/profile_mini_fp32.json

The shares are of the median step's wall time; what no operator accounts for is Python and
framework overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stoker.models.gpt import GPT, GPTConfig, flops_per_token, loss_fn, set_attention
from stoker.train.metrics import fastest_attention, peak_flops

KINDS = [  # (kind, substrings of aten operator names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_sdpa", "aten::_softmax",
                   "_softmax_backward")),  # the matmul kernel's bmm counts as matmul, its softmax here
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax", "logsumexp")),
    ("norm", ("layer_norm", "rms_norm")),
    ("embedding", ("embedding",)),
    ("optimizer and clipping", ("adam", "_foreach", "linalg_vector_norm", "clip")),
    ("copy/cast", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "elementwise/other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6, help="timed steps after 2 of warm-up")
    ap.add_argument("--loss", default="chunked", choices=("chunked", "logits"),
                    help="chunked: the model's own loss (stoker train's); logits: loss_fn over the whole batch's logits")
    ap.add_argument("--attention", default="auto", choices=("auto", "sdpa", "matmul"),
                    help="attention kernel; auto: the faster, timed as stoker train does")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, vocab_size=args.vocab, block_size=args.seq_len)
    model = GPT(cfg)
    kernel = args.attention
    if kernel == "auto":
        kernel, _ = fastest_attention(args.batch_size, cfg.n_head, cfg.kv_heads, args.seq_len, cfg.head_dim,
                                      args.dtype, torch.device("cpu"))
    set_attention(model, kernel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext())
    phases = {k: [] for k in ("forward", "loss", "backward", "clip", "optimizer")}
    walls = []

    def step(record: bool) -> None:
        t = [time.perf_counter()]
        with autocast:
            if args.loss == "chunked":  # the head's gradients come in this forward: the loss phase is in it
                loss = model(x[:, :-1], x[:, 1:])
                t.append(time.perf_counter())
            else:
                logits = model(x[:, :-1])
                t.append(time.perf_counter())
                loss = loss_fn(logits, x[:, 1:])
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if record:
            for k, a, b in zip(phases, t, t[1:]):
                phases[k].append(b - a)
            walls.append(t[-1] - t[0])

    for _ in range(2):
        step(False)
    for _ in range(args.steps):
        step(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(False)
    by_kind: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or "Optimizer" in ev.key:
            by_kind[kind_of(ev.key)] = by_kind.get(kind_of(ev.key), 0.0) + ev.self_cpu_time_total / 1e6
    profiled_wall = sum(by_kind.values())
    wall = statistics.median(walls)
    tokens = args.batch_size * args.seq_len
    peak = peak_flops(torch.device("cpu"), args.dtype)
    mfu = tokens * flops_per_token(cfg, args.seq_len) / wall / peak
    r = {"preset": args.preset, "dtype": args.dtype, "loss": args.loss, "attention": kernel, "batch": args.batch_size, "seq_len": args.seq_len,
         "vocab": args.vocab, "threads": torch.get_num_threads(), "step_s": wall, "tokens_per_s": tokens / wall,
         "mfu": mfu, "peak_flops": peak,
         "phases_s": {k: statistics.median(v) for k, v in phases.items()},
         "operators_s": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])), "operators_total_s": profiled_wall}
    print(f"{args.preset} {args.dtype} batch {args.batch_size}x{args.seq_len}, {args.loss} loss, {kernel} attention: step {wall * 1e3:.0f} ms, "
          f"{tokens / wall:,.0f} tokens/s, MFU {mfu:.1%} of {peak / 1e12:.2f} TFLOP/s")
    for k, v in r["phases_s"].items():
        print(f"  {k:<10} {v * 1e3:8.1f} ms  {v / wall:6.1%}")
    print("  operators (one profiled step, self time):")
    for k, v in r["operators_s"].items():
        print(f"    {k:<18} {v * 1e3:8.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
