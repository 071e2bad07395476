"""A compact decoder-only transformer, in the GPT-2 and the Llama families.

Pre-norm blocks of causal SDPA attention and an MLP. The GPT-2 options: LayerNorm, learned
position embeddings, GELU MLP, biases, the output head tied to the token embedding. The Llama
options: RMSNorm, rotary position embeddings (with Llama 3's frequency scaling), SwiGLU MLP,
grouped-query attention (fewer key/value heads than query heads), no biases, an untied head.

`forward` runs whole sequences (training, evaluation); `forward_cached` runs new tokens against
per-sequence key/value caches (generation, serving), with the same blocks.

This file knows nothing about parallelism; stoker.parallel applies it from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.models.presets import PRESETS

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_embd: int = 32
    n_head: int = 4
    vocab_size: int = 8192
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    ffn_hidden: int | None = None  # the MLP's width; None: 4 * n_embd
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # or "swiglu"
    pos: str = "learned"  # or "rope"
    rope_theta: float = 10000.0
    # Llama 3's scaling of the rotary frequencies: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; None: plain RoPE.
    rope_scaling: dict | None = None
    tie_embeddings: bool = True

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        kw = PRESETS[name].fields()
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def __post_init__(self) -> None:
        for name, value, allowed in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS), ("pos", self.pos, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head {self.n_head} does not divide n_embd {self.n_embd}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head {self.kv_heads} does not divide n_head {self.n_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.n_embd


def rope_frequencies(cfg: GPTConfig, device=None) -> torch.Tensor:
    """The rotary angle per position step of each dimension pair, (head_dim / 2,), in fp32.

    Llama 3 scaling keeps the fast-turning pairs (wavelength under original_context /
    high_freq_factor), slows the slow ones (over original_context / low_freq_factor) by
    `factor`, and blends the two in between, linearly in original_context / wavelength.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    context = float(sc["original_max_position_embeddings"])
    turns = context * inv / (2 * math.pi)  # = original_context / wavelength
    blend = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow pair, 1: fast pair
    return inv / factor * (1 - blend) + inv * blend


