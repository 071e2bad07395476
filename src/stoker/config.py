"""Configuration: one dataclass per component, composed by a root `Config`.

Loaded from TOML, overridden with dotted options (`--train.lr=3e-4`), validated so that a
bad field ends with one line naming it and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from stoker.models.presets import PRESETS


class ConfigError(ValueError):
    """A user error in the configuration; the CLI prints it on one line and exits 2."""


def _opt(default: Any, help: str) -> Any:
    """A field with its one-sentence meaning, which `stoker train --help` lists."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    preset: str = _opt("debug", f"architecture and size: {', '.join(PRESETS)}")
    n_layer: int | None = _opt(None, "transformer blocks (unset: the preset's)")
    n_embd: int | None = _opt(None, "embedding width (unset: the preset's)")
    n_head: int | None = _opt(None, "attention heads, dividing model.n_embd (unset: the preset's)")
    dropout: float = _opt(0.0, "dropout probability during training, 0 to 1")
    init_from: str = _opt("", "a run directory (trained, or written by `stoker import`) whose latest weights a new "
                              "run starts from; its model.json sets the architecture, in place of model.preset")

    def validate(self) -> None:
        _choice("model.preset", self.preset, list(PRESETS))
        if self.init_from and (self.n_layer or self.n_embd or self.n_head):
            raise ConfigError("model.init_from: the run's own model.json sets the shape; drop model.n_layer, "
                              "model.n_embd and model.n_head")
        for name in ("n_layer", "n_embd", "n_head"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {v}")
        _range("model.dropout", self.dropout, 0.0, 1.0)


@dataclass
class DataConfig:
    dir: str = _opt("data/stdlib", "a directory written by `stoker prepare` (tokenizer and token shards)")

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("data.dir: must name a directory written by `stoker prepare`")


@dataclass
class TrainConfig:
    steps: int = _opt(200, "optimizer steps to train to (a resumed run continues up to this one)")
    batch_size: int = _opt(16, "sequences per optimizer step, over all data-parallel processes")
    micro_batch_size: int = _opt(
        0, "most sequences per forward pass per process: the largest divisor of the per-process batch up to "
           "this is used and the rest accumulated (with a pipeline, it bounds the pipeline's micro-batches); "
           "0: the whole per-process batch")
    seq_len: int = _opt(256, "tokens per sequence (the model's context length)")
    lr: float = _opt(1e-3, "peak learning rate of AdamW")
    min_lr_ratio: float = _opt(0.1, "the cosine decay ends at train.lr times this")
    warmup_steps: int = _opt(20, "steps of linear warm-up to train.lr")
    decay_steps: int = _opt(0, "length of the cosine decay in steps; 0: train.steps (set it to extend a run later)")
    weight_decay: float = _opt(0.1, "AdamW weight decay of matrices and embeddings (not biases or norms)")
    beta1: float = _opt(0.9, "AdamW decay rate of the gradient's running mean")
    beta2: float = _opt(0.95, "AdamW decay rate of the squared gradient's running mean")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0 disables clipping")
    seed: int = _opt(1337, "seed of the initial weights and of the data order")
    dtype: str = _opt("fp32", "compute dtype: fp32, or bf16 (autocast, or FSDP2 mixed precision)")
    device: str = _opt("auto", "auto (cuda when there is one), cpu or cuda")
    out_dir: str = _opt("runs/default", "run directory (checkpoints, metrics, config); a run there is resumed")
    ckpt_every: int = _opt(100, "checkpoint every N steps; 0: only at the end and on SIGTERM/SIGINT")
    keep_last: int = _opt(2, "checkpoints kept; older ones are deleted")
    eval_every: int = _opt(100, "validation loss every N steps; 0: only at the end")
    eval_batches: int = _opt(4, "validation batches per evaluation")
    log_every: int = _opt(1, "write a metrics line every N steps")
    progress: bool = _opt(True, "show a progress bar (false: only plain lines)")
    compile: bool = _opt(False, "torch.compile each transformer block")
    attention: str = _opt("auto", "attention kernel: auto (the faster of the two, timed at start on the run's "
                                  "shape), sdpa (PyTorch's fused kernels) or matmul (two matmuls and a softmax)")
    on_nonfinite: str = _opt("stop", "a NaN/inf gradient: stop (keeping the last good checkpoint), or skip that step "
                                     "(5 in a row still stop)")
    allow_schedule_change: bool = _opt(False, "let a resumed run change the checkpoint's learning-rate schedule")
    compute_probe: bool = _opt(False, "for measuring only: every even step skips DDP's gradient exchange (its "
                                      "metrics line says local: true), so one run times steps with and without "
                                      "communication side by side; the replicas drift apart")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "keep_last", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "decay_steps", "ckpt_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        _range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _range("train.beta1", self.beta1, 0.0, 1.0)
        _range("train.beta2", self.beta2, 0.0, 1.0)
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip: must be >= 0")
        _choice("train.dtype", self.dtype, ["fp32", "bf16"])
        _choice("train.attention", self.attention, ["auto", "sdpa", "matmul"])
        _choice("train.on_nonfinite", self.on_nonfinite, ["stop", "skip"])
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be one of auto, cpu, cuda, got {self.device!r}")
        if not self.out_dir:
            raise ConfigError("train.out_dir: must not be empty")


PP_SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b"]
GRAD_COMPRESSION = ["none", "bf16", "fp16", "powersgd"]
SYNC_MODES = ["step", "diloco", "streaming"]


@dataclass
class ParallelConfig:
    # The mesh is (pp, dp_replicate, dp_shard, tp), tp innermost: its collectives are the most
    # frequent, so it should span the fastest links (one node); dp_replicate spans the slowest.
    dp_replicate: int = _opt(1, "data-parallel replicas: DDP, or HSDP replica groups when parallel.dp_shard > 1")
    dp_shard: int = _opt(1, "FSDP2 shards: parameters, gradients and optimizer state split over this many ranks")
    tp: int = _opt(1, "tensor-parallel ranks (DTensor, sequence parallel on the norms), dividing model.n_head")
    pp: int = _opt(1, "pipeline-parallel ranks (torch.distributed.pipelining), the layers split into stages")
    pp_schedule: str = _opt("1f1b", f"pipeline schedule: {', '.join(PP_SCHEDULES)}")
    pp_microbatches: int = _opt(
        0, "pipeline micro-batches per step, dividing the per-replica batch; 0: the fewest that divide it, "
           "at least 2 x the stages (with train.micro_batch_size: at least the stages, none larger than it)")
    pp_stages_per_rank: int = _opt(2, "virtual pipeline stages per rank, interleaved-1f1b only")
    activation_checkpoint: str = _opt(
        "none", "recompute activations in backward: none, full, or every-K (every K-th block)")
    # A second gather inside a node (N) is cheap where the links between nodes are slow.
    reshard_after_forward: str = _opt(
        "true", "FSDP2: true frees gathered parameters after forward (least memory), false keeps them "
                "(no second all-gather), N keeps them sharded over groups of N ranks")
    fsdp_prefetch: int = _opt(1, "FSDP2: blocks whose all-gather is issued ahead, forward and backward")
    param_dtype: str = _opt("auto", "FSDP2 compute dtype of gathered parameters: auto (train.dtype), fp32, bf16")
    reduce_dtype: str = _opt("fp32", "FSDP2 gradient reduce-scatter dtype: fp32 or bf16")
    # Across hosts (docs/ethernet.md).
    ifname: str = _opt("", "network interface that gloo/NCCL use between hosts (e.g. eth0); empty: the system's choice")
    connect_timeout_s: float = _opt(60.0, "seconds a process keeps trying to reach the master before it fails")
    bucket_mb: float = _opt(25.0, "DDP: gradient bucket size in MB (smaller: the first all-reduce starts earlier "
                                  "in backward, more messages)")
    grad_compression: str = _opt(
        "none", f"DDP gradient exchange: {', '.join(GRAD_COMPRESSION)} (powersgd: low-rank with error feedback)")
    # Rank 4 trailed exact DDP by 3% in validation loss after 300 steps of preset tiny; rank 16 by
    # under 1% (docs/ethernet.md), still ~1% of mini's gradient bytes.
    powersgd_rank: int = _opt(16, "PowerSGD: rank of each gradient matrix's approximation")
    powersgd_warmup: int = _opt(10, "PowerSGD: steps of exact all-reduce before compression starts (>= 2)")
    sync: str = _opt(
        "step", "how replicas agree: step (gradients every step: DDP/FSDP), diloco (each replica takes "
                "parallel.sync_every local steps, then an outer Nesterov step on the averaged change), streaming "
                "(diloco in parallel.sync_fragments fragments at staggered steps, each exchange overlapping "
                "parallel.sync_overlap steps of compute)")
    sync_every: int = _opt(8, "diloco/streaming: local steps between a fragment's synchronizations (H)")
    sync_fragments: int = _opt(4, "streaming: fragments of the model, synchronized at staggered steps")
    sync_overlap: int = _opt(1, "streaming: local steps a fragment's exchange has to finish in, hidden behind them")
    sync_dtype: str = _opt("fp32", "diloco/streaming: dtype of the exchanged parameter change: fp32 or bf16")
    outer_lr: float = _opt(0.7, "diloco/streaming: outer learning rate (1 with outer_momentum 0: plain averaging)")
    outer_momentum: float = _opt(0.9, "diloco/streaming: outer Nesterov momentum, 0 to < 1")
    auto: bool = _opt(False, "let `stoker plan` pick the layout and communication settings for these processes")
    link_gbps: float = _opt(0.0, "parallel.auto: bandwidth between hosts in Gbit/s; 0: measured at start")

    def validate(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "pp_stages_per_rank", "fsdp_prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.pp_microbatches < 0:
            raise ConfigError(f"parallel.pp_microbatches: must be >= 0, got {self.pp_microbatches}")
        _choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        self.ac_every()  # validates
        self.reshard()
        _choice("parallel.param_dtype", self.param_dtype, ["auto", "fp32", "bf16"])
        _choice("parallel.reduce_dtype", self.reduce_dtype, ["fp32", "bf16"])
        _choice("parallel.grad_compression", self.grad_compression, GRAD_COMPRESSION)
        _choice("parallel.sync", self.sync, SYNC_MODES)
        _choice("parallel.sync_dtype", self.sync_dtype, ["fp32", "bf16"])
        for name in ("powersgd_rank", "sync_every", "sync_fragments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.sync_overlap < 0:
            raise ConfigError(f"parallel.sync_overlap: must be >= 0, got {self.sync_overlap}")
        if self.powersgd_warmup < 2:
            raise ConfigError(f"parallel.powersgd_warmup: must be >= 2 (DDP settles its buckets in the first "
                              f"steps), got {self.powersgd_warmup}")
        if self.bucket_mb <= 0 or self.connect_timeout_s <= 0 or self.outer_lr <= 0 or self.link_gbps < 0:
            bad = next(n for n in ("bucket_mb", "connect_timeout_s", "outer_lr", "link_gbps")
                       if getattr(self, n) < 0 or (n != "link_gbps" and getattr(self, n) == 0))
            raise ConfigError(f"parallel.{bad}: must be > 0, got {getattr(self, bad)}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"parallel.outer_momentum: must be >= 0 and < 1, got {self.outer_momentum}")
        if self.sync == "streaming" and self.sync_overlap >= self.sync_every:
            raise ConfigError(f"parallel.sync_overlap: {self.sync_overlap} must be smaller than parallel.sync_every "
                              f"{self.sync_every} (a fragment's exchange must end before its next one starts)")
        if self.sync != "step" and (self.dp_shard, self.tp, self.pp) != (1, 1, 1):
            raise ConfigError(f"parallel.sync: {self.sync} runs whole-model replicas (parallel.dp_replicate only); "
                              f"got {self.describe()}")
        if self.grad_compression != "none" and (self.dp_shard, self.tp, self.pp) != (1, 1, 1):
            raise ConfigError(f"parallel.grad_compression: {self.grad_compression} is a DDP setting (parallel."
                              f"dp_replicate only; FSDP2 has parallel.reduce_dtype); got {self.describe()}")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def n_stages(self) -> int:
        return self.pp * (self.pp_stages_per_rank if self.pp_schedule == "interleaved-1f1b" else 1)

    def schedule_problem(self, microbatches: int) -> str:
        """Why torch's pipeline schedule would refuse this many micro-batches ("" if it runs them)."""
        if self.pp_schedule == "1f1b" and microbatches < self.n_stages:
            return f"1f1b needs at least one micro-batch per stage ({self.n_stages})"
        rounds = max(1, microbatches // self.pp)
        if self.pp_schedule == "interleaved-1f1b" and microbatches % rounds:
            return f"interleaved-1f1b needs a multiple of its rounds (micro-batches // parallel.pp = {rounds})"
        return ""

    def ac_every(self) -> int:
        """Checkpoint every k-th block's activations; 0 means none."""
        a = self.activation_checkpoint
        if a in ("none", "full"):
            return {"none": 0, "full": 1}[a]
        k = a.removeprefix("every-")
        if not (a.startswith("every-") and k.isdigit() and int(k) >= 1):
            raise ConfigError(f"parallel.activation_checkpoint: {a!r} is not valid; valid: none, full, every-K (K >= 1)")
        return int(k)

    def reshard(self) -> bool | int:
        r = self.reshard_after_forward.lower()
        if r in ("true", "false"):
            return r == "true"
        if not (r.isdigit() and int(r) >= 1):
            raise ConfigError(f"parallel.reshard_after_forward: {r!r} is not valid; valid: true, false, or a group size N >= 1")
        return int(r)

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("pp", "dp_replicate", "dp_shard", "tp")]
        return " x ".join(parts)


TUNE_METHODS = ["none", "lora", "prompt", "multitask-prompt", "full"]


@dataclass
class TuneConfig:
    method: str = _opt("none", "none: train on data.dir's token shards; lora, prompt (prompt tuning), "
                               "multitask-prompt (one prompt per record task) or full (every weight): tune "
                               "model.init_from's model on tune.data's records")
    data: str = _opt("", "JSONL records to tune on: {\"prompt\", \"completion\"} or {\"messages\"}, one a line")
    val_data: str = _opt("", "JSONL records for validation (unset: tune.val_fraction of tune.data)")
    val_fraction: float = _opt(0.1, "share of tune.data held out for validation when tune.val_data is unset")
    pack: bool = _opt(True, "pack short records into one row (lora, full); prompt tuning keeps one record a row")
    lora_rank: int = _opt(8, "LoRA: rank r of each update")
    lora_alpha: float = _opt(16.0, "LoRA: the update is scaled by alpha / r (alpha / sqrt(r) with tune.rslora)")
    lora_dropout: float = _opt(0.0, "LoRA: dropout on the update's input while training")
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj,gate,fc,proj",
                             "LoRA: comma-separated layer names or globs over their paths (e.g. q_proj,v_proj or "
                             "attn.*); default every attention and MLP projection")
    rslora: bool = _opt(False, "LoRA: rank-stabilised scaling, alpha / sqrt(r)")
    base_dtype: str = _opt("fp32", "LoRA and prompt tuning: the frozen base's weights in fp32 or bf16 (half "
                                   "the memory; the trained parameters stay fp32)")
    virtual_tokens: int = _opt(20, "prompt tuning: learned embeddings put before every input")
    prompt_init: str = _opt("", "prompt tuning: a text whose token embeddings start the virtual tokens (unset: "
                                "embeddings of random vocabulary tokens)")
    prompt_from: str = _opt("", "prompt tuning: an adapter directory (a multitask run's, say) whose shared prompt "
                                "starts the virtual tokens: a new task begins from what others learned")
    task_rank: int = _opt(1, "multitask-prompt: rank of each task's factor (cols @ rows) of the shared prompt")

    def validate(self) -> None:
        _choice("tune.method", self.method, TUNE_METHODS)
        _choice("tune.base_dtype", self.base_dtype, ["fp32", "bf16"])
        _range("tune.val_fraction", self.val_fraction, 0.0, 0.5)
        _range("tune.lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.lora_rank < 1:
            raise ConfigError(f"tune.lora_rank: must be >= 1, got {self.lora_rank}")
        if self.task_rank < 1:
            raise ConfigError(f"tune.task_rank: must be >= 1, got {self.task_rank}")
        if self.virtual_tokens < 1:
            raise ConfigError(f"tune.virtual_tokens: must be >= 1, got {self.virtual_tokens}")
        if self.method != "none" and not self.data:
            raise ConfigError(f"tune.data: tune.method={self.method} needs a JSONL file of records")
        if self.method == "none" and (self.data or self.val_data):
            raise ConfigError("tune.data: set tune.method (lora, prompt or full) to tune on records")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            for sf in dataclasses.fields(section):
                v = getattr(section, sf.name)
                # NaN passes every comparison-based range check below, and inf most of them.
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{f.name}.{sf.name}: must be a finite number, got {v}")
            section.validate()
        t, par = self.train, self.parallel
        if self.tune.method != "none":
            if not self.model.init_from:
                raise ConfigError(f"model.init_from: tune.method={self.tune.method} tunes a trained model: name its "
                                  "run directory (`stoker train` or `stoker import` writes one)")
            if self.tune.method != "full" and par.pp > 1:
                raise ConfigError(f"parallel.pp: tune.method={self.tune.method} runs without pipeline stages; use "
                                  "DDP or FSDP (parallel.dp_replicate, parallel.dp_shard)")
        preset = PRESETS[self.model.preset]
        n_head = self.model.n_head or preset.n_head
        n_layer = self.model.n_layer or preset.n_layer
        if n_head % par.tp:
            raise ConfigError(f"parallel.tp: {par.tp} does not divide the number of heads {n_head} (model.n_head)")
        kv_heads = preset.arch.get("n_kv_head") if not self.model.n_head else None
        if kv_heads and kv_heads % par.tp:
            raise ConfigError(f"parallel.tp: {par.tp} does not divide the preset's {kv_heads} key/value heads")
        if par.tp > 1 and t.seq_len % par.tp:
            raise ConfigError(f"parallel.tp: {par.tp} does not divide train.seq_len {t.seq_len} "
                              "(sequence parallel splits the sequence across the tp ranks)")
        r = par.reshard()
        if r is not True and r is not False and (r >= par.dp_shard or par.dp_shard % r):
            raise ConfigError(f"parallel.reshard_after_forward: a group size must divide parallel.dp_shard "
                              f"{par.dp_shard} and be smaller than it, got {r}")
        if par.n_stages > n_layer:
            raise ConfigError(
                f"parallel.pp: {par.pp} ranks x {par.n_stages // par.pp} stage(s) each = {par.n_stages} pipeline "
                f"stages, more than the {n_layer} layers (model.n_layer); every stage needs a layer"
            )
        if t.batch_size % par.dp:
            raise ConfigError(
                f"train.batch_size: {t.batch_size} is not divisible by the data-parallel size "
                f"{par.dp} (parallel.dp_replicate x parallel.dp_shard)"
            )
        local = t.batch_size // par.dp
        if par.pp > 1:
            if par.pp_microbatches and local % par.pp_microbatches:
                raise ConfigError(
                    f"parallel.pp_microbatches: {par.pp_microbatches} does not divide the per-replica batch {local} "
                    f"(train.batch_size {t.batch_size} / data-parallel size {par.dp})"
                )
            n = self.batch_split().count
            if problem := par.schedule_problem(n):
                if par.pp_microbatches:
                    raise ConfigError(f"parallel.pp_microbatches: {n} does not fit parallel.pp_schedule: {problem}")
                raise ConfigError(f"train.batch_size: no count of micro-batches dividing the per-replica batch {local} "
                                  f"fits parallel.pp_schedule ({problem}); change the batch size or the schedule")
        return self

    def batch_split(self) -> BatchSplit:
        """How each data-parallel replica cuts its share of the batch. train.micro_batch_size is
        an upper bound rather than a divisor, so that one config runs under any layout whose
        data-parallel size divides train.batch_size."""
        t, par = self.train, self.parallel
        local, cap = t.batch_size // par.dp, t.micro_batch_size
        if par.pp == 1:
            micro = max(d for d in _divisors(local) if d <= (cap or local))
            note = (f"train.micro_batch_size={cap}: micro-batches of {micro}, the largest size up to it that "
                    f"divides the per-process batch {local}") if cap and micro != cap else ""
            return BatchSplit(local, micro, local // micro, note)
        if par.pp_microbatches:
            n = par.pp_microbatches
            note = (f"train.micro_batch_size={cap} ignored: parallel.pp_microbatches={n} sets the pipeline's "
                    f"micro-batches ({n} of {local // n})") if cap else ""
            return BatchSplit(local, local // n, n, note)
        # Enough micro-batches to keep every stage busy; with the default, enough that the
        # pipeline's fill and drain are a small part of the step.
        least = max(par.n_stages, -(-local // cap)) if cap else 2 * par.n_stages
        n = next((d for d in _divisors(local) if d >= least and not par.schedule_problem(d)), local)
        note = "" if not cap or n * cap == local else (
            f"train.micro_batch_size={cap}: the pipeline runs {n} micro-batches of {local // n}, the fewest "
            f"(at least one per stage) that divide the per-replica batch {local}")
        return BatchSplit(local, local // n, n, note)

    def to_dict(self) -> dict[str, Any]:
        return {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """The config as TOML that `load_config` reads back to an equal config."""
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


@dataclass(frozen=True)
class BatchSplit:
    """One data-parallel replica's share of a step's batch, cut into micro-batches."""
    local: int  # sequences per replica: train.batch_size / data-parallel size
    micro: int  # sequences per forward pass (per pipeline micro-batch with a pipeline)
    count: int  # local / micro: gradient-accumulation passes, or the pipeline's micro-batches
    note: str = ""  # where train.micro_batch_size was not taken as given: what was used instead


def config_help() -> str:
    """Every config key with its default and meaning, one per line, from the dataclasses."""
    rows = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory):
            rows.append((f"{sec.name}.{f.name} = {_toml_value(f.default)}", f.metadata["help"]))
    width = max(len(k) for k, _ in rows)
    wrap = textwrap.TextWrapper(width=100, subsequent_indent=" " * (width + 4))
    return "\n".join(wrap.fill(f"  {k:<{width}}  {h}") for k, h in rows)


def _toml_value(v: Any) -> str:
    if v is None:
        return "(unset)"
    return tomli_w.dumps({"v": v}).partition(" = ")[2].strip()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choice(name: str, value: Any, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}: {value!r} is not valid; valid: {', '.join(valid)}")


def _range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: must be between {lo} and {hi}, got {value}")


def _field_type(section: Any, name: str) -> type:
    hint = typing.get_type_hints(type(section))[name]
    if isinstance(hint, types.UnionType):  # `int | None`
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(key: str, typ: type, value: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or fail naming the key."""
    tname = typ.__name__
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {tname}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, (bool, int)):  # `reshard_after_forward = true` in TOML
        return str(value).lower()
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tname}, got {type(value).__name__} {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    sections = [f.name for f in dataclasses.fields(cfg)]
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown field {key!r}; fields are <section>.<name> with section one of {', '.join(sections)}")
    section = getattr(cfg, parts[0])
    names = [f.name for f in dataclasses.fields(section)]
    if parts[1] not in names:
        raise ConfigError(f"unknown field {key!r}; valid in [{parts[0]}]: {', '.join(names)}")
    setattr(section, parts[1], _coerce(key, _field_type(section, parts[1]), value))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file, then overrides (`section.key=value` strings or a dict); validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        for sec, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"unknown field {sec!r} in {str(p)!r}; expected a [section] table")
            for k, v in values.items():
                _set(cfg, f"{sec}.{k}", v)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides or [])
    for k, v in items:
        _set(cfg, k, v)
    return cfg.validate()


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.removeprefix("--").partition("=")
    if not sep:
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    return key, value
