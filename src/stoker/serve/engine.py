"""Continuous-batching inference engine over a stoker GPT.

One background thread owns the model and runs a scheduler loop. Each iteration it admits
waiting requests (up to `max_batch` sequences and a KV memory budget), prefills, then runs one
decode step for every running sequence together; finished sequences leave at once and free
their cache. Callers submit token ids with sampling parameters and get events (text deltas)
through a callback, from the engine thread.

Two modes:

- Throughput (the default). The running sequences' keys and values sit in one buffer, a row
  each, compacted (a finished row is refilled with the last one), so that a decode step is one
  call per layer over exactly the running rows: attention batched across sequences, shorter
  rows masked, nothing computed for empty slots. Prompts are prefilled in chunks of at most
  `prefill_chunk` tokens per iteration, so a long prompt does not stall the running decodes,
  and prompts that share a prefix (a system prompt) reuse its keys and values from a prefix
  cache of `prefix_block`-token blocks. A row's bits then depend on its batch-mates (a matmul's
  kernel depends on the row count), so greedy text agrees with solo decoding for a while and
  can part at a near tie.
- Batch-invariant (`batch_invariant=True`): a request's greedy tokens do not depend on who else
  is in the batch. On CPU (MKL) the bits of a row of `x @ W.T` depend on the number of rows in
  the call (different kernels for 1, a few and many rows), though not on the row's position. So
  the decode step runs its matmuls on exactly `max_batch` rows, padding idle ones, attention
  row by row over that row's own cache, and each prompt is prefilled alone and whole. The
  price: a nearly empty batch costs as much as a full one (docs/serving.md has the figures).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stoker.data.tokenizer import Tokenizer
from stoker.models.gpt import GPT, KVCache, PackedKVCache, SlotKVCache
from stoker.serve.adapters import Adapters


KV_BLOCK = 32  # tokens: the batch buffer's rows are made of blocks of this many (see SlotKVCache)
# Seconds the batch buffer is kept once no sequence decodes, for the next burst to reuse: a new
# one costs its page faults on first touch (a burst of 32 prompts of 230 tokens, 12 x 768
# model: 1.46x slower in a new 700 MB buffer than in a kept one, measured on a 2-vCPU VM).
KEEP_SLOTS_S = 60.0


class QueueFull(Exception):
    """The waiting queue is at its bound; retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy; any value > 0 samples (tiny ones pick the top token)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None  # any integer; taken modulo 2**64
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop: strings must not be empty")


