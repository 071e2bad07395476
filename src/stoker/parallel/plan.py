"""The layout planner: which parallel layout and communication settings should train a model
fastest on given hardware, predicted by arithmetic alone (nothing is built or allocated, so a
175B model on 256 GPUs is planned in a fraction of a second on a laptop).

For every factorization of the world into (pp, dp_replicate, dp_shard, tp) that stoker runs,
and every communication setting that layout admits, it predicts each rank's memory
(parameters, gradients, AdamW state, activations, communication buffers) and the step time:
the model's FLOPs at a calibrated share of the peak, plus the communication that compute does
not hide, plus pipeline bubbles and the optimizer's memory traffic. Layouts that do not fit
are dropped; the rest are ranked.

Every constant that is a judgement rather than arithmetic (how much of the peak a training
step reaches, the cost of one message, how much of a backward pass hides communication) lives
in `Constants`, filled from `stoker plan --calibrate` where it has measured this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from stoker.models.presets import PRESETS

if TYPE_CHECKING:
    import argparse

    from stoker.models.gpt import GPTConfig

GB = 1e9


# ---------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Gpu:
    bf16_flops: float  # dense tensor-core peak, without sparsity
    fp32_flops: float  # without TF32, which torch leaves off for fp32 matmuls by default
    memory_bytes: float
    intra_gbps: float  # one GPU's link to the others in its host, each direction, Gbit/s
    memory_bw: float  # bytes/s of its own memory


# From the vendors' data sheets (the same peaks as train/metrics.py's GPU_PEAK_TFLOPS, which
# a test keeps in step): H100 and H200 SXM: 989 TFLOP/s bf16 dense, 67 fp32, 80 GB HBM3 at
# 3.35 TB/s (H200: 141 GB at 4.8 TB/s), NVLink 4 at 900 GB/s both ways. A100 SXM: 312 and
# 19.5, 80 GB at 2.0 TB/s (40 GB at 1.6 TB/s), NVLink 3 at 600 GB/s both ways. L40S: 362 and
# 91.6, 48 GB at 864 GB/s; L4: 121 and 30.3, 24 GB at 300 GB/s; RTX 4090: 165 (fp32
# accumulate) and 82.6, 24 GB at 1008 GB/s; these three talk over PCIe 4.0 x16 (32 GB/s
# each way). Memory is the data sheet's decimal GB: what CUDA can allocate is a little more.
GPUS: dict[str, Gpu] = {
    "h100": Gpu(989e12, 67e12, 80 * GB, 3600, 3.35e12),
    "h200": Gpu(989e12, 67e12, 141 * GB, 3600, 4.8e12),
    "a100": Gpu(312e12, 19.5e12, 80 * GB, 2400, 2.0e12),
    "a100-40gb": Gpu(312e12, 19.5e12, 40 * GB, 2400, 1.6e12),
    "l40s": Gpu(362e12, 91.6e12, 48 * GB, 256, 864e9),
    "l4": Gpu(121e12, 30.3e12, 24 * GB, 256, 300e9),
    "rtx4090": Gpu(165e12, 82.6e12, 24 * GB, 256, 1008e9),
}


@dataclass(frozen=True)
class Hardware:
    """What the job runs on. Bandwidths are bytes/s in each direction; figures are per process
    (one GPU, or one CPU process's share of its host) unless said otherwise."""
    n_hosts: int
    procs_per_host: int
    peak_flops: float  # per process, for the training dtype
    memory_bytes: float  # per process
    inter_bw: float  # per host: its network link(s) to the other hosts, shared by its processes
    intra_bw: float  # between two processes of one host
    inter_latency_s: float = 10e-6
    intra_latency_s: float = 2e-6
    device: str = "cuda"  # cpu (gloo) or cuda (NCCL)

    @property
    def world(self) -> int:
        return self.n_hosts * self.procs_per_host

    def validate(self) -> "Hardware":
        for name in ("n_hosts", "procs_per_host"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("peak_flops", "memory_bytes", "intra_bw") + (("inter_bw",) if self.n_hosts > 1 else ()):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be a finite number > 0, got {v!r}")
        for name in ("inter_latency_s", "intra_latency_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: must be cpu or cuda, got {self.device!r}")
        return self


# ---------------------------------------------------------------------------------------------
# The constants of the step-time model, in one place


def cache_dir() -> Path:
    """The directory train/metrics.py keeps its peak probe in (same variable, same default)."""
    return Path(os.environ.get("STOKER_CACHE", Path.home() / ".cache" / "stoker"))


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def cpu_name() -> str:
    """The CPU's model name (what peak and calibration figures are kept per)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """Calibration is per CPU model and core count: a shared home directory may serve several."""
    return f"{cpu_name()}|{os.cpu_count() or 1}"


@dataclass
class Constants:
    """The step-time model's judgement calls. Defaults per device; `stoker plan --calibrate`
    replaces the CPU ones with this machine's measurements, and tests or benchmarks fitting the
    model to measured step times adjust them here and nowhere else."""
    # Achieved / peak FLOP/s of a training step's compute (kernel efficiency, small matmuls,
    # norms and activations that are not matmuls). GPUs: typical 40-50% MFU of a plain FSDP
    # transformer step in bf16; CPUs: measured by --calibrate.
    efficiency: float = 0.45
    # Software cost of one step of a collective on top of the link's latency: NCCL a few
    # microseconds, gloo a few hundred (measured by --calibrate on the loopback).
    message_overhead_s: float = 5e-6
    # Share of an overlap window (backward for DDP, forward/backward for FSDP on CUDA, the
    # following steps for streaming DiLoCo) that really hides communication: on a CPU, gloo's
    # thread competes with compute for the same cores (--calibrate measures it).
    overlap: float = 0.9
    # CPU hosts: seconds of a computing core's time that each byte a rank sends costs (the
    # kernel's TCP path and gloo's copies and sums run on the cores that compute), which no
    # overlap hides. parallel.auto measures it on its own link (measured on 2 emulated hosts
    # over veth and a bridge: DDP's synchronised steps of mini about 9% slower than local ones
    # at 1 Gbit/s where PowerSGD's were not).
    comm_cpu_s_per_byte: float = 0.0
    # Time of an all-gather / reduce-scatter relative to a ring moving the ideal (n-1)/n of the
    # tensor at the link's bandwidth. gloo's reduce-scatter sends the whole tensor like an
    # all-reduce (2x); --calibrate measures both on the loopback.
    allgather_factor: float = 1.0
    reduce_scatter_factor: float = 1.0
    # AdamW and gradient clipping are memory bound: bytes/s of one process's memory.
    memory_bw: float = 2e12
    # Memory a rank cannot use for the model: allocator fragmentation (a share) and the
    # runtime itself (CUDA context and workspaces, or the Python process with torch).
    memory_headroom: float = 0.9
    runtime_bytes: float = 2 * GB
    source: str = "defaults"  # where the figures come from, shown with the plan

    @classmethod
    def for_device(cls, device: str, procs_per_host: int = 1) -> "Constants":
        if device == "cuda":
            return cls()
        # Uncalibrated: roughly what --calibrate measured on a 2-core build machine (training
        # step at 69% of the one-thread matmul peak, 68 us per gloo message step, gloo's
        # all-gather 3x and reduce-scatter 2x an ideal ring's time).
        k = cls(efficiency=0.6, message_overhead_s=100e-6, overlap=0.5, allgather_factor=3.0,
                reduce_scatter_factor=2.0, memory_bw=10e9 / procs_per_host, runtime_bytes=0.5 * GB,
                source="defaults (no calibration: run `stoker plan --calibrate`)")
        cal = load_calibration()
        if cal:
            k.efficiency = cal["efficiency"]
            k.message_overhead_s = cal["loopback_latency_s"]
            k.allgather_factor = cal["allgather_factor"]
            k.reduce_scatter_factor = cal["reduce_scatter_factor"]
            k.overlap = cal["overlap"]
            k.memory_bw = cal["memory_bw"] / procs_per_host
            k.source = f"calibration of {cal['measured']} ({calibration_path()})"
        return k


def load_calibration() -> dict | None:
    """This machine's stored `stoker plan --calibrate` figures, or None."""
    try:
        cal = json.loads(calibration_path().read_text()).get(machine_key())
    except (OSError, ValueError, AttributeError):
        return None
    need = ("peak_flops", "efficiency", "loopback_bw", "loopback_latency_s", "allgather_factor",
            "reduce_scatter_factor", "overlap", "memory_bw", "measured")
    return cal if isinstance(cal, dict) and all(k in cal for k in need) else None


# ---------------------------------------------------------------------------------------------
# The model, as numbers


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a stoker GPT (models/gpt.py) without building it."""
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int
    bias: bool = True
    preset: str | None = None  # the preset it came from, for the command lines
    n_kv_head: int | None = None  # the Llama options, as in GPTConfig
    ffn_hidden: int | None = None
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos: str = "learned"
    tie_embeddings: bool = True

    ARCH = ("n_kv_head", "ffn_hidden", "norm", "mlp", "pos", "tie_embeddings")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelSpec":
        if name not in PRESETS:
            raise ConfigError(f"model.preset: {name!r} is not valid; valid: {', '.join(PRESETS)}")
        kw = {k: v for k, v in PRESETS[name].fields().items() if k in {f.name for f in dataclasses.fields(cls)}}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preset=name, **kw)

    @classmethod
    def of(cls, model: "ModelSpec | GPTConfig", seq_len: int | None = None) -> "ModelSpec":
        """From a ModelSpec or a GPTConfig; the trainer sets block_size to train.seq_len."""
        spec = model if isinstance(model, ModelSpec) else cls(
            model.n_layer, model.n_embd, model.n_head, model.vocab_size, model.block_size, model.bias,
            **{k: getattr(model, k) for k in cls.ARCH})
        if seq_len is not None and seq_len != spec.block_size:
            spec = dataclasses.replace(spec, block_size=seq_len)
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size"):
            if getattr(spec, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(spec, name)}")
        if spec.n_embd % spec.n_head:
            raise ConfigError(f"model.n_head: {spec.n_head} does not divide model.n_embd {spec.n_embd}")
        return spec

    # Every tensor as (shape, how tensor parallel splits it: dim 0, dim 1, or not at all),
    # following parallelize.tp_plan: q/k/v/fc/gate column-wise (dim 0 of the weight and the
    # bias), o_proj/proj row-wise (dim 1, the bias stays whole), norms whole, embeddings by rows.
    def block_tensors(self) -> list[tuple[tuple[int, ...], int | None]]:
        c, f = self.n_embd, self.ffn_hidden or 4 * self.n_embd
        kv = (self.n_kv_head or self.n_head) * (c // self.n_head)
        norm = [((c,), None)] * (2 if self.bias and self.norm == "layernorm" else 1)
        out = list(norm)
        for rows in (c, kv, kv):  # q, k, v
            out += [((rows, c), 0)] + ([((rows,), 0)] if self.bias else [])
        out += [((c, c), 1)] + ([((c,), None)] if self.bias else [])  # o_proj
        out += norm
        for _ in range(2 if self.mlp == "swiglu" else 1):  # fc (and gate)
            out += [((f, c), 0)] + ([((f,), 0)] if self.bias else [])
        out += [((c, f), 1)] + ([((c,), None)] if self.bias else [])  # proj
        return out

    def wte(self) -> tuple[tuple[int, ...], int | None]:
        return (self.vocab_size, self.n_embd), 0

    def wpe(self) -> tuple[tuple[int, ...], int | None]:
        return (self.block_size if self.pos == "learned" else 0, self.n_embd), 0

    def ln_f(self) -> list[tuple[tuple[int, ...], int | None]]:
        return [((self.n_embd,), None)] * (2 if self.bias and self.norm == "layernorm" else 1)

    @functools.cached_property
    def block_params(self) -> int:
        return sum(math.prod(s) for s, _ in self.block_tensors())

    @functools.cached_property
    def params(self) -> int:
        """As models.gpt.count_params: a tied head counted once."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.n_embd
        return (self.n_layer * self.block_params + self.vocab_size * self.n_embd + math.prod(self.wpe()[0])
                + sum(math.prod(s) for s, _ in self.ln_f()) + head)

    def flops_per_token(self, seq_len: int) -> float:
        """As models.gpt.flops_per_token: 6N (without the lookups) plus attention."""
        lookups = math.prod(self.wpe()[0]) + (0 if self.tie_embeddings else self.vocab_size * self.n_embd)
        return 6.0 * (self.params - lookups) + 12.0 * self.n_layer * seq_len * self.n_embd

    def matrices(self) -> list[tuple[int, int]]:
        """Shapes of the 2-D weights, which PowerSGD compresses."""
        return ([self.wte()[0]] + ([self.wpe()[0]] if self.pos == "learned" else [])
                + ([self.wte()[0]] if not self.tie_embeddings else [])
                + [s for s, _ in self.block_tensors() if len(s) == 2] * self.n_layer)


def _local_numel(tensors, tp: int, shard: int) -> int:
    """Elements rank 0 (the largest shard) holds: tensor parallel splits a tensor's dim 0 or 1
    into ceil-sized chunks, then FSDP2 chunks dim 0 of what is left over `shard` ranks."""
    total = 0
    for shape, dim in tensors:
        shape = list(shape)
        if dim is not None and tp > 1:
            shape[dim] = -(-shape[dim] // tp)
        shape[0] = -(-shape[0] // shard)
        total += math.prod(shape)
    return total


@functools.lru_cache(maxsize=256)
def stage_blocks(n_layer: int, block: int, first: int, last: int, n_stages: int) -> tuple[int, ...]:
    """Blocks per pipeline stage: the split pipeline.split_layers makes (contiguous ranges that
    minimise the largest stage's parameters; the first stage also holds the embeddings, the last
    the final norm and its own copy of the tied head), from counts alone."""
    return tuple(len(r) for r in balanced_split([block] * n_layer, first, last, n_stages))


def balanced_split(blocks: list[int], first: int, last: int, n_stages: int) -> list[range]:
    """Contiguous ranges of `blocks` (their sizes), one per stage, minimising the largest stage,
    where the first stage also carries `first` and the last `last` (dynamic programming)."""
    n = len(blocks)
    prefix = [0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first if s == 0 else 0) + (last if s == n_stages - 1 else 0)

    # best[s][b]: the least possible maximum over stages 0..s covering blocks [0, b).
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, n_stages):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                m = max(best[s - 1][a], cost(s, a, b))
                if m < best[s][b]:
                    best[s][b], cut[s][b] = m, a
    bounds, b = [], n
    for s in range(n_stages - 1, 0, -1):
        a = cut[s][b]
        bounds.append(range(a, b))
        b = a
    bounds.append(range(0, b))
    return bounds[::-1]


@dataclass(frozen=True)
class StateBytes:
    """Model state one rank holds: what the trainer's layout.json reports per rank."""
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class _Stage:
    blocks: int
    first: bool
    last: bool


@functools.lru_cache(maxsize=256)
def _stages(m: ModelSpec, pp: int) -> tuple[_Stage, ...]:
    if pp == 1:
        return (_Stage(m.n_layer, True, True),)
    first = math.prod(m.wte()[0]) + math.prod(m.wpe()[0])
    last = math.prod(m.wte()[0]) + sum(math.prod(s) for s, _ in m.ln_f())  # the head: wte's shape
    sizes = stage_blocks(m.n_layer, m.block_params, first, last, pp)
    return tuple(_Stage(n, i == 0, i == pp - 1) for i, n in enumerate(sizes))


@functools.lru_cache(maxsize=1024)
def _block_local(m: ModelSpec, tp: int, shard: int) -> int:
    return _local_numel(m.block_tensors(), tp, shard)


@functools.lru_cache(maxsize=1024)
def _root_local(m: ModelSpec, first: bool, last: bool, tp: int, shard: int) -> int:
    """Elements of a stage's tensors outside its blocks: embeddings, final norm."""
    root = []
    if first:
        root += [m.wte(), m.wpe()]
    if last and not (first and m.tie_embeddings):
        root.append(m.wte())  # the head: the last stage's copy of a tied weight, or its own
    if last:
        root += m.ln_f()
    return _local_numel(root, tp, shard)


def _stage_local(m: ModelSpec, st: _Stage, tp: int, shard: int) -> int:
    return st.blocks * _block_local(m, tp, shard) + _root_local(m, st.first, st.last, tp, shard)


def model_state_bytes(model: ModelSpec | "GPTConfig", pp: int = 1, dp_shard: int = 1, tp: int = 1,
                      dp_replicate: int = 1) -> StateBytes:
    """Parameter, gradient and AdamW bytes of the most loaded rank. Parameters and gradients
    are fp32 under every dtype (bf16 is autocast, or FSDP2's gathered copies); AdamW keeps two
    fp32 moments per parameter (its step counter is a scalar, left out as layout.json does)."""
    m = ModelSpec.of(model)
    stages = _stages(m, pp)
    n = max(_stage_local(m, s, tp, dp_shard) for s in stages)
    grads = n
    if tp > 1 and dp_shard * dp_replicate == 1:
        # Measured: without FSDP over it, tensor parallel leaves the position embedding's
        # gradient whole on every rank although its weight is split by rows.
        wpe = math.prod(m.wpe()[0])
        first = _stage_local(m, stages[0], tp, 1)
        grads = max(n, first + wpe - _local_numel([m.wpe()], tp, 1))
    return StateBytes(4 * n, 4 * grads, 8 * n)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per rank (the most loaded one)."""
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # gathered FSDP units, DDP buckets, PowerSGD/DiLoCo state
    runtime: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.runtime


@dataclass(frozen=True)
class PlanRow:
    rank: int
    layout: str  # e.g. "FSDP 8 x HSDP 4 x TP 8"
    method: str  # how gradients or replicas are synchronised
    exact: bool  # False where the method changes the mathematics (PowerSGD, DiLoCo, streaming)
    overrides: dict[str, Any]  # dotted config keys -> values: the row as `stoker train` options
    micro_batch: int  # sequences per forward pass
    micro_batches: int  # per step (gradient accumulation, or the pipeline's micro-batches)
    step_s: float
    compute_s: float  # the model's FLOPs at the calibrated efficiency (no recomputation)
    recompute_s: float  # activation checkpointing's second forward
    comm_s: float  # communication not hidden behind compute
    bubble_s: float  # pipeline fill and drain
    optimizer_s: float  # AdamW and clipping (memory bound)
    utilisation: float  # compute_s / step_s
    memory: MemoryEstimate
    wire_bytes: float  # bytes each rank sends per step (DiLoCo/streaming: averaged over steps)
    command: str
    comm_parts: dict[str, float]  # comm_s by kind: dp, tp, pp, step (the loss and norm scalars)

    @property
    def tokens_per_s(self) -> float:
        tokens = self.overrides.get("train.batch_size", 0) * self.overrides.get("train.seq_len", 0)
        return tokens / self.step_s if self.step_s > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The cost model


@dataclass(frozen=True)
class _Group:
    size: int
    bw: float  # bytes/s each member sends on its slowest hop
    latency: float  # per message step


@dataclass(frozen=True)
class _Method:
    """One communication setting of a layout."""
    ac: str = "none"
    reshard: str = "true"
    compression: str = "none"
    powersgd_rank: int = 4
    sync: str = "step"
    sync_every: int = 8
    sync_fragments: int = 4
    sync_overlap: int = 1  # streaming: chosen by the cost model, the least that hides an exchange

    @property
    def exact(self) -> bool:
        return self.compression in ("none",) and self.sync == "step"


# DiLoCo/streaming periods tried: stoker's default and a longer one for slow links.
SYNC_EVERY = (8, 32)
STREAM_FRAGMENTS = 4
POWERSGD_RANK = 16  # the trainer's default (config.py says why)
DDP_BUCKET_MB = 25.0  # DDP's bucket size (parallel.bucket_mb's default)
# Ranked as if this much slower: within 5% an exact method wins over one that changes the maths.
INEXACT_PENALTY = 1.05
# Below this utilisation of the best synchronous layout, DiLoCo/streaming may be chosen.
ASYNC_BELOW = 0.85


class _Planner:
    def __init__(self, m: ModelSpec, hw: Hardware, batch: int, seq_len: int, dtype: str, k: Constants):
        self.m, self.hw, self.batch, self.seq_len, self.dtype, self.k = m, hw, batch, seq_len, dtype, k
        self.rate = hw.peak_flops * k.efficiency
        self.act_bytes = 2 if dtype == "bf16" else 4
        self.smallest_need = math.inf  # least memory any layout needed: for "nothing fits"
        self.smallest_what = ""

    # -- communication primitives --

    def group(self, sizes: dict[str, int], dim: str) -> _Group:
        """The collective group along mesh dim `dim` (mesh order pp, dp_replicate, dp_shard, tp,
        tp innermost: consecutive ranks). A group spanning hosts shares each host's link with
        the host's other groups of the same dim, which run their collectives at the same time."""
        hw = self.hw
        order = ["pp", "dr", "ds", "tp"]
        stride = math.prod(sizes[d] for d in order[order.index(dim) + 1:])
        g, p = sizes[dim], hw.procs_per_host
        per_host = max(1, min(g, p // stride)) if stride < p else 1
        if per_host >= g:
            return _Group(g, hw.intra_bw, hw.intra_latency_s + self.k.message_overhead_s)
        return _Group(g, min(hw.intra_bw, hw.inter_bw * per_host / p), hw.inter_latency_s + self.k.message_overhead_s)

    def coll(self, kind: str, nbytes: float, grp: _Group) -> tuple[float, float]:
        """(seconds, bytes each member sends) of a collective over a tensor of `nbytes` (the full,
        unsharded size). Rings for bandwidth; NCCL switches to trees where latency dominates,
        gloo stays a ring."""
        g = grp.size
        if g <= 1 or nbytes <= 0:
            return 0.0, 0.0
        if kind == "ar":
            wire, factor = 2 * (g - 1) / g * nbytes, 1.0
            steps = 2 * math.ceil(math.log2(g)) if self.hw.device == "cuda" else 2 * (g - 1)
        else:
            wire = (g - 1) / g * nbytes
            factor = self.k.allgather_factor if kind == "ag" else self.k.reduce_scatter_factor
            steps = g - 1
        return wire * factor / grp.bw + steps * grp.latency, wire * (2 if kind == "rs" and self.hw.device == "cpu" else 1)

    def p2p(self, nbytes: float, grp: _Group) -> float:
        return nbytes / grp.bw + grp.latency

    # -- one candidate --

    def evaluate(self, pp: int, dr: int, ds: int, tp: int, meth: _Method, micro: int, count: int) -> PlanRow | None:
        m, hw, k = self.m, self.hw, self.k
        T, C, V = self.seq_len, m.n_embd, m.vocab_size
        sizes = {"pp": pp, "dr": dr, "ds": ds, "tp": tp}
        dp = dr * ds
        ddp = ds == 1 and tp == 1 and pp == 1 and dr > 1
        ac = meth.ac == "full"
        tokens_micro = micro * T

        # Memory.
        stages = _stages(m, pp)
        state = model_state_bytes(m, pp, ds, tp, dr)
        n_local = state.params // 4
        # The rank holding the first stage carries the most activations under 1F1B (up to pp
        # micro-batches in flight); the last stage adds the logits. Take the worst of both.
        per_tok_layer = (64 if self.act_bytes == 4 else 40) * C / tp  # 16 values of C per token
        logits_tok = 12 * V / tp  # fp32 logits, their log-softmax and its gradient
        worst_act = 0.0
        for i, st in enumerate(stages):
            if ac:
                layers = st.blocks * 4 * C / tp + per_tok_layer  # block inputs + one block recomputed
            else:
                layers = st.blocks * per_tok_layer
            flight = max(1, min(count, pp - i)) if pp > 1 else 1
            act = tokens_micro * (layers * flight + (logits_tok if st.last else 0) + 4 * C)
            worst_act = max(worst_act, act)
        buffers = 0.0
        # The most loaded stage, unsharded by FSDP (what a gather rebuilds).
        big = max(stages, key=lambda s: _stage_local(m, s, tp, 1))
        full_local = _stage_local(m, big, tp, 1)
        param_bytes = self.act_bytes  # FSDP2 gathers in the compute dtype
        block_local = _block_local(m, tp, 1)
        root_local = _root_local(m, big.first, big.last, tp, 1)
        if ddp and meth.sync == "step":
            buffers += 4 * n_local  # DDP's gradient buckets: a second copy of the gradients
            if meth.compression == "powersgd":
                buffers += 4 * n_local  # error feedback
        elif ddp:
            buffers += 8 * n_local  # DiLoCo's anchor (the agreed weights) and outer momentum
        elif dp > 1:
            if meth.reshard == "false":
                buffers += full_local * param_bytes
            else:  # the unit in use, the one prefetched, and the root (kept for the head)
                buffers += (2 * block_local + root_local) * param_bytes
            buffers += 4 * max(block_local, root_local)  # a unit's unsharded gradient before reduce-scatter
            if count > 1 and pp == 1:  # accumulation without sync keeps unsharded gradients
                buffers += 4 * full_local
        mem = MemoryEstimate(state.params, state.grads, state.optimizer, worst_act, buffers, k.runtime_bytes)
        if mem.total > hw.memory_bytes * k.memory_headroom:
            if mem.total < self.smallest_need:
                self.smallest_need, self.smallest_what = mem.total, _describe(pp, dr, ds, tp)
            return None

        # Compute: the most loaded stage's FLOPs for this rank's tokens.
        block_f = (6 * m.block_params + 12 * T * C) / tp  # per token, training
        head_f = 6 * (V * C + sum(math.prod(s) for s, _ in m.ln_f())) / tp
        stage_f = max(st.blocks * block_f + (head_f if st.last else 0) for st in stages)
        refwd_f = max(st.blocks for st in stages) * block_f / 3 if ac else 0.0
        t_micro = stage_f * tokens_micro / self.rate
        t_re = refwd_f * tokens_micro / self.rate
        t_fwd, t_bwd = t_micro / 3, 2 * t_micro / 3 + t_re
        model_flops = m.flops_per_token(T) * self.batch * T / (dp * tp * pp)  # this rank's share
        compute = model_flops / self.rate
        if pp > 1:
            work = count * (t_micro + t_re)
            bubble = (pp - 1) * (t_micro + t_re)
        else:
            work, bubble = count * (t_micro + t_re), 0.0
        recompute = count * t_re
        compute_total = work - recompute  # uneven stages: more than `compute`, the ideal share
        optimizer = 28 * n_local / k.memory_bw  # AdamW reads/writes param, grad, two moments

        # Exposed communication by kind: data parallel, tensor parallel, pipeline, per-step scalars.
        parts = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "step": 0.0}
        wire = 0.0
        world = _Group(hw.world, *self._world_link())
        small = 3 * self.coll("ar", 8, world)[0]  # loss, stop flag and gradient norm each step
        parts["step"] += small

        if ddp:
            grp = self.group(sizes, "dr")
            n = m.params
            if meth.sync == "step":
                bucket = DDP_BUCKET_MB * 2**20
                n_buckets = max(1, math.ceil(4 * n / bucket))
                if meth.compression == "powersgd":
                    r = meth.powersgd_rank
                    # comm.PowerSGD's rule: compress where the factors are at most half the matrix.
                    comp = [(a, b) for a, b in m.matrices() if (a + b) * r * 2 <= a * b]
                    vec = n - sum(a * b for a, b in comp)
                    send = 4 * (sum(r * (a + b) for a, b in comp) + vec)
                    t_all, wire = self.coll("ar", send, grp)
                    # two all-reduces per bucket (vectors with P, then Q) instead of one
                    t_all += (2 * n_buckets - 1) * self.coll("ar", 4, grp)[0]
                    t_all += sum(4 * a * b * r + 4 * a * r * r for a, b in comp) / self.rate  # P=MQ, Q=M'P, QR
                    last = t_all / n_buckets
                else:
                    per = 2 if meth.compression in ("bf16", "fp16") else 4
                    t_all, wire = self.coll("ar", per * n, grp)
                    t_all += (n_buckets - 1) * self.coll("ar", 4, grp)[0]  # one latency term per bucket
                    # The tied embedding's gradient is complete only at the end of backward: its
                    # bucket (at least the bucket size) waits for nothing to hide behind.
                    last_elems = min(n, max(bucket / 4, V * C))
                    last = self.coll("ar", per * last_elems, grp)[0]
                # All-reduce runs during the last micro-batch's backward (no_sync before it).
                hidden = min(max(0.0, t_all - last), k.overlap * t_bwd)
                parts["dp"] += t_all - hidden
            else:
                per = 4  # parallel.sync_dtype fp32 (the default)
                h = meth.sync_every
                if meth.sync == "diloco":
                    t_sync, w = self.coll("ar", per * n, grp)
                    parts["dp"] += t_sync / h  # every H steps, nothing to hide behind
                    wire = w / h
                else:
                    f = meth.sync_fragments
                    t_frag, w = self.coll("ar", per * n / f, grp)
                    step_compute = work + optimizer
                    # The smallest overlap that hides a fragment's exchange (staleness grows with it),
                    # at most the steps until the next fragment's exchange starts on the same link.
                    most = max(1, min(h - 1, h // f))
                    o = next((o for o in range(1, most) if t_frag <= k.overlap * o * step_compute), most)
                    meth = dataclasses.replace(meth, sync_overlap=o)
                    parts["dp"] += max(0.0, t_frag - k.overlap * o * step_compute) * f / h
                    wire = w * f / h
            if hw.device == "cpu":  # (FSDP, TP and PP on gloo block: their CPU cost is inside their time)
                parts["dp"] += wire * k.comm_cpu_s_per_byte
        elif dp > 1:
            sh, rep = self.group(sizes, "ds"), self.group(sizes, "dr")
            # One FSDP unit per block and the root unit (embeddings, final norm, head), which
            # is gathered first and, holding the tied embedding, reduced last.
            nb = big.blocks
            b_ag, r_ag = (self.coll("ag", u * param_bytes, sh) for u in (block_local, root_local))
            b_rs, r_rs = (self.coll("rs", u * 4, sh) for u in (block_local, root_local))
            b_ar, r_ar = (self.coll("ar", u / ds * 4, rep) for u in (block_local, root_local))
            n_bwd = 0 if meth.reshard == "false" else max(0, nb - 1)  # the last block stays gathered
            t_agf = nb * b_ag[0] + r_ag[0]
            t_agb = n_bwd * b_ag[0]
            t_red = nb * (b_rs[0] + b_ar[0]) + r_rs[0] + r_ar[0]
            wire = count * ((nb + n_bwd) * b_ag[1] + r_ag[1]) + nb * (b_rs[1] + b_ar[1]) + r_rs[1] + r_ar[1]
            # FSDP2 reshards after every backward (the trainer leaves reshard_after_backward on),
            # so each micro-batch gathers in forward; with reshard_after_forward=true once more
            # in backward. Gradients are reduced after the last micro-batch only.
            if hw.device == "cpu":
                # gloo on the CPU: FSDP2's collectives run between the compute, not beside it.
                parts["dp"] += count * (t_agf + t_agb) + t_red
            else:
                first = r_ag[0] if root_local else b_ag[0]
                last_red = r_rs[0] + r_ar[0] if root_local else b_rs[0] + b_ar[0]
                fwd_exp = first + max(0.0, t_agf - first - k.overlap * t_fwd)
                bwd_exp = max(0.0, t_agb - k.overlap * t_bwd)
                last_bwd = max(0.0, t_agb + t_red - last_red - k.overlap * t_bwd)
                parts["dp"] += count * fwd_exp + (count - 1) * bwd_exp + last_bwd + last_red
        if tp > 1:
            grp = self.group(sizes, "tp")
            act = tokens_micro * C * self.act_bytes
            # Sequence parallel: an all-gather before attention and before the MLP, a
            # reduce-scatter after each, in forward and (swapped) in backward; again in the
            # recomputed forward; two pairs more for the embeddings and the head.
            pairs = max(s.blocks for s in stages) * (4 + (2 if ac else 0)) + 2
            (t_ag, w_ag), (t_rs, w_rs) = self.coll("ag", act, grp), self.coll("rs", act, grp)
            parts["tp"] += count * pairs * (t_ag + t_rs)
            wire += count * pairs * (w_ag + w_rs)
        if pp > 1:
            grp = self.group(sizes, "pp")
            send = tokens_micro * C * self.act_bytes / tp
            t_send = self.p2p(send, grp)
            parts["pp"] += 2 * (count if hw.device == "cpu" else (pp - 1)) * t_send
            wire += 2 * count * send
            t_tied, w_tied = self.coll("ar", 4 * _local_numel([m.wte()], tp, ds), grp)
            parts["pp"] += t_tied
            wire += w_tied

        comm = sum(parts.values())
        step = compute_total + bubble + recompute + comm + optimizer
        overrides = self._overrides(pp, dr, ds, tp, meth, micro)
        return PlanRow(0, _describe(pp, dr, ds, tp), _method_name(pp, dr, ds, tp, meth), meth.exact,
                       overrides, micro, count, step, compute, recompute, comm, bubble, optimizer,
                       compute / step, mem, wire, "", parts)

    def _world_link(self) -> tuple[float, float]:
        hw = self.hw
        if hw.n_hosts > 1:
            return min(hw.intra_bw, hw.inter_bw / hw.procs_per_host), hw.inter_latency_s + self.k.message_overhead_s
        return hw.intra_bw, hw.intra_latency_s + self.k.message_overhead_s

    def _overrides(self, pp, dr, ds, tp, meth: _Method, micro: int) -> dict[str, Any]:
        o: dict[str, Any] = {
            "parallel.pp": pp, "parallel.dp_replicate": dr, "parallel.dp_shard": ds, "parallel.tp": tp,
            "parallel.activation_checkpoint": meth.ac,
        }
        if ds > 1:
            o["parallel.reshard_after_forward"] = meth.reshard
        if meth.compression != "none":
            o["parallel.grad_compression"] = meth.compression
            if meth.compression == "powersgd":
                o["parallel.powersgd_rank"] = meth.powersgd_rank
        if meth.sync != "step":
            o["parallel.sync"] = meth.sync
            o["parallel.sync_every"] = meth.sync_every
            if meth.sync == "streaming":
                o["parallel.sync_fragments"] = meth.sync_fragments
                o["parallel.sync_overlap"] = meth.sync_overlap
        o["train.batch_size"] = self.batch
        o["train.seq_len"] = self.seq_len
        o["train.micro_batch_size"] = micro
        o["train.dtype"] = self.dtype
        return o


def _describe(pp: int, dr: int, ds: int, tp: int) -> str:
    if pp * dr * ds * tp == 1:
        return "single process"
    if ds == tp == pp == 1:
        return f"DDP {dr}"
    # Outermost first, as the mesh (pp, dp_replicate, dp_shard, tp) lays them over the ranks.
    parts = [f"{name} {n}" for name, n in (("PP", pp), ("DP", dr), ("FSDP", ds), ("TP", tp)) if n > 1]
    return " x ".join(parts)


def maths(r: PlanRow) -> str:
    """Whether a row trains the same model as one process would, and if not, what changes it."""
    if r.exact:
        return "exact"
    sync = r.overrides.get("parallel.sync", "step")
    return {"diloco": "DiLoCo", "streaming": "DiLoCo"}.get(sync) or {"powersgd": "PowerSGD"}.get(
        r.overrides.get("parallel.grad_compression"), "rounding")


def _method_name(pp, dr, ds, tp, meth: _Method) -> str:
    if meth.sync == "diloco":
        return f"DiLoCo H={meth.sync_every}"
    if meth.sync == "streaming":
        return f"streaming H={meth.sync_every} F={meth.sync_fragments} o={meth.sync_overlap}"
    if meth.compression == "powersgd":
        return f"PowerSGD r{meth.powersgd_rank}"
    if ds == tp == pp == 1 and dr > 1:
        return f"{'fp32' if meth.compression == 'none' else meth.compression} grads"
    if ds > 1:
        return f"reshard {meth.reshard}"
    return "-"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _methods(pp: int, dr: int, ds: int, tp: int, m: ModelSpec) -> list[_Method]:
    acs = ("none", "full")
    if ds == tp == pp == 1 and dr > 1:
        out = [_Method(ac=a, compression=c, powersgd_rank=POWERSGD_RANK) for a in acs
               for c in ("none", "bf16", "powersgd")]
        out += [_Method(ac=a, sync="diloco", sync_every=h) for a in acs for h in SYNC_EVERY]
        out += [_Method(ac=a, sync="streaming", sync_every=h, sync_fragments=min(STREAM_FRAGMENTS, m.n_layer))
                for a in acs for h in SYNC_EVERY]
        return out
    if ds > 1:
        return [_Method(ac=a, reshard=r) for a in acs for r in ("true", "false")]
    return [_Method(ac=a) for a in acs]


def _config(m: ModelSpec, batch: int, seq_len: int, dtype: str, cap: int, pp: int, dr: int, ds: int, tp: int) -> Config:
    model = ModelConfig(preset=m.preset or "debug", n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head)
    return Config(model=model, train=TrainConfig(batch_size=batch, seq_len=seq_len, micro_batch_size=cap, dtype=dtype),
                  parallel=ParallelConfig(pp=pp, dp_replicate=dr, dp_shard=ds, tp=tp))


def plan(model: ModelSpec | "GPTConfig", hw: Hardware, batch: int, seq_len: int, dtype: str = "bf16",
         constants: Constants | None = None, micro_batch_size: int = 0) -> list[PlanRow]:
    """Every layout and communication setting of `hw.world` processes that fits in memory,
    ranked best first. `batch` is the global batch in sequences of `seq_len` tokens;
    `micro_batch_size` an upper bound on sequences per forward pass (0: the planner picks the
    fastest that fits). Raises ConfigError naming the field for a bad description, and naming
    the memory when nothing fits."""
    hw.validate()
    m = ModelSpec.of(model, seq_len)
    if batch < 1:
        raise ConfigError(f"batch: must be >= 1 sequences, got {batch}")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype: {dtype!r} is not valid; valid: fp32, bf16")
    if micro_batch_size < 0:
        raise ConfigError(f"micro_batch_size: must be >= 0, got {micro_batch_size}")
    k = constants or Constants.for_device(hw.device, hw.procs_per_host)
    pl = _Planner(m, hw, batch, seq_len, dtype, k)
    rows: list[PlanRow] = []
    W, P = hw.world, hw.procs_per_host
    for tp in _divisors(P):
        if m.n_head % tp or (tp > 1 and seq_len % tp):
            continue
        for pp in _divisors(W // tp):
            if pp > m.n_layer:
                continue
            rest = W // (tp * pp)
            for ds in _divisors(rest):
                dr = rest // ds
                if batch % (dr * ds):
                    continue  # the batch does not split over these replicas: not a layout for it
                local = batch // (dr * ds)
                caps = [d for d in reversed(_divisors(local)) if not micro_batch_size or d <= micro_batch_size]
                splits = []
                for cap in caps:
                    cfg = _config(m, batch, seq_len, dtype, cap, pp, dr, ds, tp)
                    try:
                        cfg.validate()
                    except ConfigError:
                        continue
                    s = cfg.batch_split()
                    if (s.micro, s.count) not in splits:
                        splits.append((s.micro, s.count))
                for meth in _methods(pp, dr, ds, tp, m):
                    best = None
                    for micro, count in splits:
                        row = pl.evaluate(pp, dr, ds, tp, meth, micro, count)
                        if row is not None and (best is None or row.step_s < best.step_s):
                            best = row
                        if row is not None and pp == 1:
                            break  # without a pipeline the largest micro-batch that fits is the fastest
                    if best is not None:
                        rows.append(best)
    if not rows:
        need = f"; the smallest layout ({pl.smallest_what}) needs {pl.smallest_need / GB:.1f} GB" \
            if math.isfinite(pl.smallest_need) else ""
        raise ConfigError(f"memory: no layout of {m.preset or 'this model'} ({m.params / 1e9:.3g} B params) on "
                          f"{hw.world} process(es) fits in {hw.memory_bytes / GB:.1f} GB per process "
                          f"(x {k.memory_headroom:.0%} usable){need}; add processes or memory, or a smaller batch")
    return _rank(rows, m, hw)


def _rank(rows: list[PlanRow], m: ModelSpec, hw: Hardware) -> list[PlanRow]:
    rows.sort(key=lambda r: r.step_s * (1.0 if r.exact else INEXACT_PENALTY))
    # DiLoCo and streaming change the optimisation (local steps, an outer optimizer): worth it
    # only where synchronous training leaves the processes waiting on the network.
    sync_best = max((r.utilisation for r in rows if r.overrides.get("parallel.sync", "step") == "step"), default=0.0)
    if sync_best >= ASYNC_BELOW:
        rows.sort(key=lambda r: r.overrides.get("parallel.sync", "step") != "step")  # stable
    return [dataclasses.replace(r, rank=i + 1, command=_command(r, m, hw)) for i, r in enumerate(rows)]


def _command(r: PlanRow, m: ModelSpec, hw: Hardware) -> str:
    args = ["stoker", "train"]
    if m.preset:
        args.append(f"--model.preset={m.preset}")
        p = PRESETS[m.preset]
        args += [f"--model.{k}={getattr(m, k)}" for k in ("n_layer", "n_embd", "n_head") if getattr(m, k) != getattr(p, k)]
    else:
        args += [f"--model.{k}={getattr(m, k)}" for k in ("n_layer", "n_embd", "n_head")]
    defaults = ParallelConfig()
    for key, v in r.overrides.items():
        section, _, name = key.partition(".")
        if section == "parallel" and str(getattr(defaults, name)) == str(v):
            continue  # the trainer's default already
        args.append(f"--{key}={v}")
    if hw.n_hosts > 1:  # the shell fills these in on each host
        args += [f"--nnodes={hw.n_hosts}", "--node-rank=$NODE_RANK", "--master=$MASTER:29500"]
    if hw.procs_per_host > 1:
        args.append(f"--nproc={hw.procs_per_host}")
    return " ".join(args)


def choose(gcfg: "GPTConfig | ModelSpec", n_hosts: int, procs_per_host: int, peak_flops: float, memory_bytes: float,
           inter_bw: float, intra_bw: float, latency_s: float, batch: int, seq_len: int, dtype: str = "fp32",
           device: str = "cpu", micro_batch_size: int = 0, constants: Constants | None = None) -> dict[str, Any]:
    """The first choice of `plan` as dotted config overrides for `load_config(overrides=...)`.

    Bandwidths are bytes/s in each direction (inter_bw: one host's link to the others, shared
    by its processes; intra_bw: between two processes of a host); latency_s is the one-way
    latency between hosts; peak_flops and memory_bytes are per process. The result always sets
    parallel.pp, dp_replicate, dp_shard, tp, activation_checkpoint, grad_compression and sync
    (plus the settings those need) and train.micro_batch_size (the sequences per forward pass
    the memory prediction assumed).
    """
    intra_latency = min(latency_s, 2e-6 if device == "cuda" else 0.0)
    hw = Hardware(n_hosts, procs_per_host, peak_flops, memory_bytes, inter_bw, intra_bw, latency_s, intra_latency, device)
    row = plan(gcfg, hw, batch, seq_len, dtype, constants, micro_batch_size)[0]
    out = {"parallel.grad_compression": "none", "parallel.sync": "step"}
    out.update({k: v for k, v in row.overrides.items() if k.startswith("parallel.") or k == "train.micro_batch_size"})
    return out


# ---------------------------------------------------------------------------------------------
# Calibration: this machine's figures, measured


def calibrate(progress=print) -> dict:
    """Measure this machine (under a minute) and store the figures for `plan`: the matmul peak
    (train/metrics.py's probe, both dtypes), the efficiency of a real training step of preset
    `tiny` (8 x 256 tokens, fp32, one thread) against one thread's matmul rate, the memory
    bandwidth (a large copy), and the loopback all-reduce, all-gather and reduce-scatter between
    two gloo processes on 127.0.0.1."""
    import torch

    from stoker.models.gpt import GPT, GPTConfig, loss_fn
    from stoker.train.metrics import peak_flops

    t_start = time.perf_counter()
    peaks = {d: peak_flops(torch.device("cpu"), d) for d in ("fp32", "bf16")}
    progress(f"matmul peak (all cores): {peaks['fp32'] / 1e9:,.1f} GFLOP/s fp32, {peaks['bf16'] / 1e9:,.1f} GFLOP/s bf16")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Memory bandwidth: a copy reads and writes each byte once.
        a = torch.empty(64 * 2**20 // 4)
        b = torch.empty_like(a)
        b.copy_(a)
        best = math.inf
        for _ in range(5):
            t = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t)
        memory_bw = 2 * a.numel() * 4 / best * (os.cpu_count() or 1)  # one core's share times the cores
        del a, b
        gcfg = GPTConfig.from_preset("tiny", block_size=256)
        spec = ModelSpec.of(gcfg)
        torch.manual_seed(0)
        model = GPT(gcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        x = torch.randint(0, gcfg.vocab_size, (8, 256))
        opt_s = 28 * spec.params / (memory_bw / (os.cpu_count() or 1))
        flops = spec.flops_per_token(256) * 8 * 256

        def train_step() -> float:
            t = time.perf_counter()
            loss_fn(model(x), x).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        mm = torch.randn(1024, 1024)
        t = time.perf_counter()
        mm @ mm
        reps = max(1, round(0.3 / max(time.perf_counter() - t, 1e-6)))

        def matmul_rate() -> float:  # sustained over ~0.3 s, as a step sustains its rate
            t = time.perf_counter()
            for _ in range(reps):
                mm @ mm
            return 2 * 1024**3 * reps / (time.perf_counter() - t)

        train_step()  # the first step pays one-off set-up costs
        # Step and matmul rate in turn, three times: other processes on the machine slow both
        # alike within a round, so the ratio holds where each figure alone would wander.
        ratios, steps, one_core = [], [], 0.0
        for _ in range(3):
            before, step, after = matmul_rate(), train_step(), matmul_rate()
            steps.append(step)
            one_core = max(one_core, before, after)
            ratios.append(flops / max(step - opt_s, 1e-9) / ((before + after) / 2))
        efficiency = min(1.0, sorted(ratios)[1])
        step = min(steps)
        train_flops = flops / max(step - opt_s, 1e-9)
    finally:
        torch.set_num_threads(threads)
    progress(f"training step of preset tiny (8 x 256 tokens, fp32, 1 thread): {step:.3f} s, "
             f"{train_flops / 1e9:,.1f} GFLOP/s; {efficiency:.0%} of a 1-thread 1024-matmul's rate "
             f"({one_core / 1e9:,.1f} GFLOP/s at best), the median of 3 rounds")
    progress(f"memory bandwidth (copy, 1 thread x {os.cpu_count()} cores): {memory_bw / 1e9:,.1f} GB/s")

    loop = _loopback()
    progress(f"loopback all-reduce, 2 gloo processes on 127.0.0.1: {loop['bw'] / 1e9:,.2f} GB/s "
             f"({loop['nbytes'] / 2**20:.0f} MiB), {loop['latency_s'] * 1e6:,.0f} us per message step; "
             f"all-gather x{loop['ag_factor']:.1f} and reduce-scatter x{loop['rs_factor']:.1f} an ideal ring's time; "
             f"{loop['overlap']:.0%} of an all-reduce hidden behind as long a compute (median of 5)")
    result = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "peak_flops": peaks,
        "one_core_peak_flops": one_core,
        "train_flops_one_core": train_flops,
        "efficiency": efficiency,
        "memory_bw": memory_bw,
        "memory_bytes": _machine_memory(),
        "loopback_bw": loop["bw"],
        "loopback_latency_s": loop["latency_s"],
        "allgather_factor": loop["ag_factor"],
        "reduce_scatter_factor": loop["rs_factor"],
        "overlap": loop["overlap"],
        "seconds": time.perf_counter() - t_start,
    }
    path = calibration_path()
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    known[machine_key()] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(path)
    progress(f"stored in {path} ({result['seconds']:.0f} s)")
    return result


def _machine_memory() -> float:
    """Physical memory of this machine in bytes (all of it: a plan is for a run to come)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * GB


def _loopback() -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "loopback.json"
        mp.start_processes(_loopback_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
        return json.loads(out.read_text())


def _loopback_worker(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        nbytes = 16 * 2**20
        full = torch.ones(nbytes // 4)
        half = torch.empty(nbytes // 8)
        gathered = torch.empty(nbytes // 4)

        def best_of(fn, reps):
            fn()
            dist.barrier()
            best = math.inf
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            return best

        t_ar = best_of(lambda: dist.all_reduce(full), 5)
        # The single-tensor collectives FSDP2 calls (older torch: the *_tensor names).
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        t_ag = best_of(lambda: all_gather(gathered, half), 5)
        t_rs = best_of(lambda: reduce_scatter(half, full), 5)
        one = torch.ones(1)
        t_small = best_of(lambda: dist.all_reduce(one), 50)
        # Overlap: as much matmul work as the all-reduce takes, then both at once. What the
        # pair saves over running them in turn is the share of the window that hid the exchange.
        a = torch.randn(256, 256)
        t_mm = best_of(lambda: a @ a, 5)
        n = max(1, round(t_ar / t_mm))

        def compute():
            for _ in range(n):
                a @ a

        def both():
            work = dist.all_reduce(full, async_op=True)
            compute()
            work.wait()

        def timed(fn) -> float:
            dist.barrier()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        shares = []
        for _ in range(5):  # in turn, for the reason calibrate() times steps and matmuls in turn
            t_a, t_c, t_both = timed(lambda: dist.all_reduce(full)), timed(compute), timed(both)
            shares.append(min(1.0, max(0.0, (t_c + t_a - t_both) / min(t_c, t_a))))
        overlap = sorted(shares)[2]
        dist.barrier()
        if rank == 0:
            latency = t_small / 2  # a 2-rank ring all-reduce is 2 message steps
            # 2 ranks: a ring all-reduce sends the whole tensor, all-gather/reduce-scatter half.
            bw = nbytes / max(t_ar - 2 * latency, 1e-9)
            ideal_half = nbytes / 2 / bw + latency
            Path(out).write_text(json.dumps({
                "nbytes": nbytes, "bw": bw, "latency_s": latency,
                "ag_factor": max(1.0, (t_ag - latency) / (ideal_half - latency)),
                "rs_factor": max(1.0, (t_rs - latency) / (ideal_half - latency)),
                "overlap": overlap,
            }))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The command line (cli.py registers the subcommand and calls `cmd_plan`)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="rank parallel layouts and communication settings for a model on given hardware",
        description="Predict per-rank memory and step time of every layout stoker runs (DDP, FSDP2/HSDP, TP, "
                    "PP, activation checkpointing, gradient compression, DiLoCo) for a model on HOSTS x "
                    "PROCS_PER_HOST processes, and print them ranked with the `stoker train` options of each. "
                    "Nothing is built: a 175B model plans in under a second. Without --gpu, this machine's "
                    "measured peak and memory are used (see --calibrate).")
    p.add_argument("--model.preset", dest="preset", default="mini", help=f"one of {', '.join(PRESETS)} (default mini)")
    p.add_argument("--model.n_layer", dest="n_layer", type=int, default=None)
    p.add_argument("--model.n_embd", dest="n_embd", type=int, default=None)
    p.add_argument("--model.n_head", dest="n_head", type=int, default=None)
    p.add_argument("--model.vocab_size", dest="vocab_size", type=int, default=None,
                   help="vocabulary (default: the preset's; a run takes it from its data)")
    p.add_argument("--hosts", type=int, default=1, help="hosts (default 1)")
    p.add_argument("--procs-per-host", type=int, default=1, help="processes (GPUs) per host (default 1)")
    p.add_argument("--gpu", default=None, help=f"GPU type: {', '.join(GPUS)} (default: this machine's CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per process (overrides --gpu/probe)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory per process in GB (overrides --gpu/this machine)")
    p.add_argument("--inter-gbps", type=float, default=None,
                   help="bandwidth of each host's link to the others, Gbit/s (required with --hosts > 1)")
    p.add_argument("--intra-gbps", type=float, default=None,
                   help="bandwidth between two processes of a host, Gbit/s (default: the GPU's link, or the "
                        "calibrated loopback)")
    p.add_argument("--latency-us", type=float, default=10.0, help="latency between hosts in microseconds (default 10)")
    p.add_argument("--intra-latency-us", type=float, default=None,
                   help="latency inside a host in microseconds (default 2 on GPUs, 0 on CPUs: gloo's own cost "
                        "is calibrated)")
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default bf16 with --gpu, fp32 on the CPU)")
    p.add_argument("--micro-batch", type=int, default=0, help="most sequences per forward pass (default: the "
                                                              "fastest that fits)")
    p.add_argument("--efficiency", type=float, default=None, help="achieved / peak FLOP/s of a step (default: "
                                                                  "calibrated on the CPU, 0.45 on GPUs)")
    p.add_argument("--comm-cpu-ns", type=float, default=None, metavar="NS",
                   help="CPU hosts: nanoseconds of compute lost per byte a process sends (kernel TCP, gloo's "
                        "copies; parallel.auto measures it on its link; default 0)")
    p.add_argument("--overlap", type=float, default=None, help="share of an overlap window that hides "
                                                               "communication, 0 to 1")
    p.add_argument("--top", type=int, default=10, help="rows to show (default 10; 0: all)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every row as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (peak, training efficiency, loopback gloo bandwidth; < 1 min) and "
                        "store it for later plans")


def _positive(flag: str, v: float | None, zero_ok: bool = False) -> None:
    if v is not None and not (math.isfinite(v) and (v >= 0 if zero_ok else v > 0)):
        raise ConfigError(f"{flag}: must be a finite number {'>= 0' if zero_ok else '> 0'}, got {v}")


def hardware_from_args(args: "argparse.Namespace", dtype: str) -> tuple[Hardware, Constants]:
    """Hardware and constants from the command line, each bad value named by its flag."""
    if args.hosts < 1:
        raise ConfigError(f"--hosts: must be >= 1, got {args.hosts}")
    if args.procs_per_host < 1:
        raise ConfigError(f"--procs-per-host: must be >= 1, got {args.procs_per_host}")
    for flag, v in (("--peak-tflops", args.peak_tflops), ("--memory-gb", args.memory_gb),
                    ("--inter-gbps", args.inter_gbps), ("--intra-gbps", args.intra_gbps)):
        _positive(flag, v)
    _positive("--latency-us", args.latency_us, zero_ok=True)
    _positive("--intra-latency-us", args.intra_latency_us, zero_ok=True)
    if args.efficiency is not None and not (math.isfinite(args.efficiency) and 0 < args.efficiency <= 1):
        raise ConfigError(f"--efficiency: must be > 0 and <= 1, got {args.efficiency}")
    if args.comm_cpu_ns is not None and not (math.isfinite(args.comm_cpu_ns) and args.comm_cpu_ns >= 0):
        raise ConfigError(f"--comm-cpu-ns: must be >= 0, got {args.comm_cpu_ns}")
    if args.overlap is not None and not (math.isfinite(args.overlap) and 0 <= args.overlap <= 1):
        raise ConfigError(f"--overlap: must be between 0 and 1, got {args.overlap}")
    if args.hosts > 1 and args.inter_gbps is None:
        raise ConfigError("--inter-gbps: required with --hosts > 1 (each host's bandwidth to the others, Gbit/s)")
    P = args.procs_per_host
    if args.gpu is not None:
        gpu = GPUS.get(args.gpu.lower())
        if gpu is None:
            raise ConfigError(f"--gpu: {args.gpu!r} is not known; known: {', '.join(GPUS)}")
        device = "cuda"
        k = Constants.for_device(device)
        peak = gpu.bf16_flops if dtype == "bf16" else gpu.fp32_flops
        memory, intra = gpu.memory_bytes, gpu.intra_gbps * 1e9 / 8
        k.memory_bw = gpu.memory_bw
        intra_lat = 2e-6
    else:
        device = "cpu"
        k = Constants.for_device(device, P)
        cal = load_calibration()
        if args.peak_tflops is None:
            if cal:
                machine_peak = cal["peak_flops"][dtype]
            else:
                import torch

                from stoker.train.metrics import peak_flops

                machine_peak = peak_flops(torch.device("cpu"), dtype)
            peak = machine_peak / P  # the host's processes share its cores
        else:
            peak = 0.0
        memory = (cal["memory_bytes"] if cal else _machine_memory()) / P
        intra = cal["loopback_bw"] if cal else 1e9  # gloo over the loopback: ~1 GB/s measured here
        intra_lat = 0.0
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    if args.memory_gb is not None:
        memory = args.memory_gb * GB
    if args.intra_gbps is not None:
        intra = args.intra_gbps * 1e9 / 8
    if args.intra_latency_us is not None:
        intra_lat = args.intra_latency_us * 1e-6
    if args.efficiency is not None:
        k.efficiency = args.efficiency
    if args.overlap is not None:
        k.overlap = args.overlap
    if args.comm_cpu_ns is not None:
        k.comm_cpu_s_per_byte = args.comm_cpu_ns * 1e-9
    inter = (args.inter_gbps or 0.0) * 1e9 / 8
    hw = Hardware(args.hosts, P, peak, memory, inter if args.hosts > 1 else intra, intra,
                  args.latency_us * 1e-6, intra_lat, device)
    return hw, k


def cmd_plan(args: "argparse.Namespace") -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.calibrate:
        calibrate(progress=console.print)
        return 0
    if args.batch < 1:
        raise ConfigError(f"--batch: must be >= 1, got {args.batch}")
    if args.top < 0:
        raise ConfigError(f"--top: must be >= 0, got {args.top}")
    if args.micro_batch < 0:
        raise ConfigError(f"--micro-batch: must be >= 0, got {args.micro_batch}")
    for name in ("n_layer", "n_embd", "n_head", "vocab_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--model.{name}: must be >= 1, got {v}")
    spec = ModelSpec.from_preset(args.preset, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                 vocab_size=args.vocab_size)
    seq_len = args.seq_len if args.seq_len is not None else spec.block_size
    if seq_len < 1:
        raise ConfigError(f"--seq-len: must be >= 1, got {seq_len}")
    dtype = args.dtype or ("bf16" if args.gpu else "fp32")
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--dtype: {dtype!r} is not valid; valid: fp32, bf16")
    hw, k = hardware_from_args(args, dtype)
    rows = plan(spec, hw, args.batch, seq_len, dtype, k, args.micro_batch)

    m = ModelSpec.of(spec, seq_len)
    what = args.gpu.upper() if args.gpu else "CPU"
    console.print(
        f"[bold]{m.preset or 'model'}[/bold]: {m.params / 1e6:,.1f} M params, batch {args.batch} x {seq_len} tokens, "
        f"{dtype}, on {hw.n_hosts} host(s) x {hw.procs_per_host} {what} process(es): "
        f"{hw.peak_flops / 1e12:,.3g} TFLOP/s and {hw.memory_bytes / GB:,.1f} GB each; "
        f"links {hw.inter_bw * 8 / 1e9:,.3g} Gbit/s between hosts, {hw.intra_bw * 8 / 1e9:,.3g} Gbit/s inside, "
        f"latency {hw.inter_latency_s * 1e6:,.3g} us")
    console.print(f"model constants: efficiency {k.efficiency:.0%}, overlap {k.overlap:.0%}, "
                  f"{k.message_overhead_s * 1e6:,.0f} us per message; {k.source}")
    shown = rows[:args.top] if args.top else rows
    table = Table(title=f"{len(rows)} layouts fit; best {len(shown)} by predicted step time")
    for col, just in (("#", "right"), ("layout", "left"), ("sync", "left"), ("AC", "left"), ("micro", "right"),
                      ("step s", "right"), ("util", "right"), ("GB/rank", "right"), ("MB/step", "right"),
                      ("maths", "left")):
        table.add_column(col, justify=just)
    for r in shown:
        table.add_row(str(r.rank), r.layout, r.method, r.overrides["parallel.activation_checkpoint"],
                      f"{r.micro_batch}x{r.micro_batches}", f"{r.step_s:.4g}", f"{r.utilisation:.0%}",
                      f"{r.memory.total / GB:.3g}", f"{r.wire_bytes / 1e6:,.1f}", maths(r))
    console.print(table)
    console.print("micro: sequences per forward pass x passes per step; util: the model's compute at the "
                  "calibrated efficiency / the predicted step; GB/rank: predicted memory of the most loaded rank; "
                  "MB/step: bytes each rank sends per step; maths: exact, or what changes it")
    for r in shown:
        console.print(f"{r.rank:>3}  {r.command}", soft_wrap=True, highlight=False)
    if hw.n_hosts > 1:
        console.print(f"Run the command on each of the {hw.n_hosts} hosts with NODE_RANK set to its rank (0 .. "
                      f"{hw.n_hosts - 1}) and MASTER to node 0's address; add --parallel.ifname=IFACE to name the "
                      "interface between hosts.")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"memory_total": r.memory.total}
                                               for r in rows], indent=1))
    return 0


__all__ = ["GPUS", "Constants", "Hardware", "MemoryEstimate", "ModelSpec", "PlanRow", "StateBytes", "calibrate",
           "choose", "model_state_bytes", "plan"]
