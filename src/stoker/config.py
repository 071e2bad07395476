"""Configuration: one dataclass per component, composed by a root `Config`.

Loaded from TOML, overridden with dotted options (`--train.lr=3e-4`), validated so that a
bad field ends with one line naming it and what would be valid.
"""

from __future__ import annotations

import dataclasses
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


@dataclass
class ModelConfig:
    preset: str = "debug"
    # Optional overrides of the preset's shape; unset means the preset's value.
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        _choice("model.preset", self.preset, list(PRESETS))
        for name in ("n_layer", "n_embd", "n_head"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {v}")
        _range("model.dropout", self.dropout, 0.0, 1.0)


@dataclass
class DataConfig:
    dir: str = "data/stdlib"

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("data.dir: must name a directory written by `stoker prepare`")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global, in sequences
    micro_batch_size: int = 0  # per process and forward pass; 0 means batch_size / data-parallel size
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    decay_steps: int = 0  # length of the cosine decay; 0 means train.steps (set it to extend a run later)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    dtype: str = "fp32"
    device: str = "auto"
    out_dir: str = "runs/default"
    ckpt_every: int = 100  # 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 2
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 4
    log_every: int = 1
    progress: bool = True
    compile: bool = False  # torch.compile each transformer block

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
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be one of auto, cpu, cuda, got {self.device!r}")
        if not self.out_dir:
            raise ConfigError("train.out_dir: must not be empty")


PP_SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b"]


@dataclass
class ParallelConfig:
    # The mesh is (pp, dp_replicate, dp_shard, tp), tp innermost: its collectives are the most
    # frequent, so it should span the fastest links (one node); dp_replicate spans the slowest.
    dp_replicate: int = 1  # DDP replicas (or HSDP replica groups when dp_shard > 1)
    dp_shard: int = 1  # FSDP2 shards
    tp: int = 1  # tensor parallel (DTensor, with sequence parallel on the norms)
    pp: int = 1  # pipeline stages' ranks (torch.distributed.pipelining)
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # 0: 2 x the number of stages
    pp_stages_per_rank: int = 2  # virtual stages per rank, interleaved-1f1b only
    activation_checkpoint: str = "none"  # none | full | every-K (every K-th block)
    # FSDP2 knobs: "true" frees gathered parameters after forward (least memory, gathers again
    # in backward), "false" keeps them (no second all-gather), an int N re-shards to groups of
    # N ranks (a second gather stays inside a node).
    reshard_after_forward: str = "true"
    fsdp_prefetch: int = 1  # blocks whose all-gather is issued ahead, forward and backward
    param_dtype: str = "auto"  # FSDP compute dtype of gathered params; auto: train.dtype
    reduce_dtype: str = "fp32"  # FSDP gradient reduce-scatter dtype

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

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def n_stages(self) -> int:
        return self.pp * (self.pp_stages_per_rank if self.pp_schedule == "interleaved-1f1b" else 1)

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or 2 * self.n_stages

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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        t, par = self.train, self.parallel
        preset = PRESETS[self.model.preset]
        n_head = self.model.n_head or preset.n_head
        n_layer = self.model.n_layer or preset.n_layer
        if n_head % par.tp:
            raise ConfigError(f"parallel.tp: {par.tp} does not divide the number of heads {n_head} (model.n_head)")
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
            if local % par.microbatches:
                raise ConfigError(
                    f"parallel.pp_microbatches: {par.microbatches} does not divide the per-replica batch {local} "
                    f"(train.batch_size {t.batch_size} / data-parallel size {par.dp})"
                )
            if t.micro_batch_size and t.micro_batch_size != local // par.microbatches:
                raise ConfigError("train.micro_batch_size: with parallel.pp > 1 the pipeline's micro-batches are "
                                  "set by parallel.pp_microbatches; leave train.micro_batch_size at 0")
        elif t.micro_batch_size and local % t.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size: {t.micro_batch_size} does not divide the per-process batch {local} "
                f"(train.batch_size {t.batch_size} / data-parallel size {par.dp})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in dataclasses.asdict(self).items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_dict()))


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