def rope_tables(cfg: GPTConfig, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions `pos` (..., T): (..., T, head_dim), each angle twice (the
    two halves of a head are rotated as pairs (i, i + head_dim / 2))."""
    angles = pos.float()[..., None] * rope_frequencies(cfg, pos.device)  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the tables (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of a batch of sequences, one buffer per row, (n_layer, 2, n_kv_head,
    capacity, head_dim); a None row is padding. In a call, row r's tokens sit at positions
    starts[r], starts[r] + 1, ...; its earlier keys and values are in its buffer already.

    Attention runs row by row over exactly that row's own cached positions, so a row's
    arithmetic does not depend on which other rows share the batch (stoker.serve.engine
    relies on it for batch-invariant output)."""

    def __init__(self, buffers: list[torch.Tensor | None], starts: list[int]):
        self.buffers, self.starts = buffers, starts

    def positions(self, t: int, device) -> torch.Tensor:
        return torch.tensor(self.starts, device=device)[:, None] + torch.arange(t, device=device)  # (R, T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (R, KVH, T, D) at the rows' positions; attention of q (R, H, T, D)."""
        y = torch.zeros_like(q)
        t = q.size(2)
        gqa = q.size(1) != k.size(1)
        for r, (buf, s) in enumerate(zip(self.buffers, self.starts)):
            if buf is None:
                continue
            buf[layer, 0, :, s : s + t] = k[r]
            buf[layer, 1, :, s : s + t] = v[r]
            keys, values = buf[layer, 0, :, : s + t], buf[layer, 1, :, : s + t]
            if t == 1 or s == 0:
                y[r] = F.scaled_dot_product_attention(q[r], keys, values, is_causal=t > 1, enable_gqa=gqa)
            else:  # new tokens after cached ones: each sees the cache and the new ones up to itself
                mask = torch.arange(s + t, device=q.device)[None] <= torch.arange(s, s + t, device=q.device)[:, None]
                y[r] = F.scaled_dot_product_attention(q[r], keys, values, attn_mask=mask, enable_gqa=gqa)
        return y


class PackedKVCache:
    """New tokens of several sequences packed in one row, (1, sum of lengths): segment i holds
    lengths[i] tokens of the sequence whose buffer (as KVCache's) holds starts[i] tokens already.
    The linear layers run on every token at once; attention runs segment by segment over its
    own buffer (stoker.serve.engine's batched prefill)."""

    def __init__(self, buffers: list[torch.Tensor], starts: list[int], lengths: list[int]):
        self.buffers, self.starts, self.lengths = buffers, starts, lengths
        self.last_index = [sum(lengths[: i + 1]) - 1 for i in range(len(lengths))]  # each segment's last token

    def positions(self, t: int, device) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(self.starts, self.lengths)])[None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, o = [], 0
        for buf, s, n in zip(self.buffers, self.starts, self.lengths):
            part = slice(o, o + n)
            out.append(KVCache([buf], [s]).attend(layer, q[:, :, part], k[:, :, part], v[:, :, part]))
            o += n
        return torch.cat(out, dim=2)


class SlotKVCache:
    """Keys and values of a batch of sequences in one buffer of blocks, (n_blocks, n_layer, 2,
    R, n_kv_head, block, head_dim): row r's position i in block i // block, row r holding
    starts[r] tokens; a call adds T tokens to every row. Attention runs for all rows in one call
    per layer and block, over the blocks up to the longest row's end, shorter rows masked
    (stoker.serve.engine's throughput mode)."""

    def __init__(self, buf: torch.Tensor, starts: list[int]):
        self.buf, self.starts = buf, starts
        self._starts = torch.tensor(starts, device=buf.device)
        self._bias: torch.Tensor | None = None  # the same for every layer: made once per call

    def positions(self, t: int, device) -> torch.Tensor:
        return self._starts[:, None] + torch.arange(t, device=device)  # (R, T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        R, T = q.size(0), q.size(2)
        B = self.buf.size(5)
        pos = self.positions(T, q.device)
        rows = torch.arange(R, device=q.device)[:, None].expand(R, T)
        keys, values = self.buf[:, layer, 0], self.buf[:, layer, 1]  # (n_blocks, R, KVH, block, D)
        keys[pos // B, rows, :, pos % B] = k.transpose(1, 2)  # (R, T, KVH, D) at each row's own positions
        values[pos // B, rows, :, pos % B] = v.transpose(1, 2)
        # Only the blocks up to the longest row's end are read: attention is bound by reading
        # keys and values, and a row's capacity (prompt + max_tokens) is mostly unused early on.
        # Each block's keys are contiguous, (R x KVH) matrices of (block, D), which the batched
        # matmul needs to run at speed (a strided slice of one long buffer measured slower than
        # reading it all). Two matmuls per block and a softmax in fp32: in decode on a CPU,
        # 1.5-2x faster than SDPA with a mask. Query heads are grouped by the key/value head
        # they share, as rows of one matmul.
        H, KVH, D = q.size(1), k.size(1), q.size(3)
        g = H // KVH
        n = -(-(max(self.starts) + T) // B)
        if self._bias is None:
            allowed = torch.arange(n * B, device=q.device) <= pos[:, None, :, None]  # (R, 1, T, end)
            bias = torch.zeros(allowed.shape, device=q.device, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
            self._bias = bias.repeat(1, 1, g, 1)  # rows: (query head in group, token)
        qg = (q * D**-0.5).reshape(R * KVH, g * T, D)
        scores = torch.cat([torch.bmm(qg, keys[b].reshape(R * KVH, B, D).transpose(1, 2)) for b in range(n)], -1)
        scores = scores.view(R, KVH, g * T, n * B).add_(self._bias)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(R * KVH, g * T, n * B)
        out = torch.bmm(p[:, :, :B], values[0].reshape(R * KVH, B, D))
        for b in range(1, n):
            out.baddbmm_(p[:, :, b * B:(b + 1) * B], values[b].reshape(R * KVH, B, D))
        return out.reshape(R, H, T, D)


ATTENTION_KERNELS = ("sdpa", "matmul")


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as two batched matmuls and a softmax over the whole (T, T) score matrix:
    q (B, H, T, D), k and v (B, KVH, T, D). Twice the FLOPs of a causal flash kernel and the
    scores kept for backward, but on a CPU in bf16, at short sequences, faster than SDPA's flash
    kernel (measured by stoker.train.metrics.fastest_attention, which decides)."""
    if q.size(1) != k.size(1):  # grouped-query attention: each key/value head serves a group
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    T = q.size(2)
    bias = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-1, -2) + bias
    return torch.softmax(scores, dim=-1) @ v


def set_attention(model: nn.Module, kernel: str) -> None:
    """Run every attention layer of `model` (or a pipeline stage of it) with `kernel`:
    "sdpa" (PyTorch's fused kernels) or "matmul" (matmul_attention). Numerics differ only by
    rounding; generation with a key/value cache always uses SDPA."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel: expected one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.kernel = kernel


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        # Separate q/k/v projections (rather than one fused qkv) so a column-wise split of each
        # gives every tensor-parallel rank whole heads (and whole groups of query heads per
        # key/value head, when tp divides n_kv_head).
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.kernel = "sdpa"  # or "matmul"; see set_attention

    def forward(self, x: torch.Tensor, cache: KVCache | PackedKVCache | SlotKVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Heads are inferred (-1) so a tensor-parallel shard, holding n_head / tp heads, runs unchanged.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.cfg.pos == "rope":
            pos = cache.positions(T, x.device) if cache is not None else torch.arange(T, device=x.device)
            cos, sin = rope_tables(self.cfg, pos, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v)
        elif self.kernel == "matmul" and not (self.dropout and self.training):
            y = matmul_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1),
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))). SwiGLU: proj(silu(gate(x)) * fc(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        if getattr(self.fc, "takes_gelu", False):  # serving: GELU fused into the matmul's kernel
            return self.proj(self.fc(x, gelu=True))
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | PackedKVCache | SlotKVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), cache=cache))  # a keyword: TP's input hooks see x alone
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed by layer index (not a ModuleList) so that a pipeline stage can delete
        # the blocks it does not own and the rest keep their names, hence their checkpoint keys.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Prompt tuning (stoker.tune.prompt): a module giving (B, N, C) embeddings that go before
        # every input, at positions 0..N-1; the text follows at N.., and only its outputs return.
        self.prompt: nn.Module | None = None
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the token embedding (when the model ties them);
        call again after `to_empty`, which gives each module its own fresh storage and so
        unties them."""
        if self.cfg.tie_embeddings and self.wte is not None and self.lm_head is not None:
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
                if name.endswith("lm_head") and self.cfg.tie_embeddings:
                    continue  # tied to wte
                s = resid_std if name.endswith(("o_proj", "mlp.proj")) else std
                nn.init.normal_(mod.weight, 0.0, s, generator=gen)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std, generator=gen)
            elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        x = self.wte(idx)
        if prefix is not None:  # prompt tuning's virtual tokens; pos covers them too
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        return self.drop(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                task: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T), the mean next-token
        loss instead, computed without the whole batch's logits (linear_cross_entropy) unless
        the head is split by tensor parallelism.

        A pipeline stage is this module with some parts set to None (stoker.parallel.pipeline):
        a stage other than the first takes hidden states (B, T, C), floats, instead of ids,
        and one without the head returns hidden states. task (B,): each row's task, for a
        multitask prompt (stoker.tune.prompt).
        """
        n_virtual = 0
        if not idx.is_floating_point():
            prefix = self.prompt(idx.size(0), task) if self.prompt is not None else None
            n_virtual = prefix.size(1) if prefix is not None else 0
            T = n_virtual + idx.size(1)
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}"
                                 + f" ({n_virtual} of them virtual tokens)" * bool(n_virtual))
            x = self._embed(idx, torch.arange(T, device=idx.device), prefix)  # (B, T, C)
        else:
            x = idx
        for block in self.blocks.values():
            x = block(x)
        if n_virtual:
            x = x[:, n_virtual:]
        if self.lm_head is None:
            return x
        if targets is None:
            return self.lm_head(self.ln_f(x))  # (B, T, V)
        if hasattr(self.lm_head.weight, "device_mesh"):  # a DTensor: vocabulary-parallel logits
            return loss_fn(self.lm_head(self.ln_f(x)), targets)
        return linear_cross_entropy(self.ln_f(x), self.lm_head.weight, targets)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache | PackedKVCache | SlotKVCache, last_only: bool = False) -> torch.Tensor:
        """New tokens idx (R, T) after what each row's cache holds -> logits (R, T, V), or
        (R, 1, V) for the last token alone with last_only ((1, segments, V) with a
        PackedKVCache); the rows' keys and values are added to their caches. Padding rows give
        garbage logits."""
        pos = cache.positions(idx.size(1), idx.device)
        if int(pos.max()) >= self.cfg.block_size:
            raise ValueError(f"position {int(pos.max())} is past the context of {self.cfg.block_size} tokens")
        x = self._embed(idx, pos)
        for block in self.blocks.values():
            x = block(x, cache=cache)
        if last_only:  # each sequence's last token: the row's, or with packed rows each segment's
            x = x[:, getattr(cache, "last_index", [-1])]
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def virtual_cache(self, prompt: torch.Tensor) -> torch.Tensor:
        """Keys and values of prompt tuning's virtual tokens, prompt (N, C), at positions
        0..N-1, as forward puts them before the text: a cache buffer (n_layer, 2, KVH, N, D)
        that a sequence's own buffer starts with."""
        n = prompt.size(0)
        buf = self.new_cache_buffer(n)
        cache = KVCache([buf], [0])
        x = prompt[None].to(device=buf.device, dtype=self.wte.weight.dtype)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(n, device=buf.device))
        for block in self.blocks.values():
            x = block(x, cache=cache)
        return buf

    def new_cache_buffer(self, capacity: int) -> torch.Tensor:
        """An empty key/value buffer for one sequence of up to `capacity` tokens."""
        c, w = self.cfg, self.wte.weight
        k = next(iter(self.blocks.values())).attn.k_proj.weight
        heads = (k.to_local() if hasattr(k, "to_local") else k).size(0) // c.head_dim  # a tensor-parallel rank's own
        return torch.empty(c.n_layer, 2, heads, capacity, c.head_dim, device=w.device, dtype=w.dtype)


