"""A compact decoder-only transformer: pre-norm, causal SDPA attention, GELU MLP, tied embeddings.

This file knows nothing about parallelism; stoker.parallel applies it from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.models.presets import PRESETS


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_embd: int = 32
    n_head: int = 4
    vocab_size: int = 8192
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        p = PRESETS[name]
        kw = dict(n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head, vocab_size=p.vocab_size, block_size=p.block_size)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        # Separate q/k/v projections (rather than one fused qkv) so a column-wise split of each
        # gives every tensor-parallel rank whole heads.
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # Heads are inferred (-1) so a tensor-parallel shard, holding n_head / tp heads, runs unchanged.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed by layer index (not a ModuleList) so that a pipeline stage can delete
        # the blocks it does not own and the rest keep their names, hence their checkpoint keys.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the token embedding; call again after `to_empty`,
        which gives each module its own fresh storage and so unties them."""
        self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialisation; residual projections scaled by 1/sqrt(2 * n_layer)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                if name.endswith("lm_head"):
                    continue  # tied to wte
                s = resid_std if name.endswith(("o_proj", "mlp.proj")) else std
                nn.init.normal_(mod.weight, 0.0, s, generator=gen)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std, generator=gen)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V).

        A pipeline stage is this module with some parts set to None (stoker.parallel.pipeline):
        a stage without position embeddings takes hidden states (B, T, C) instead of ids, and
        one without the head returns hidden states. (The last stage keeps `wte` only as its
        tied head, so `wpe` is what marks the first.)
        """
        if self.wpe is not None:
            B, T = idx.shape
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
            pos = torch.arange(T, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        else:
            x = idx
        for block in self.blocks.values():
            x = block(x)
        if self.lm_head is None:
            return x
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (B, T, V), targets (B, T). Computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def count_params(cfg: GPTConfig) -> int:
    """Parameter count (tied weights once), built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores.

    N counts every weight used in a matmul: position embeddings are a lookup and are left out,
    the tied token embedding is counted once since it is the output projection. Attention adds
    6 * n_layer * seq_len * n_embd * 2 (QK^T and AV, forward and backward; Kaplan et al. 2020 /
    PaLM appendix B), without halving for the causal mask, as MFU is conventionally reported.
    """
    n = count_params(cfg) - cfg.block_size * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * seq_len * cfg.n_embd
