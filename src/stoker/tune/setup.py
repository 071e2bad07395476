"""What `stoker train` does differently with tune.method set: records as data, the base
model of model.init_from, its adapter applied and the rest frozen, the adapter written in
PEFT's format beside each checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stoker.config import Config, ConfigError
from stoker.data.tokenizer import Tokenizer
from stoker.tune.records import RecordError, RecordRows, read_records, split

ADAPTER_DIR = "adapter"  # in the run directory: the latest checkpoint's adapter, PEFT's format


def is_adapter_key(name: str) -> bool:
    """State-dict keys an adapter adds to a base model (absent from the base's checkpoint)."""
    return ".lora_" in name or name.startswith("prompt.")


PROMPT_METHODS = ("prompt", "multitask-prompt")


def add_adapter(model: nn.Module, cfg: Config, text_ids: list[int] | None = None, tasks: list[str] | None = None,
                start: torch.Tensor | None = None) -> None:
    """The adapter cfg.tune describes, new, on `model`, the rest frozen (nothing for full
    fine-tuning); a tuning run's checkpoint then loads into it. tasks: a multitask prompt's
    task names (the run's checkpoint keeps them)."""
    t = cfg.tune
    if t.method == "lora":
        from stoker.tune.lora import apply_lora

        try:
            apply_lora(model, t.lora_targets, t.lora_rank, t.lora_alpha, t.lora_dropout, t.rslora, seed=cfg.train.seed)
        except ValueError as e:
            raise ConfigError(f"tune.lora_targets: {e}") from None
    elif t.method in PROMPT_METHODS:
        from stoker.tune.prompt import apply_prompt

        try:
            apply_prompt(model, t.virtual_tokens, text_ids, seed=cfg.train.seed, start=start, task_rank=t.task_rank,
                         tasks=(tasks or [""]) if t.method == "multitask-prompt" else None)
        except ValueError as e:
            raise ConfigError(f"tune.prompt_from: {e}") from None
    if t.method != "full" and t.base_dtype == "bf16":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)


class Tuning:
    """The records and the adapter of a tuning run (cfg.tune.method != "none")."""

    def __init__(self, cfg: Config):
        self.cfg, t = cfg, cfg.tune
        base = Path(cfg.model.init_from)
        if not (base / "model.json").is_file():
            raise ConfigError(f"model.init_from: {base} is not a run directory (no model.json); `stoker train` or "
                              "`stoker import` writes one")
        try:
            self.tok = Tokenizer.load(base)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.init_from: {base}: no usable tokenizer ({e})") from None
        self.virtual = t.virtual_tokens if t.method in PROMPT_METHODS else 0
        rows = cfg.train.seq_len + 1
        try:
            examples, tasks = read_records(t.data, self.tok, rows)
            if t.val_data:
                train, (val, _) = examples, read_records(t.val_data, self.tok, rows, tasks)
            else:
                train, val = split(examples, t.val_fraction, cfg.train.seed)
            pack = t.pack and t.method in ("lora", "full")
            self.train_rows = RecordRows(train, cfg.train.seq_len, self.tok.eot_id, pack)
            self.val_rows = RecordRows(val, cfg.train.seq_len, self.tok.eot_id, pack)
        except RecordError as e:
            raise ConfigError(f"tune.data: {e}") from None
        self.examples = (len(train), len(val))
        self.tasks = tasks if t.method == "multitask-prompt" else None
        self.text_ids = self.tok.encode(t.prompt_init) if t.prompt_init else None
        self.start = None
        if t.prompt_from:
            from stoker.tune.adapters import read_adapter

            self.start = read_adapter(t.prompt_from)[1].get("prompt_embeddings")
            if self.start is None:
                raise ConfigError(f"tune.prompt_from: {t.prompt_from} holds no prompt_embeddings (not a prompt adapter)")

    def check(self, block_size: int) -> None:
        if self.virtual + self.cfg.train.seq_len > block_size:
            raise ConfigError(f"tune.virtual_tokens: {self.virtual} virtual tokens + train.seq_len "
                              f"{self.cfg.train.seq_len} exceed the model's context of {block_size}")

    def apply(self, model: nn.Module) -> None:
        """Add this run's adapter to a freshly built model (on any device, meta included)."""
        add_adapter(model, self.cfg, self.text_ids, self.tasks, self.start)

    def save(self, model: nn.Module, out: Path, is_main: bool) -> None:
        """The adapter of `model` (unwrapped) to out/adapter; collective under FSDP (every rank
        calls it), rank 0 writes."""
        if self.cfg.tune.method == "full":
            return
        from stoker.tune.adapters import save_adapter

        save_adapter(model, out / ADAPTER_DIR, base=str(Path(self.cfg.model.init_from).resolve()), write=is_main)