class PackedLinear(nn.Module):
    """An nn.Linear for inference on CPU, its weight reordered once into oneDNN's blocked
    layout. Measured on a 2-core CPU, one thread, 124M model: the decode step's linear layers
    1.35x faster at 32 rows and 2x at one row, in bf16 and fp32 alike (the plain kernel
    re-reads the weight in a layout poor for few rows). No autograd: for serving only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    takes_gelu = True  # MLP hands it the activation to fuse

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """x @ weight.T + bias; gelu: then GELU (tanh form), in the same kernel."""
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace the model's nn.Linear layers by PackedLinear, in place, where the weights are
    on a CPU with oneDNN (fp32 or bf16); the number replaced (0: nothing to do here). For a
    model that only serves from now on: it no longer trains."""
    if not torch.backends.mkldnn.is_available():
        return 0
    todo = [(parent, name, mod) for parent in model.modules() for name, mod in parent.named_children()
            if type(mod) is nn.Linear and mod.weight.device.type == "cpu"
            and mod.weight.dtype in (torch.float32, torch.bfloat16) and not hasattr(mod.weight, "device_mesh")]
    for parent, name, mod in todo:
        setattr(parent, name, PackedLinear(mod))
    return len(todo)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (B, T, V), targets (B, T). Computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of (h @ w.T) against t, a chunk of rows at a time. The gradients
    are computed in the forward pass, chunk by chunk, so neither the (N, V) logits nor their
    gradient ever exist whole; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, w, t, dtype, chunk):
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w_grad = ctx.needs_input_grad[1]  # a frozen head (adapter tuning) skips its gradient's matmuls
        hc_all, wc = h.to(dtype), w.to(dtype)
        count = (t != IGNORE_INDEX).sum()
        scale = 1.0 / count.clamp(min=1).float()  # a tensor: no host synchronisation
        ctx.w_dtype = w.dtype
        gh = torch.empty_like(h) if grads else None
        gw = torch.zeros_like(w, dtype=torch.float32) if w_grad else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for s in range(0, h.size(0), chunk):
            hc, tc = hc_all[s : s + chunk], t[s : s + chunk]
            logits = (hc @ wc.t()).float()  # (chunk, V), the rounding of a bf16 head as autocast gives it
            lse = logits.logsumexp(dim=-1)
            valid = tc != IGNORE_INDEX
            tv = tc.clamp(min=0)
            total += ((lse - logits.gather(1, tv[:, None])[:, 0]) * valid).sum()
            if grads:  # d loss / d logits = (softmax - onehot) / count, for valid rows
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(p.size(0), device=p.device), tv] -= 1.0
                p = p.mul_((valid * scale)[:, None]).to(dtype)
                gh[s : s + chunk] = p @ wc
                if w_grad:
                    gw += (p.t() @ hc).float()
        ctx.save_for_backward(gh, gw)
        return total * scale

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return gh * g.to(gh.dtype), None if gw is None else (gw * g).to(ctx.w_dtype), None, None, None


