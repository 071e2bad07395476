"""Adapters in PEFT's file format, both ways: `adapter_config.json` and
`adapter_model.safetensors`, tensor names those of the base model as `stoker export --format hf`
writes it, so `peft.PeftModel.from_pretrained(<exported base>, <adapter dir>)` computes what
stoker does, and an adapter PEFT made for such a base loads into stoker.

LoRA on GPT-2: Hugging Face's GPT-2 fuses q, k and v into one `attn.c_attn` layer, stoker
keeps three. Three rank-r updates of q, k, v are one update of c_attn of rank 3r (their A
stacked, their B block-diagonal), written with that rank and alpha scaled to keep the same
scaling (`rank_pattern`, `alpha_pattern`); a c_attn update of rank r comes in as three of rank
r sharing A. Both ways are exact.

Only safetensors files are read (never pickle); nothing from the adapter directory runs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from stoker.config import ConfigError
from stoker.models.gpt import GPT
from stoker.models.hf import family
from stoker.tune.lora import LoRALinear, lora_layers
from stoker.tune.prompt import PromptTuning

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TASKS = "stoker_tasks.json"  # a multitask prompt's task names, by id
PREFIX = "base_model.model."
_QKV = ("q_proj", "k_proj", "v_proj")
# stoker's name inside a block -> Hugging Face's, per family (GPT-2's q/k/v: attn.c_attn, fused)
_LLAMA = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
          "attn.o_proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.fc": "mlp.up_proj",
          "mlp.proj": "mlp.down_proj"}
_GPT2 = {"attn.o_proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def _block(kind: str, i: str) -> str:
    return f"model.layers.{i}" if kind == "llama" else f"transformer.h.{i}"


def lora_state(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's LoRA updates as PEFT's tensors and config fields (fp32 tensors)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    kind = family(model.cfg)
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha, m.rslora) != (first.rank, first.alpha, first.rslora) for m in layers.values()):
        raise ValueError("LoRA layers differ in rank, alpha or rsLoRA; PEFT's format takes one of each")
    r, alpha = first.rank, first.alpha
    out, targets, ranks, alphas = {}, set(), {}, {}
    by_block: dict[str, dict[str, LoRALinear]] = {}
    for name, m in layers.items():
        _, i, rest = name.split(".", 2)
        by_block.setdefault(i, {})[rest] = m
    for i, mods in by_block.items():
        base = PREFIX + _block(kind, i)
        for rest, m in mods.items():
            if kind == "gpt2" and rest.split(".")[-1] in _QKV:
                continue
            hf = (_LLAMA if kind == "llama" else _GPT2)[rest]
            out[f"{base}.{hf}.lora_A.weight"] = _whole(m.lora_A)
            out[f"{base}.{hf}.lora_B.weight"] = _whole(m.lora_B)
            targets.add(hf)
        qkv = [mods.get(f"attn.{p}") for p in _QKV]
        present = [(j, m) for j, m in enumerate(qkv) if m is not None]
        if kind == "gpt2" and present:
            C = present[0][1].in_features
            n = len(present)
            A = torch.cat([_whole(m.lora_A) for _, m in present])  # (n r, C)
            B = torch.zeros(3 * C, n * r)
            for t, (j, m) in enumerate(present):
                B[j * C:(j + 1) * C, t * r:(t + 1) * r] = _whole(m.lora_B)
            out[f"{base}.attn.c_attn.lora_A.weight"], out[f"{base}.attn.c_attn.lora_B.weight"] = A, B
            targets.add("attn.c_attn")
            if n > 1:  # rank n r; alpha so that alpha / r (or / sqrt(r)) stays as it was
                key = re.escape(f"{_block(kind, i)}.attn.c_attn")
                ranks[key] = n * r
                alphas[key] = alpha * (math.sqrt(n) if first.rslora else n)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "lora_dropout": first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0,
           "target_modules": sorted(targets), "use_rslora": first.rslora, "bias": "none",
           "fan_in_fan_out": kind == "gpt2", "rank_pattern": ranks, "alpha_pattern": alphas,
           "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}
    return out, cfg


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value, fp32 on the CPU (a sharded DTensor gathered: collective)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu()


def save_adapter(model: GPT, out: str | Path, base: str = "", extra: dict | None = None, write: bool = True) -> Path:
    """Write the model's adapter (LoRA or prompt tuning) to directory `out` in PEFT's format.
    A sharded model's ranks all call it (the tensors are gathered); only `write` ones write."""
    out = Path(out)
    tasks = None
    if model.prompt is not None:
        p: PromptTuning = model.prompt
        tensors = {"prompt_embeddings": _whole(p.embedding)}
        cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": p.n_tokens,
               "token_dim": model.cfg.n_embd, "num_transformer_submodules": 1, "num_attention_heads": model.cfg.n_head,
               "num_layers": model.cfg.n_layer, "prompt_tuning_init": "RANDOM", "inference_mode": True}
        if p.n_tasks:
            tensors |= {"prefix_task_cols": _whole(p.task_cols), "prefix_task_rows": _whole(p.task_rows)}
            cfg |= {"peft_type": "MULTITASK_PROMPT_TUNING", "num_tasks": p.n_tasks, "num_ranks": p.task_cols.size(2)}
            tasks = p.task_names
    else:
        tensors, cfg = lora_state(model)
    cfg = {**cfg, "base_model_name_or_path": base, "revision": None, **(extra or {})}
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(cfg, indent=1))
    if tasks is not None:  # which task id is which: PEFT takes ids, records name tasks
        (out / TASKS).write_text(json.dumps(tasks))
    return out


