"""Adapters of one served base, chosen per request, decoded in the same batch.

LoRA: each adapted linear layer of the base becomes a MultiLoRALinear holding the updates of
every loaded adapter side by side, A stacked (slots * r, in) and B (out, slots * r), its
scaling folded into B. For a batch of tokens, each of its own adapter's slot (0: none),

    y = base(x) + ((x A^T) * mask) B^T,   mask[t, j] = 1 where column j is token t's slot's

two small matmuls per layer whatever the mix of adapters; a token's result does not depend on
its batch-mates' adapters (their columns contribute exact zeros), so the batch-invariant mode
stays invariant. A batch with no LoRA token skips them.

Prompt tuning: an adapter's virtual tokens have the same keys and values for every request,
computed once when it loads (stoker.models.gpt.GPT.virtual_cache); a request's cache starts
with them, its text at the positions after them. A multitask prompt serves each task as an
adapter of its own (NAME:TASK).

At most `slots` adapters are loaded at once; the least recently used one that no running
request holds gives way to a newcomer (which otherwise waits for a slot).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stoker.config import ConfigError
from stoker.models.gpt import GPT, PackedLinear
from stoker.tune.adapters import read_adapter, read_lora, read_prompt

_uids = itertools.count(1)


@dataclass
class AdapterSpec:
    """A servable adapter: what it is, checked against its base when registered; its tensors
    are read again from `path` whenever it loads."""

    name: str
    path: Path
    kind: str  # "lora" or "prompt"
    layers: dict[str, int] = field(default_factory=dict)  # LoRA: the stoker layers it adapts, and their ranks
    virtual: int = 0  # prompt: its number of virtual tokens
    task: int | None = None  # a multitask prompt's task id
    uid: int = field(default_factory=lambda: next(_uids))  # stands for it in prefix-cache keys


def adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter directory, or a tuning run's (its `adapter/`, the latest checkpoint's)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    raise ConfigError(f"{path}: neither a PEFT adapter directory (adapter_config.json) nor a tuning run "
                      "with an adapter/ beside its checkpoints")


def describe(model: GPT, name: str, path: str | Path) -> list[AdapterSpec]:
    """The adapter(s) at `path` for this model (its shapes, e.g. on the meta device): one spec,
    or one per task of a multitask prompt, named NAME:TASK. ConfigError for what does not fit."""
    src = adapter_dir(path)
    cfg, tensors = read_adapter(src)
    kind = cfg.get("peft_type")
    if kind == "LORA":
        layers = read_lora(model, src, cfg, tensors)
        return [AdapterSpec(name, src, "lora", layers={p: a.size(0) for p, (a, _, _) in layers.items()})]
    if kind in ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"):
        p = read_prompt(model, src, cfg, tensors)
        if p.n_tokens >= model.cfg.block_size:
            raise ConfigError(f"{src}: {p.n_tokens} virtual tokens leave no room in a context of "
                              f"{model.cfg.block_size}")
        if not p.n_tasks:
            return [AdapterSpec(name, src, "prompt", virtual=p.n_tokens)]
        return [AdapterSpec(f"{name}:{t}", src, "prompt", virtual=p.n_tokens, task=i)
                for i, t in enumerate(p.task_names)]
    raise ConfigError(f"{src}: peft_type {kind!r} cannot be served; stoker serves LORA, PROMPT_TUNING and "
                      "MULTITASK_PROMPT_TUNING adapters")


class _Selection:
    """Each token's slot in the current forward call, shared by every MultiLoRALinear, and
    its column masks (one per layer rank, made once per call)."""

    def __init__(self, slots: int, dtype: torch.dtype, device: torch.device):
        self.n_slots, self.dtype, self.device = slots, dtype, device
        self.tokens: torch.Tensor | None = None  # (N,) slot per token; None: no LoRA in this call
        self._masks: dict[int, torch.Tensor] = {}

    def set(self, tokens: torch.Tensor | None) -> None:
        self.tokens, self._masks = tokens, {}

    def mask(self, rank: int) -> torch.Tensor:
        """(N, slots * rank): 1 where the column belongs to the token's slot."""
        if rank not in self._masks:
            owner = torch.arange(self.n_slots * rank) // rank + 1
            self._masks[rank] = (owner[None] == self.tokens[:, None]).to(device=self.device, dtype=self.dtype)
        return self._masks[rank]