IGNORE_INDEX = -100  # as in F.cross_entropy: a target that counts for nothing


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_elems: int = 1 << 22, min_rows: int = 512) -> torch.Tensor:
    """loss_fn(h @ weight.T, targets) without materialising the logits: h (..., C), weight
    (V, C), targets (...). The head's matmul runs in autocast's dtype where autocast is on
    (else in h's), the softmax in fp32, chunks of about `chunk_elems` logits at a time but at
    least `min_rows` rows: each chunk adds its (V, C) weight gradient to an fp32 sum, and with
    fewer rows that traffic outweighs the chunk's matmuls. Measured alone (bf16, one thread),
    forward and backward: 4096 x 512 against 8192 tokens, 378 ms in 512-row chunks, 520 in
    1024, 589 with whole-batch logits; 2048 x 768 against 50257, 2.6-2.9 s from 512 rows to
    whole, 3.2 s in 256-row chunks, and 83-row chunks made a 125M model's step 20% slower."""
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    chunk = max(min_rows, chunk_elems // weight.size(0))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, targets.flatten(), dtype, chunk)


def count_params(cfg: GPTConfig) -> int:
    """Parameter count (tied weights once), built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores.

    N counts every weight used in a matmul: position embeddings are a lookup and are left out;
    a tied token embedding is counted once, as the output projection; an untied one is a
    lookup and is left out too. Attention adds 6 * n_layer * seq_len * n_embd * 2 (QK^T and
    AV, forward and backward; Kaplan et al. 2020 / PaLM appendix B), without halving for the
    causal mask, as MFU is conventionally reported.
    """
    n = count_params(cfg)
    if cfg.pos == "learned":
        n -= cfg.block_size * cfg.n_embd
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * seq_len * cfg.n_embd