def read_adapter(src: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors; ConfigError for what is not one (or would
    need unpickling: adapter_model.bin is refused)."""
    src = Path(src)
    if not (src / CONFIG).is_file():
        raise ConfigError(f"{src}: no {CONFIG}; not a PEFT adapter directory")
    if not (src / WEIGHTS).is_file():
        extra = " (adapter_model.bin is a pickle, which stoker never loads; save it with safe_serialization)" \
            if (src / "adapter_model.bin").is_file() else ""
        raise ConfigError(f"{src}: no {WEIGHTS}{extra}")
    try:
        cfg = json.loads((src / CONFIG).read_text())
        tensors = load_file(str(src / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or hostile file among them
        raise ConfigError(f"{src}: not a readable adapter ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{src / CONFIG}: not a JSON object")
    return cfg, tensors


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_prompt(model: GPT, src: str | Path, cfg: dict | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> PromptTuning:
    """A prompt-tuning adapter (multitask too) as a PromptTuning of fp32 tensors on the CPU,
    checked against the model's width; ConfigError for one that does not fit."""
    if cfg is None or tensors is None:
        cfg, tensors = read_adapter(src)
    c = model.cfg
    emb = tensors.get("prompt_embeddings")
    if emb is None or emb.dim() != 2 or emb.size(1) != c.n_embd:
        raise ConfigError(f"{src}: prompt_embeddings of shape {None if emb is None else tuple(emb.shape)} do not "
                          f"fit this model (width {c.n_embd})")
    cols, rows = tensors.get("prefix_task_cols"), tensors.get("prefix_task_rows")
    n_tasks = 0
    if cfg.get("peft_type") == "MULTITASK_PROMPT_TUNING":
        if cols is None or rows is None or cols.dim() != 3 or rows.dim() != 3 or cols.shape[:2] != (
                rows.size(0), emb.size(0)) or rows.shape[1:] != (cols.size(2), c.n_embd):
            raise ConfigError(f"{src}: prefix_task_cols and prefix_task_rows missing or of mismatched shapes")
        n_tasks = cols.size(0)
    prompt = PromptTuning(emb.size(0), c.n_embd, n_tasks=n_tasks, task_rank=cols.size(2) if n_tasks else 1)
    with torch.no_grad():
        prompt.embedding.copy_(emb)
        if n_tasks:
            prompt.task_cols.copy_(cols)
            prompt.task_rows.copy_(rows)
    if n_tasks:
        try:
            names = json.loads((Path(src) / TASKS).read_text()) if (Path(src) / TASKS).is_file() else None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{src}: {TASKS} is not readable JSON ({e})") from None
        ok = isinstance(names, list) and len(names) == n_tasks and all(isinstance(n, str) for n in names)
        prompt.task_names = names if ok else [str(i) for i in range(n_tasks)]  # PEFT's own: task ids
    return prompt


def read_lora(model: GPT, src: str | Path, cfg: dict | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA adapter as stoker's layers see it: {layer path ("blocks.3.attn.q_proj"): (A (r, in),
    B (out, r), scaling)}, fp32, checked against the model's layer shapes (a model on the meta
    device will do); ConfigError for what does not fit or is not supported."""
    if cfg is None or tensors is None:
        cfg, tensors = read_adapter(src)
    kind, c = family(model.cfg), model.cfg
    for key, ok in (("bias", "none"), ("use_dora", False), ("modules_to_save", None)):
        if cfg.get(key, ok) not in (ok, [], None if ok is None else ok):
            raise ConfigError(f"{src}: {key} = {cfg[key]!r} is not supported (stoker's LoRA: bias none, no DoRA, "
                              "no modules_to_save)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name.removeprefix(PREFIX))
        if m is None:
            raise ConfigError(f"{src}: tensor {name!r} is not a LoRA A or B weight stoker can load")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t.float()
    hf_to_st = {hf: st for st, hf in (_LLAMA if kind == "llama" else _GPT2).items()}
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{src}: {path} has lora_{'A' if 'A' in ab else 'B'} without its other half")
        lm = re.fullmatch(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.+)", path)
        if lm is None or int(lm.group(1)) >= c.n_layer:
            raise ConfigError(f"{src}: {path} is not a layer of this {kind} model ({c.n_layer} blocks)")
        i, hf = lm.groups()
        A, B = ab["A"], ab["B"]
        r = A.size(0)
        alpha = float(_pattern(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", 8)))
        scaling = lora_scaling(cfg, r, alpha)
        if _pattern(cfg.get("rank_pattern"), path, r) != r:
            raise ConfigError(f"{src}: {path} holds rank {r}, its config says {_pattern(cfg['rank_pattern'], path, r)}")
        if kind == "gpt2" and hf == "attn.c_attn":
            parts = [(f"attn.{p}", B[k * c.n_embd:(k + 1) * c.n_embd]) for k, p in enumerate(_QKV)]
        elif hf in hf_to_st:
            parts = [(hf_to_st[hf], B)]
        else:
            raise ConfigError(f"{src}: {path}: LoRA on {hf!r} is not supported (stoker wraps "
                              f"{', '.join(sorted(hf_to_st) + (['attn.c_attn'] if kind == 'gpt2' else []))})")
        for st, b in parts:
            layer = model.get_submodule(f"blocks.{i}.{st}")
            if A.size(1) != layer.in_features or b.size(0) != layer.out_features or b.size(1) != r:
                raise ConfigError(f"{src}: {path}: A {tuple(A.shape)} and B {tuple(b.shape)} do not fit "
                                  f"a {layer.out_features} x {layer.in_features} layer")
            a = A
            if len(parts) > 1:  # a slice of a fused update: its all-zero columns of B (and their
                keep = b.any(dim=0)  # rows of A) do nothing, so q, k, v written as rank 3r come back as r
                if 0 < int(keep.sum()) < r:
                    a, b = A[keep], b[:, keep]
            out[f"blocks.{i}.{st}"] = (a, b, scaling)
    return out


def lora_scaling(cfg: dict, rank: int, alpha: float) -> float:
    """PEFT's scaling of a rank-r update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora", False) else rank)


