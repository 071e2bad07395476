"""Throughput, MFU against the device's peak, the metrics log and the loss plot."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stoker.parallel.plan import cpu_name

# Declared dense peaks (TFLOP/s) of common GPUs, without sparsity, from the vendors' data sheets.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM; the PCIe card is lower, matched first below
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.0, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp32": 35.6},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # no bf16 units: fp16 tensor-core figure
}

CACHE = Path(os.environ.get("STOKER_CACHE", Path.home() / ".cache" / "stoker")) / "peak_flops.json"


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best FLOP/s of a square matmul of size up to n on the CPU with torch's current thread count.

    The size grows from 256 while one product takes under a tenth of `seconds`: a CPU without
    bf16 instructions can run bf16 a thousand times below its fp32 peak (measured: a 2048
    product took 64 s on one such machine), and a fixed size would make the probe take minutes.
    """
    size = 256
    while True:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        t = time.perf_counter()
        torch.mm(a, b)  # also the warm-up: the first call picks kernels
        if size >= n or time.perf_counter() - t > seconds / 10:
            break
        size *= 2
    best = 0.0
    end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
        if time.perf_counter() >= end:
            return best


def fastest_attention(rows: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype: str,
                      device: torch.device, budget_bytes: int = 256 << 20) -> tuple[str, dict[str, float]]:
    """The faster attention kernel for one layer of this shape, forward and backward, timed here:
    "sdpa" or "matmul" (stoker.models.gpt.matmul_attention), and the seconds each took. Which
    wins depends on the machine, dtype and sequence length (on a 2-core CPU without AMX, bf16,
    head size 64: matmul 1.35x faster at 256 tokens, even at 512, 0.6x at 1024), so it is
    measured rather than assumed. GPUs take SDPA (flash kernels); so does a shape whose score
    matrix, which the matmul kernel keeps for backward, would exceed `budget_bytes` per layer."""
    from stoker.models.gpt import matmul_attention

    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if device.type == "cuda" or rows * heads * seq_len**2 * tdtype.itemsize > budget_bytes:
        return "sdpa", {}
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(rows, heads, seq_len, head_dim, dtype=tdtype, device=device, generator=gen, requires_grad=True)
    k, v = (torch.randn(rows, kv_heads, seq_len, head_dim, dtype=tdtype, device=device, generator=gen,
                        requires_grad=True) for _ in range(2))
    kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads),
               "matmul": lambda: matmul_attention(q, k, v)}
    best = {name: math.inf for name in kernels}
    for i in range(3):  # the first round is the warm-up; rounds alternate the kernels
        for name, fn in kernels.items():
            t = time.perf_counter()
            fn().sum().backward()
            if i:
                best[name] = min(best[name], time.perf_counter() - t)
    return min(best, key=best.get), best


def peak_flops(device: torch.device, dtype: str, cache: bool = True) -> float:
    """Peak FLOP/s of one device for `dtype` ("fp32" or "bf16").

    GPUs: the declared table. CPUs: measured once by a matmul probe using every core, cached
    per CPU model, core count and dtype (the probe takes about a second). Pass cache=False
    where other processes may be busy on the same cores: the figure is then used but not kept.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key][dtype] * 1e12
        return float("nan")  # unknown GPU: MFU is reported as NaN rather than guessed
    cores = os.cpu_count() or 1
    key = f"{cpu_name()}|{cores}|{dtype}"
    try:
        known = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    threads = torch.get_num_threads()
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        torch.set_num_threads(cores)
        every_core = measure_matmul_flops(tdtype)
        # One core times the count: another process busy on some cores slows the all-core
        # probe but not this one (it lands on a free core), and a peak cached from a busy
        # moment would inflate every later MFU. On an idle machine the two agree within a few %.
        torch.set_num_threads(1)
        one_core = measure_matmul_flops(tdtype, seconds=0.5) * cores
    finally:
        torch.set_num_threads(threads)
    known[key] = max(every_core, one_core)
    if cache:
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(CACHE)
        except OSError:
            pass  # a read-only home only costs a re-probe next time
    return float(known[key])


class MetricsLog:
    """Append-only JSON lines, one object per event; rank 0 writes."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            # Drop lines past the checkpoint we resume from (those steps run again) and a line
            # torn by a crash mid-write.
            keep = [l for l, r in _parsed(self.path.read_text()) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            tmp.replace(self.path)  # a crash here keeps the old file, never half of it
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _parsed(text: str) -> list[tuple[str, dict]]:
    """(line, record) for each line that holds a JSON object; a torn or foreign line is skipped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
    return out


def read_metrics(path: str | Path) -> list[dict]:
    return [r for _, r in _parsed(Path(path).read_text())]


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
