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


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # DDP replicas (or HSDP replica groups when dp_shard > 1)
    dp_shard: int = 1  # FSDP2 shards

    def validate(self) -> None:
        for name in ("dp_replicate", "dp_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        t = self.train
        if t.batch_size % self.parallel.dp:
            raise ConfigError(
                f"train.batch_size: {t.batch_size} is not divisible by the data-parallel size "
                f"{self.parallel.dp} (parallel.dp_replicate x parallel.dp_shard)"
            )
        local = t.batch_size // self.parallel.dp
        if t.micro_batch_size and local % t.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size: {t.micro_batch_size} does not divide the per-process batch {local} "
                f"(train.batch_size {t.batch_size} / data-parallel size {self.parallel.dp})"
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