@dataclass
class Event:
    """What a request produced since its previous event; the last one has a finish_reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (end of text or a stop string), "length", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Seq:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    cap: int  # cache slots: prompt plus every generated token that is fed back
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    out: list[int] = field(default_factory=list)  # generated ids, end-of-text excluded
    sampled: int = 0  # tokens sampled, end-of-text included
    sent: int = 0  # characters of text already emitted
    done: bool = False
    cancelled: bool = False
    kv: torch.Tensor | None = None  # its own (n_layer, 2, KVH, cap, D), until it joins the batch buffer
    gen: torch.Generator | None = None
    filled: int = 0  # prompt tokens in its cache so far (chunked prefill)
    row: int | None = None  # its row of the batch buffer (throughput mode), once prefilled
    adapter: str | None = None
    slot: int = 0  # its adapter's slot once admitted (stoker.serve.adapters)
    virtual: int = 0  # a prompt adapter's virtual tokens: the first ids of `prompt`, negative
    error: str | None = None  # what failed before it could start

    @property
    def length(self) -> int:
        """Tokens in the cache once the last sampled token is fed: its position is length - 1."""
        return len(self.prompt) + self.sampled


class Handle:
    """A submitted request; cancel() makes the engine drop it at its next step."""

    def __init__(self, seq: _Seq):
        self._seq = seq

    def cancel(self) -> None:
        self._seq.cancelled = True


class EngineMetrics:
    """Hooks the engine calls; the server's Prometheus metrics implement them. No-ops here."""

    def queue_depth(self, n: int) -> None: ...
    def batch_size(self, n: int) -> None: ...
    def running(self, n: int) -> None: ...
    def tokens(self, n: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def finished(self, seconds: float, reason: str) -> None: ...
    def memory(self, kind: str, nbytes: int) -> None: ...
    def prefix_hit(self, tokens: int, of: int) -> None: ...
    def adapter_load(self, name: str) -> None: ...


class PrefixCache:
    """Keys and values of prompt prefixes, in blocks of `block` tokens, least recently used
    dropped beyond `budget_bytes`. A block is found by its tokens and its parent block, so a
    match is exact: the same tokens from the start of the prompt."""

    def __init__(self, block: int, budget_bytes: int):
        self.block, self.budget = block, budget_bytes
        self.used = 0
        self._blocks: collections.OrderedDict[tuple, tuple[int, torch.Tensor]] = collections.OrderedDict()
        self._ids = 0

    def lookup(self, prompt: list[int], model: int = 0) -> list[torch.Tensor]:
        """The cached blocks of the prompt's longest cached prefix, leaving at least its last
        token to compute (its logits start the completion)."""
        found, parent, B = [], -model, self.block
        keys = []
        while (len(found) + 1) * B <= len(prompt) - 1:
            k = len(found)
            key = (parent, tuple(prompt[k * B:(k + 1) * B]))
            hit = self._blocks.get(key)
            if hit is None:
                break
            keys.append(key)
            parent = hit[0]
            found.append(hit[1])
        for key in reversed(keys):  # children first, so a parent is dropped after its children
            self._blocks.move_to_end(key)
        return found

    def insert(self, prompt: list[int], kv: torch.Tensor, model: int = 0) -> None:
        """Add the whole blocks of a prefilled prompt; kv (n_layer, 2, KVH, >= len, D). model:
        what computed them besides the base (an adapter's uid; 0: the base alone), since the
        same tokens have other keys and values under a LoRA adapter."""
        parent, B, keys = -model, self.block, []
        for k in range(len(prompt) // B):
            key = (parent, tuple(prompt[k * B:(k + 1) * B]))
            if key not in self._blocks:
                self._ids += 1
                data = kv[:, :, :, k * B:(k + 1) * B].clone()
                self._blocks[key] = (self._ids, data)
                self.used += data.nbytes
            keys.append(key)
            parent = self._blocks[key][0]
        for key in reversed(keys):
            self._blocks.move_to_end(key)
        while self.used > self.budget and self._blocks:
            _, (_, data) = self._blocks.popitem(last=False)
            self.used -= data.nbytes


class Engine:
    """Serve one model: `submit` from any thread, events arrive from the engine thread."""

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 8, max_queue: int = 64,
        kv_budget_bytes: int = 1 << 30, metrics: EngineMetrics | None = None, batch_invariant: bool = False,
        prefill_chunk: int = 256, prefix_cache_bytes: int = 256 << 20, prefix_block: int = 16,
        adapters: Adapters | None = None, keep_slots_s: float = KEEP_SLOTS_S,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        if not 0 <= keep_slots_s < math.inf:  # an infinite wait overflows the condition's timeout
            raise ValueError(f"keep_slots_s: must be a finite number >= 0, got {keep_slots_s}")
        if prefill_chunk < 1 or prefix_block < 1 or prefix_cache_bytes < 0:
            raise ValueError("prefill_chunk and prefix_block: must be >= 1; prefix_cache_bytes: >= 0")
        self.model = model.eval()
        self.tok = tokenizer
        self.cfg = model.cfg
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.kv_budget_bytes = kv_budget_bytes
        self.metrics = metrics or EngineMetrics()
        self.batch_invariant = batch_invariant
        self.prefill_chunk = prefill_chunk
        self.adapters = adapters
        p = model.wte.weight
        self.device, self.dtype = p.device, p.dtype
        self.kv_bytes_per_token = self.cfg.n_layer * 2 * self.cfg.kv_heads * self.cfg.head_dim * p.element_size()
        self.prefixes = PrefixCache(prefix_block, prefix_cache_bytes) if prefix_cache_bytes and not batch_invariant \
            else None
        self._kv_used = 0  # what admission counts: each admitted sequence's capacity (padded, in throughput mode)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._active: list[_Seq] = []  # admitted, in admission order
        self._rows: list[_Seq] = []  # throughput mode: the decoding sequences, by row of self._slots
        self._slots: torch.Tensor | None = None  # (blocks, n_layer, 2, rows, KVH, KV_BLOCK, D): SlotKVCache's
        self._store: torch.Tensor | None = None  # the memory self._slots is a view of
        self.keep_slots_s = keep_slots_s
        self._idle_since = 0.0  # when the last row left the batch buffer
        self._cv = threading.Condition()
        self._closing = False
        self.metrics.memory("weights", sum(t.nbytes for t in model.state_dict().values()))
        self._thread = threading.Thread(target=self._loop, name="stoker-engine", daemon=True)
        self._thread.start()

    # ---- callers ----

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def check_prompt(self, prompt_ids: Sequence[int], adapter: str | None = None) -> None:
        """ValueError when a prompt cannot be served: too long for the context (less a prompt
        adapter's virtual tokens) or the KV budget, or an adapter this engine does not have."""
        if adapter is not None and (self.adapters is None or adapter not in self.adapters.specs):
            raise ValueError(f"adapter {adapter!r} is not registered with this model")
        virtual = self.adapters.virtual(adapter) if adapter else 0
        ctx = self.cfg.block_size - virtual
        if not prompt_ids:
            raise ValueError("prompt: must hold at least one token")
        if len(prompt_ids) >= ctx:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; the model's context is {ctx} tokens"
                             + f" (after the adapter's {virtual} virtual tokens)" * bool(virtual)
                             + f", so a prompt may hold at most {ctx - 1}")
        if (len(prompt_ids) + virtual) * self.kv_bytes_per_token > self.kv_budget_bytes:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens needs more KV cache than the whole budget "
                             f"({self.kv_budget_bytes / 2**20:.0f} MiB)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None],
               adapter: str | None = None) -> Handle:
        """Queue a request, with one of the engine's adapters or none; raises ValueError (bad
        prompt or adapter), QueueFull or EngineClosed."""
        self.check_prompt(prompt_ids, adapter)
        virtual = self.adapters.virtual(adapter) if adapter else 0
        # A prompt adapter's virtual tokens lead the prompt as negative ids, its own, so that
        # prefix-cache keys tell adapters apart; they are never fed to the model.
        prompt = [-(self._uid(adapter) << 20) - i - 1 for i in range(virtual)] + list(prompt_ids)
        ctx = self.cfg.block_size
        cap = min(len(prompt) + params.max_tokens - 1, ctx - 1)
        # A request that could never fit is cut to what the budget holds rather than refused.
        cap = max(len(prompt), min(cap, self.kv_budget_bytes // self.kv_bytes_per_token))
        seq = _Seq(prompt, params, on_event, cap, adapter=adapter, virtual=virtual)
        with self._cv:
            if self._closing:
                raise EngineClosed("the model is being unloaded")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(seq)
            self.metrics.queue_depth(len(self._waiting))
            self._cv.notify()
        return Handle(seq)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None) -> Completion:
        """Blocking convenience: submit and wait for the whole completion."""
        events: list[Event] = []
        finished = threading.Event()

        def on_event(ev: Event) -> None:
            events.append(ev)
            if ev.finish_reason:
                finished.set()

        self.submit(prompt_ids, params, on_event, adapter)
        finished.wait()
        last = events[-1]
        if last.error:
            raise RuntimeError(last.error)
        return Completion("".join(e.text for e in events), [t for e in events for t in e.token_ids],
                          last.finish_reason, last.prompt_tokens, last.completion_tokens)

    def close(self, wait: bool = True) -> None:
        """Take no new requests; the thread ends once queued and running ones are done."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if wait:
            self._thread.join()

    # ---- engine thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._waiting or self._active or self._closing):
                        if self._slots is None:
                            self._cv.wait()
                        elif not self._cv.wait(max(0.0, self._idle_since + self.keep_slots_s - time.monotonic())):
                            self._slots = self._store = None  # idle that long: its memory back
                            self._report_memory()
                    if self._closing and not (self._waiting or self._active):
                        self.metrics.memory("weights", 0)  # what the pool drops once this thread ends
                        return
                    admitted = self._admit()
                try:
                    self._step(admitted)
                except Exception as e:  # fail the requests at hand, keep serving the next ones
                    for seq in self._active + admitted:
                        if not seq.done:
                            self._finish(seq, "", "error", error=f"{type(e).__name__}: {e}")
                    self._active, self._rows, self._slots, self._store = [], [], None, None
                    self._kv_used = 0
                    self._report_memory()

    def _need(self, seqs: list[_Seq]) -> int:
        """KV bytes that admitted sequences may take: their capacities; in throughput mode each
        row of the batch buffer is as long as the longest of them."""
        if not seqs:
            return 0
        if self.batch_invariant:
            return sum(s.cap for s in seqs) * self.kv_bytes_per_token
        return len(seqs) * self._row_length(seqs) * self.kv_bytes_per_token

    @staticmethod
    def _row_length(seqs: list[_Seq]) -> int:
        """Length of the batch buffer's rows for these sequences: the longest capacity, rounded
        up to whole blocks of KV_BLOCK tokens."""
        return -(-max(s.cap for s in seqs) // KV_BLOCK) * KV_BLOCK

    def _admit(self) -> list[_Seq]:
        admitted = []
        while self._waiting and len(self._active) + len(admitted) < self.max_batch:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                continue
            need = self._need(self._active + admitted + [seq])
            if need > self.kv_budget_bytes and (self._active or admitted):
                break  # first come first served: it waits for running sequences to free memory
            if seq.adapter is not None:
                loads = self.adapters.loads
                try:
                    seq.slot = self.adapters.acquire(seq.adapter, {s.slot for s in self._active + admitted})
                except Exception as e:  # its files went bad since: this request fails, not the engine
                    seq.error = f"adapter {seq.adapter!r} did not load: {e}"
                if seq.slot is None:
                    seq.slot = 0
                    break  # every adapter slot is held by running requests: it waits
                if self.adapters.loads > loads:
                    self.metrics.adapter_load(seq.adapter)
            self._waiting.popleft()
            self._kv_used = need
            admitted.append(seq)
        self.metrics.queue_depth(len(self._waiting))
        return admitted

    def _step(self, admitted: list[_Seq]) -> None:
        for seq in admitted:
            self._active.append(seq)  # before it starts, so that _release frees its cache even if it fails
            self._guarded(seq, self._start, seq)
        if not self.batch_invariant:
            self._prefill_some()
        self._release()
        decoding = [s for s in self._active if s.filled == len(s.prompt)]
        if decoding:
            self.metrics.batch_size(len(decoding))
            if self.batch_invariant:
                logits = self._decode_padded(decoding)
            else:
                decoding = self._rows
                logits = self._decode_rows()
            for seq, row in zip(decoding, logits):
                self._guarded(seq, self._advance, seq, row)
            self._release()

    def _guarded(self, seq: _Seq, work: Callable, *args) -> None:
        """Do one sequence's own work; should it fail, that sequence alone ends, with an error."""
        try:
            work(*args)
        except Exception as e:
            if not seq.done:
                self._finish(seq, "", "error", error=f"{type(e).__name__}: {e}")

    def _start(self, seq: _Seq) -> None:
        if seq.error:
            raise RuntimeError(seq.error)
        seq.kv = self.model.new_cache_buffer(seq.cap)
        if seq.virtual:
            seq.kv[:, :, :, :seq.virtual] = self.adapters.virtual_kv[seq.adapter]
            seq.filled = seq.virtual
        self._report_memory()
        if seq.params.seed is not None:
            # Any integer is a seed: taken modulo 2**64, which leaves the generator's own range
            # [-2**63, 2**64) as it was (a negative seed is its two's complement there too).
            seq.gen = torch.Generator(device=self.device).manual_seed(seq.params.seed % 2**64)
        if self.batch_invariant:  # the whole prompt, alone
            self._select([seq.slot] * (len(seq.prompt) - seq.filled))
            logits = self.model.forward_cached(torch.tensor([seq.prompt[seq.filled:]], device=self.device),
                                               KVCache([seq.kv], [seq.filled]), last_only=True)
            seq.filled = len(seq.prompt)
            self._advance(seq, logits[0, -1])
        elif self.prefixes is not None:
            blocks = self.prefixes.lookup(seq.prompt, self._uid(seq.adapter))
            if blocks and sum(b.size(3) for b in blocks) > seq.filled:
                seq.filled = sum(b.size(3) for b in blocks)
                seq.kv[:, :, :, :seq.filled] = torch.cat(blocks, dim=3)
            self.metrics.prefix_hit(seq.filled - seq.virtual, len(seq.prompt) - seq.virtual)

    def _uid(self, adapter: str | None) -> int:
        return self.adapters.specs[adapter].uid if adapter else 0

    def _select(self, slots: list[int]) -> None:
        """Each token's adapter slot for the next forward call (see stoker.serve.adapters)."""
        if self.adapters is not None:
            self.adapters.select(slots)

    def _prefill_some(self) -> None:
        """Up to prefill_chunk prompt tokens, of the admitted sequences in order, in one forward
        call (packed: the linear layers see every token at once); a sequence whose prompt is
        complete samples its first token and joins the decoding rows."""
        budget, work = self.prefill_chunk, []
        for seq in self._active:
            if budget <= 0:
                break
            if seq.filled < len(seq.prompt) and not (seq.done or seq.cancelled):
                n = min(len(seq.prompt) - seq.filled, budget)
                budget -= n
                work.append((seq, n))
        if not work:
            return
        ids = torch.tensor([[t for seq, n in work for t in seq.prompt[seq.filled:seq.filled + n]]], device=self.device)
        cache = PackedKVCache([seq.kv for seq, _ in work], [seq.filled for seq, _ in work], [n for _, n in work])
        self._select([seq.slot for seq, n in work for _ in range(n)])
        try:
            logits = self.model.forward_cached(ids, cache, last_only=True)[0]
        except Exception:  # each alone, so that a fault stays with its own request
            for seq, n in work:
                self._guarded(seq, self._prefill_alone, seq, n)
            return
        for (seq, n), row in zip(work, logits):
            self._guarded(seq, self._prefilled, seq, n, row)

    def _prefill_alone(self, seq: _Seq, n: int) -> None:
        idx = torch.tensor([seq.prompt[seq.filled:seq.filled + n]], device=self.device)
        self._select([seq.slot] * n)
        self._prefilled(seq, n, self.model.forward_cached(idx, KVCache([seq.kv], [seq.filled]), last_only=True)[0, -1])

    def _prefilled(self, seq: _Seq, n: int, logits: torch.Tensor) -> None:
        """n more prompt tokens are in the sequence's cache; logits (V,) after the last of them."""
        seq.filled += n
        if seq.filled < len(seq.prompt):
            return
        if self.prefixes is not None:
            self.prefixes.insert(seq.prompt, seq.kv, self._uid(seq.adapter))
        self._advance(seq, logits)
        if not (seq.done or seq.cancelled):
            self._join_rows(seq)

    def _join_rows(self, seq: _Seq) -> None:
        """Move a prefilled sequence's cache into the next row of the batch buffer, growing it
        (rows, or length to the longest admitted capacity) when it is too small."""
        rows = len(self._rows) + 1
        live = [s for s in self._active if not (s.done or s.cancelled)]
        buf = self._slots
        length = self._row_length(live)
        if self._rows:
            length = max(length, buf.size(0) * KV_BLOCK)  # live rows keep theirs
        # With no live row, a longer buffer is cut to length too: memory a long burst left
        # is not worth keeping in the shape (that buffer's rows are all free).
        if buf is None or buf.size(3) < rows or buf.size(0) * KV_BLOCK != length:
            self._slots = buf = self._grow(buf, max(rows, len(live)), length, seq.kv.size(2))
        n, r = len(seq.prompt), len(self._rows)
        for b in range(buf.size(0)):  # block by block; the rest of the row zeroed: what an
            # earlier sequence left there is masked, but a NaN or inf it may have held would
            # still poison this row's softmax and sums
            m = max(0, min(KV_BLOCK, n - b * KV_BLOCK))
            if m:
                buf[b, :, :, r, :, :m] = seq.kv[:, :, :, b * KV_BLOCK: b * KV_BLOCK + m]
            buf[b, :, :, r, :, m:] = 0
        seq.row, seq.kv = r, None
        self._rows.append(seq)
        self._report_memory()

    def _grow(self, buf: torch.Tensor | None, rows: int, length: int, heads: int) -> torch.Tensor:
        """A batch buffer of at least `rows` rows of `length` tokens holding the live rows of
        `buf`. As many rows as the KV budget allows at that length (up to max_batch), so that
        the rows of a burst, joining one by one, never grow it again; in the memory of the last
        one when it is large enough and no row is live, or the rows stay as they were (blocks
        are the outermost dimension: more of them leave the old ones in place): fresh memory
        costs its page faults on first touch (measured here: a burst of 32 prompts of 230
        tokens 1.46x slower in a new buffer than in a kept one)."""
        c = self.cfg
        fit = self.kv_budget_bytes // (length * self.kv_bytes_per_token)
        shape = (length // KV_BLOCK, c.n_layer, 2, min(self.max_batch, max(rows, fit)), heads, KV_BLOCK, c.head_dim)
        size = math.prod(shape)
        live = len(self._rows)
        if self._store is not None and self._store.numel() >= size and (live == 0 or buf.shape[1:] == shape[1:]):
            grown = self._store[:size].view(shape)
            if live:
                grown[buf.size(0):, :, :, :live] = 0  # the live rows' new blocks (see _join_rows)
            return grown
        store = torch.empty(size, device=self.device, dtype=self.dtype)
        grown = store.view(shape)
        if live:  # the live rows moved, and zeroed in their new blocks
            grown[:buf.size(0), :, :, :live] = buf[:, :, :, :live]
            grown[buf.size(0):, :, :, :live] = 0
        self._store = store
        return grown

    def _release(self) -> None:
        keep = []
        for seq in self._active:
            if seq.done or seq.cancelled:
                seq.kv = None
            else:
                keep.append(seq)
        self._active = keep
        if not self.batch_invariant:
            rows = self._rows
            while rows and (rows[-1].done or rows[-1].cancelled):
                rows.pop()
            for i, seq in enumerate(rows):  # refill each finished row with the last live one
                if seq.done or seq.cancelled:
                    last = rows.pop()
                    while last.done or last.cancelled:
                        last = rows.pop()
                    # the whole row: past its length it is zeros (see _join_rows), and so is the copy
                    self._slots[:, :, :, i] = self._slots[:, :, :, last.row]
                    last.row = i
                    rows[i] = last
                    while rows and (rows[-1].done or rows[-1].cancelled):
                        rows.pop()
            if not keep:
                self._idle_since = time.monotonic()  # the buffer stays a while for the next burst
        self._kv_used = self._need(keep)
        self.metrics.running(len(keep))
        self._report_memory()

    def _report_memory(self) -> None:
        kv = sum(s.kv.nbytes for s in self._active if s.kv is not None)
        self.metrics.memory("kv_cache", kv + (self._store.nbytes if self._store is not None else 0))
        self.metrics.memory("prefix_cache", self.prefixes.used if self.prefixes is not None else 0)
        self.metrics.memory("adapters", self.adapters.nbytes if self.adapters is not None else 0)

    def _decode_rows(self) -> torch.Tensor:
        """One token for every decoding row, in one call per layer; logits (rows, V)."""
        rows = self._rows
        last = torch.tensor([[s.out[-1]] for s in rows], device=self.device)
        cache = SlotKVCache(self._slots[:, :, :, :len(rows)], [s.length - 1 for s in rows])
        self._select([s.slot for s in rows])
        return self.model.forward_cached(last, cache)[:, 0]

    def _decode_padded(self, seqs: list[_Seq]) -> torch.Tensor:
        """Feed each sequence's last token at its own position; logits (len(seqs), V). The
        matmuls always run on max_batch rows (idle ones padded), attention row by row (see
        the module's doc)."""
        R, n = self.max_batch, len(seqs)
        last = torch.zeros(R, 1, dtype=torch.long, device=self.device)  # idle rows: token 0 at position 0
        last[:n, 0] = torch.tensor([s.out[-1] for s in seqs])
        cache = KVCache([s.kv for s in seqs] + [None] * (R - n), [s.length - 1 for s in seqs] + [0] * (R - n))
        self._select([s.slot for s in seqs] + [0] * (R - n))
        return self.model.forward_cached(last, cache)[:n, 0]  # (n, V)

    def _pick(self, seq: _Seq, logits: torch.Tensor) -> int:
        """One token from logits (V,) under the request's sampling parameters."""
        p = seq.params
        if p.temperature == 0:
            return int(logits.argmax())
        # In float64 and from the maximum down: any temperature > 0, however small, then gives
        # 0 for the top logit and -inf for the others (a greedy pick), never inf - inf = nan.
        logits = logits.double()
        logits = (logits - logits.max()) / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, -1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # Drop a token when the more likely ones already reach top_p; the first always stays,
            # however small top_p, so some probability is always left to sample from.
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
            drop[0] = False
            probs = probs.scatter(0, order[drop], 0.0)
        return int(torch.multinomial(probs, 1, generator=seq.gen))

    def _advance(self, seq: _Seq, logits: torch.Tensor) -> None:
        if seq.cancelled:
            return
        tok = self._pick(seq, logits)
        seq.sampled += 1
        now = time.perf_counter()
        if seq.t_first is None:
            seq.t_first = now
            self.metrics.first_token(now - seq.t_submit)
        self.metrics.tokens(1)
        if tok == self.tok.eot_id:
            self._finish(seq, self.tok.decode(seq.out)[seq.sent:], "stop")
            return
        seq.out.append(tok)
        text = self.tok.decode(seq.out)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            self._finish(seq, text[seq.sent: min(hits)], "stop", [tok])
        elif len(seq.out) >= seq.params.max_tokens or seq.length > seq.cap:
            self._finish(seq, text[seq.sent:], "length", [tok])
        else:
            # Hold back what may still change: an incomplete UTF-8 character (decoded as U+FFFD)
            # and a tail that could be the start of a stop string. The streamed text is then
            # always a prefix of the final one.
            end = len(text.rstrip("\ufffd"))
            hold = max([k for s in seq.params.stop for k in range(1, min(len(s), end + 1))
                        if text[end - k: end] == s[:k]], default=0)
            safe = max(end - hold, seq.sent)
            self._emit(seq, Event(text[seq.sent: safe], [tok]))
            seq.sent = safe

    def _finish(self, seq: _Seq, text: str, reason: str, ids: list[int] | None = None, error: str | None = None) -> None:
        seq.done = True
        self._emit(seq, Event(text, ids or [], reason, len(seq.prompt) - seq.virtual, seq.sampled, error))
        self.metrics.finished(time.perf_counter() - seq.t_submit, reason)

    def _emit(self, seq: _Seq, ev: Event) -> None:
        try:
            seq.on_event(ev)
        except Exception:
            # The caller's callback failed (its event loop closed, say): nobody is listening, so
            # stop generating for it, and never let it fail the sequences of other callers.
            seq.cancelled = True