def apply_adapter(model: GPT, src: str | Path) -> str:
    """Load a PEFT adapter into a stoker GPT, in place: LoRA layers or prompt tuning, the base
    frozen. Returns its peft_type. ConfigError for an adapter that does not fit the model."""
    cfg, tensors = read_adapter(src)
    ptype = cfg.get("peft_type")
    if ptype in ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"):
        prompt = read_prompt(model, src, cfg, tensors).to(model.wte.weight.device)
        for p in model.parameters():
            p.requires_grad_(False)
        model.prompt = prompt
        return ptype
    if ptype != "LORA":
        raise ConfigError(f"{src}: peft_type {ptype!r} is not supported; stoker loads LORA and PROMPT_TUNING")
    rslora, dropout = bool(cfg.get("use_rslora", False)), float(cfg.get("lora_dropout", 0.0))
    for path, (A, B, scaling) in read_lora(model, src, cfg, tensors).items():
        rank = A.size(0)
        alpha = scaling * (math.sqrt(rank) if rslora else rank)  # the same scaling at the rank it came back with
        parent_path, leaf = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        base = getattr(parent, leaf)
        if type(base) is not nn.Linear:
            raise ConfigError(f"{src}: {path}: the layer has an adapter already; load one adapter per model")
        lora = LoRALinear.wrap(base, rank, alpha, dropout, rslora)
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        setattr(parent, leaf, lora)
    trained = {id(q) for m in lora_layers(model).values() for q in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return ptype
