"""LoRA: a frozen linear layer plus a trained low-rank update (Hu et al., 2021).

    y = x W^T + b + s * dropout(x) A^T B^T,   A (r, in), B (out, r), s = alpha / r
    (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, as PEFT does, so a new adapter leaves the model as it
was. LoRALinear is an nn.Linear (its weight and bias keep their names, so a base checkpoint
loads into it) with lora_A and lora_B beside them.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

# stoker's linear layers that LoRA may wrap (the head and embeddings are not among them)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "fc", "proj")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype=None):
        """The base weight and bias are made on `device` in `dtype`; lora_A and lora_B there in
        fp32 (they are what trains; the forward pass casts them to the input's dtype)."""
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"LoRA rank: must be >= 1, got {rank}")
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_lora(seed=None)

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
             seed: int | None = None) -> "LoRALinear":
        """A LoRA layer around `base`'s own weight and bias parameters (nothing copied)."""
        lora = cls(base.in_features, base.out_features, False, rank, alpha, dropout, rslora, device="meta")
        lora.weight, lora.bias = base.weight, base.bias
        dev = base.weight.device
        lora.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        lora.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=dev))
        lora.reset_lora(seed)
        return lora

    def reset_lora(self, seed: int | None) -> None:
        """A as PEFT draws it (Kaiming uniform, a = sqrt(5)), B zero."""
        if self.lora_A.device.type == "meta":
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_ with a = sqrt(5)
            self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=gen))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type) \
            else self.weight.to(x.dtype)  # a base held in bf16 under fp32 compute
        y = F.linear(x, w, self.bias if self.bias is None or self.bias.dtype == w.dtype else self.bias.to(w.dtype))
        a = self.lora_A if self.lora_A.dtype == x.dtype else self.lora_A.to(x.dtype)
        b = self.lora_B if self.lora_B.dtype == x.dtype else self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the weight, s * B @ A, (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}"


def _targets(patterns: str | list[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",")]
    pats = [p for p in patterns if p]
    if not pats:
        raise ValueError("LoRA targets: give at least one module name or pattern (e.g. q_proj,v_proj or attn.*)")
    return pats


def matches(name: str, patterns: list[str]) -> bool:
    """A module path ("blocks.3.attn.q_proj") against patterns: each a glob over the whole path
    or its end ("q_proj", "attn.*", "blocks.1[01].mlp.fc")."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def apply_lora(model: nn.Module, targets: str | list[str], rank: int, alpha: float, dropout: float = 0.0,
               rslora: bool = False, seed: int = 0) -> list[str]:
    """Wrap the model's linear layers that `targets` names with LoRA, in place, keeping their
    weights; freeze every parameter but the new lora_A, lora_B. Returns the wrapped paths;
    ValueError when none match (the message lists what could)."""
    pats = _targets(targets)
    found = [(name, mod) for name, mod in model.named_modules()
             if type(mod) is nn.Linear and name.rsplit(".", 1)[-1] in LORA_TARGETS and matches(name, pats)]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear} & set(LORA_TARGETS))
        raise ValueError(f"LoRA targets {','.join(pats)} match no linear layer; this model has {', '.join(names)} "
                         "in every block (patterns may name a path too, e.g. blocks.0.attn.q_proj or attn.*)")
    for p in model.parameters():
        p.requires_grad_(False)
    for k, (name, mod) in enumerate(found):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoRALinear.wrap(mod, rank, alpha, dropout, rslora, seed * 100_003 + k))
    return [name for name, _ in found]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put plain nn.Linear layers back, in
    place; the model then computes what it did with the adapter. Returns how many merged."""
    layers = lora_layers(model)
    for name, m in layers.items():
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter((m.weight.float() + m.delta()).to(m.weight.dtype), requires_grad=True)
        plain.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone())
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], plain)
    return len(layers)