class MultiLoRALinear(nn.Module):
    """A base linear layer (nn.Linear or PackedLinear) plus the LoRA updates of every slot."""

    takes_gelu = True

    def __init__(self, base: nn.Module, slots: int, rank: int, selection: _Selection, dtype: torch.dtype):
        super().__init__()
        self.base, self.selection, self.rank = base, selection, rank
        dev = next(iter(base.buffers()), None)
        dev = dev.device if dev is not None else base.weight.device
        self.register_buffer("A", torch.zeros(slots * rank, base.in_features, device=dev, dtype=dtype))
        self.register_buffer("B", torch.zeros(base.out_features, slots * rank, device=dev, dtype=dtype))
        # Beside a packed base (oneDNN, stoker.models.gpt.PackedLinear), A and B packed too, and
        # the add fused into B's product: measured 1.4-1.8x faster than plain matmuls at 32 rows.
        self.packed = isinstance(base, PackedLinear)
        self._pack()

    def _pack(self) -> None:
        if self.packed:
            self.A_packed = torch.ops.mkldnn._reorder_linear_weight(self.A)
            self.B_packed = torch.ops.mkldnn._reorder_linear_weight(self.B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def put(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Slot `slot` (from 1) takes A (r, in) and B (out, r), scaling folded in; None clears it.
        The packed copies follow at the next _pack()."""
        cols = slice((slot - 1) * self.rank, slot * self.rank)
        self.A[cols] = 0
        self.B[:, cols] = 0
        if A is not None:
            r = A.size(0)
            self.A[(slot - 1) * self.rank:(slot - 1) * self.rank + r] = A.to(self.A.dtype)
            self.B[:, (slot - 1) * self.rank:(slot - 1) * self.rank + r] = B.to(self.B.dtype)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        # GELU always after the sum, never fused: a row's bits must not depend on whether some
        # other row of the batch has an adapter.
        y = self.base(x)
        if self.selection.tokens is not None:
            mask = self.selection.mask(self.rank)
            if self.packed:
                pointwise = torch.ops.mkldnn._linear_pointwise
                h = pointwise(x, self.A_packed, None, "none", [], "").mul_(mask.view(*x.shape[:-1], -1))
                y = pointwise.binary(h, y, self.B_packed, None, "add")  # y + h B^T
            else:
                h = (x.reshape(-1, x.size(-1)) @ self.A.T).mul_(mask)
                y = y + (h @ self.B.T).view(y.shape)
        return F.gelu(y, approximate="tanh") if gelu else y


class Adapters:
    """The adapters registered for one loaded base model: `slots` of them loaded at a time."""

    def __init__(self, model: GPT, specs: list[AdapterSpec], slots: int = 8):
        if slots < 1:
            raise ConfigError(f"--max-adapters: must be >= 1, got {slots}")
        self.model, self.slots = model, slots
        self.specs = {s.name: s for s in specs}
        self.dtype = model.wte.weight.dtype
        self.selection = _Selection(slots, self.dtype, model.wte.weight.device)
        self.layers: dict[str, MultiLoRALinear] = {}
        ranks: dict[str, int] = {}
        for s in specs:
            for path, r in s.layers.items():
                ranks[path] = max(r, ranks.get(path, 0))
        for path, rank in sorted(ranks.items()):  # each layer as wide as its largest adapter needs
            parent_path, leaf = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            wrapped = MultiLoRALinear(getattr(parent, leaf), slots, rank, self.selection, self.dtype)
            setattr(parent, leaf, wrapped)
            self.layers[path] = wrapped
        self.loaded: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> slot, LRU first
        self.virtual_kv: dict[str, torch.Tensor] = {}
        self.lora_slots: set[int] = set()
        self.loads = 0

    def virtual(self, name: str | None) -> int:
        return self.specs[name].virtual if name else 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for m in self.layers.values() for t in (m.A, m.B)) + \
            sum(t.nbytes for t in self.virtual_kv.values())

    def acquire(self, name: str, busy: set[int]) -> int | None:
        """The slot of adapter `name`, loading it if needed into a free slot or the least
        recently used one outside `busy` (the slots running requests hold); None when every
        slot is busy. Errors of reading it (ConfigError, OSError) propagate."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        used = set(self.loaded.values())
        free = [s for s in range(1, self.slots + 1) if s not in used]
        if not free:
            victim = next((n for n, s in self.loaded.items() if s not in busy), None)
            if victim is None:
                return None
            free = [self.loaded.pop(victim)]
            self.virtual_kv.pop(victim, None)
        slot = free[0]
        self._load(self.specs[name], slot)
        self.loaded[name] = slot
        self.loads += 1
        return slot

    def _load(self, spec: AdapterSpec, slot: int) -> None:
        cfg, tensors = read_adapter(spec.path)
        lora = read_lora(self.model, spec.path, cfg, tensors) if spec.kind == "lora" else {}
        self.lora_slots.discard(slot)
        for m in self.layers.values():
            m.put(slot, None, None)
        for path, (A, B, scaling) in lora.items():
            self.layers[path].put(slot, A, B * scaling)
        for m in self.layers.values():  # once per layer, after the slot is cleared and written
            m._pack()
        if spec.kind == "lora":
            self.lora_slots.add(slot)
            return
        p = read_prompt(self.model, spec.path, cfg, tensors)
        emb = p(1, torch.tensor([spec.task]) if spec.task is not None else None)[0].detach()
        self.select(None)
        self.virtual_kv[spec.name] = self.model.virtual_cache(emb)

    def select(self, slots: list[int] | None) -> None:
        """Each token's slot (0: no adapter) for the next forward call, in the order the call
        flattens its tokens; None: no adapter for any."""
        if not slots or not self.layers or not any(s in self.lora_slots for s in slots):
            self.selection.set(None)
            return
        self.selection.set(torch.tensor([s if s in self.lora_slots else 0 for s in slots]))
