import threading
import time
from copy import deepcopy

import pytest
import torch

from stoker.generate import sample
from stoker.models.gpt import pack_linears
from stoker.serve.engine import KV_BLOCK, Completion, Engine, EngineMetrics, Event, SamplingParams

PROMPTS = ["d", "import json\n", "class Foo(Base):\n    def", "async def main():\n    await x.y(1, 2)\n", "for i in"]
GREEDY = SamplingParams(max_tokens=20, temperature=0)


class Recorder(EngineMetrics):
    def __init__(self):
        self.batches: list[int] = []

    def batch_size(self, n: int) -> None:
        self.batches.append(n)


def run_staggered(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], joins: list[int]) -> list[Completion]:
    """Submit prompt 0, then prompt j once prompt 0 has produced joins[j] tokens: requests join a running batch."""
    events: list[list[Event]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    produced = [0]

    def on_event(j: int, ev: Event) -> None:
        events[j].append(ev)
        if j == 0:
            produced[0] += len(ev.token_ids)
            for k in range(1, len(prompts)):
                if joins[k] == produced[0]:
                    submit(k)
        if ev.finish_reason:
            done[j].set()

    def submit(j: int) -> None:
        engine.submit(prompts[j], params[j], lambda ev: on_event(j, ev))

    submit(0)
    for k in range(1, len(prompts)):
        if joins[k] == 0:
            submit(k)
    for d in done:
        assert d.wait(60)
    return [Completion("".join(e.text for e in evs), [t for e in evs for t in e.token_ids], evs[-1].finish_reason,
                       evs[-1].prompt_tokens, evs[-1].completion_tokens) for evs in events]


def packed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with its linear layers packed, as the server runs it."""
    copy = deepcopy(model)
    assert pack_linears(copy) == 2 * 6 + 1  # per block q, k, v, o, fc, proj; and the head
    return copy


@pytest.mark.parametrize("invariant,pack", [(True, False), (False, False), (True, True), (False, True)])
def test_batched_greedy_equals_solo_token_for_token(sharp_model, invariant, pack):
    """Batch-invariant mode: equal by construction, with plain or packed linear layers (the
    server's). Throughput mode: a row's bits depend on its batch-mates (~1e-6 relative,
    test_batched_decode_logits_agree_with_solo), far below this model's lead of the top logit,
    so all 5 prompts x 20 tokens agree here too."""
    model, tok = sharp_model
    model = packed(model) if pack else model
    rec = Recorder()
    engine = Engine(model, tok, max_batch=3, metrics=rec, batch_invariant=invariant)
    try:
        prompts = [tok.encode(p) for p in PROMPTS]
        assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
        solo = [engine.generate(p, GREEDY) for p in prompts]
        rec.batches.clear()
        # Prompts join after 0, 0, 3, 7 and 12 tokens of the first; max_batch 3 makes the later
        # ones wait in the queue and take the place of finished ones.
        busy = run_staggered(engine, prompts, [GREEDY] * len(prompts), joins=[0, 0, 3, 7, 12])
    finally:
        engine.close()
    assert max(rec.batches) == 3 and min(rec.batches) < 3  # it did batch, and the batch changed
    for s, b in zip(solo, busy):
        assert len(s.token_ids) == 20 and len(set(s.token_ids)) > 5  # a varied output, not one repeated token
        assert b.token_ids == s.token_ids
        assert b.text == s.text == tok.decode(s.token_ids)


def test_solo_greedy_matches_the_no_cache_reference(sharp_model):
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=4)
    try:
        for text in PROMPTS:
            ids = tok.encode(text)
            got = engine.generate(ids, GREEDY).token_ids
            ref = sample(model, ids, 20, temperature=0)
            if got != ref:
                # The cached and the full-sequence forward sum in different orders (fp32 differs in
                # the last bits, ~1e-6 relative): tokens may only differ at a near tie of the reference.
                with torch.no_grad():
                    for t in range(len(got)):
                        logits = model(torch.tensor([ids + got[:t]]))[0, -1]
                        assert logits[got[t]] >= logits.max() - 1e-4, f"token {t} is not the argmax"
            assert len(got) == 20
    finally:
        engine.close()


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(sharp_model):
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=4, batch_invariant=True)
    try:
        prompts = [tok.encode(p) for p in PROMPTS[:4]]
        params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in range(4)]
        solo = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
        busy = run_staggered(engine, prompts, params, joins=[0, 2, 2, 5])
        other_seed = engine.generate(prompts[0], SamplingParams(max_tokens=16, temperature=0.9, top_k=40, seed=99))
    finally:
        engine.close()
    assert [b.token_ids for b in busy] == [s.token_ids for s in solo]
    assert other_seed.token_ids != solo[0].token_ids


def test_stop_strings_cut_the_text_and_the_stream_never_overshoots(sharp_model):
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=2)
    try:
        ids = tok.encode(PROMPTS[1])
        full = engine.generate(ids, GREEDY).text
        stop = full[len(full) // 2: len(full) // 2 + 3]  # a piece from the middle of the output
        events: list[Event] = []
        done = threading.Event()
        engine.submit(ids, SamplingParams(max_tokens=20, temperature=0, stop=("\x00never", stop)),
                      lambda ev: (events.append(ev), ev.finish_reason and done.set()))
        assert done.wait(60)
    finally:
        engine.close()
    expected = full[: full.index(stop)]
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop"
    streamed = ""
    for e in events:
        streamed += e.text
        assert expected.startswith(streamed)


def test_kv_budget_makes_requests_wait(sharp_model):
    model, tok = sharp_model
    rec = Recorder()
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    engine = Engine(model, tok, max_batch=4, metrics=rec)
    solo = [engine.generate(p, GREEDY) for p in prompts]
    # Room for the longest request's cache only: with max_batch 4 they still run one at a time.
    need = max(len(p) + GREEDY.max_tokens - 1 for p in prompts) * engine.kv_bytes_per_token
    engine.close()
    engine = Engine(model, tok, max_batch=4, kv_budget_bytes=need, metrics=rec)
    try:
        rec.batches.clear()
        busy = run_staggered(engine, prompts, [GREEDY] * 3, joins=[0, 0, 0])
    finally:
        engine.close()
    assert set(rec.batches) == {1}
    assert [b.token_ids for b in busy] == [s.token_ids for s in solo]


def test_the_context_bounds_prompts_and_generation(sharp_model):
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=2)
    try:
        with pytest.raises(ValueError, match="context"):
            engine.submit(list(range(64)), GREEDY, lambda ev: None)
        long = [int(t) for t in torch.randint(1, 500, (60,), generator=torch.Generator().manual_seed(0))]
        end = engine.generate(long, GREEDY)
    finally:
        engine.close()
    # 60 prompt tokens in a 64-token context leave room for 4 new ones.
    assert end.finish_reason == "length" and end.completion_tokens == 4 and len(end.token_ids) == 4


def test_a_poisoned_request_fails_alone(sharp_model):
    """Values that slip past validation, and a sampler that breaks mid-generation, end their own
    request with an error; eight concurrent good ones finish exactly as they would alone."""
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=4, batch_invariant=True)
    real_pick = engine._pick

    def pick(seq, logits):  # a fault in the decode step of one sequence of a full batch
        if seq.params.seed == 666 and seq.sampled == 3:
            raise RuntimeError("poisoned")
        return real_pick(seq, logits)

    engine._pick = pick
    prompts = [tok.encode(p) for p in PROMPTS] * 2
    good = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=s) for s in range(5)] + [
        SamplingParams(max_tokens=12, temperature=1e-300),  # tiny: divides to inf
        SamplingParams(max_tokens=12, top_p=5e-324),  # keeps nothing unless the top token stays
        SamplingParams(max_tokens=12, seed=2**70 + 3),  # beyond the generator's 64 bits
    ]
    poison = {2: SamplingParams(max_tokens=12, seed=666), 5: SamplingParams(max_tokens=12, seed="boom")}
    try:
        solo = [engine.generate(p, sp) for p, sp in zip(prompts, good)]
        greedy = [engine.generate(p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts[5:7]]
        seed3 = engine.generate(prompts[7], SamplingParams(max_tokens=12, seed=3))
        mixed = list(zip(prompts, good))
        for i, sp in poison.items():  # in between, so that they share batches with good ones
            mixed.insert(i, (prompts[0], sp))
        busy = run_staggered(engine, [p for p, _ in mixed], [sp for _, sp in mixed], joins=[0] * len(mixed))
        after = engine.generate(prompts[0], good[0])
    finally:
        engine.close()
    for i in poison:
        assert busy[i].finish_reason == "error"
    assert [b.token_ids for i, b in enumerate(busy) if i not in poison] == [s.token_ids for s in solo]
    assert all(s.finish_reason == "length" and len(s.token_ids) == 12 for s in solo)
    assert [s.token_ids for s in solo[5:7]] == [g.token_ids for g in greedy]
    assert solo[7].token_ids == seed3.token_ids  # 2**70 + 3 is 3 modulo 2**64
    assert after.token_ids == solo[0].token_ids


def test_a_failing_callback_stops_only_its_own_request(sharp_model):
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=2)

    def broken(ev: Event) -> None:
        raise RuntimeError("the listener is gone")

    try:
        ids = tok.encode(PROMPTS[1])
        alone = engine.generate(ids, GREEDY)
        engine.submit(ids, GREEDY, broken)
        assert engine.generate(ids, GREEDY).token_ids == alone.token_ids
    finally:
        engine.close()


def test_batched_decode_logits_agree_with_solo(sharp_model):
    """Throughput mode's decode step (one call per layer over a padded buffer, shorter rows
    masked) against each row decoded alone from its own cache."""
    from stoker.models.gpt import KVCache, SlotKVCache

    model, tok = sharp_model
    prompts = [tok.encode(p) for p in PROMPTS]
    caches = [model.new_cache_buffer(40) for _ in prompts]
    with torch.no_grad():
        for ids, kv in zip(prompts, caches):
            model.forward_cached(torch.tensor([ids]), KVCache([kv], [0]))
        nxt = torch.tensor([[7], [11], [13], [17], [19]])
        # blocks of 8 positions: a prompt spans several, and the rows end in different ones
        slots = torch.zeros(5, model.cfg.n_layer, 2, len(prompts), model.cfg.n_head, 8, model.cfg.head_dim)
        as_rows = slots.permute(1, 2, 3, 4, 0, 5, 6).reshape(model.cfg.n_layer, 2, len(prompts), model.cfg.n_head, 40, -1)
        for r, (ids, kv) in enumerate(zip(prompts, caches)):
            as_rows[:, :, r, :, :len(ids)] = kv[:, :, :, :len(ids)]
        slots.copy_(as_rows.reshape(model.cfg.n_layer, 2, len(prompts), model.cfg.n_head, 5, 8, -1).permute(4, 0, 1, 2, 3, 5, 6))
        assert max(map(len, prompts)) > 8
        batched = model.forward_cached(nxt, SlotKVCache(slots, [len(p) for p in prompts]))[:, 0]
        solo = torch.stack([model.forward_cached(nxt[r:r + 1], KVCache([kv], [len(ids)]))[0, 0]
                            for r, (ids, kv) in enumerate(zip(prompts, caches))])
        as_rows = slots.permute(1, 2, 3, 4, 0, 5, 6).reshape(model.cfg.n_layer, 2, len(prompts), model.cfg.n_head, 40, -1)
        for r, (ids, kv) in enumerate(zip(prompts, caches)):  # and the new keys/values landed in each row
            new = as_rows[:, :, r, :, :len(ids) + 1]
            assert (new - kv[:, :, :, :len(ids) + 1]).abs().max() < 1e-5 * new.abs().max()
    # fp32 sums in another order: ~1e-6 of the logits' scale (this model's run to about 100).
    assert (batched - solo).abs().max() < 1e-5 * solo.abs().max()
    assert (batched.argmax(-1) == solo.argmax(-1)).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_packed_linears_agree_with_plain_ones(sharp_model, dtype, tol):
    """The server's packed linear layers (oneDNN's blocked weights, GELU fused) against nn.Linear,
    prefill and a batched decode step. fp32: sums in another order, ~1e-6 of the logits' scale.
    bf16: each matmul's output rounded to 8 bits of mantissa (2^-8 relative), compounded over
    two blocks, and the fused GELU rounds once where the plain path rounds twice; 5% of the
    logits' scale bounds that with room, and the top tokens must still agree."""
    from stoker.models.gpt import SlotKVCache

    model, tok = sharp_model
    plain = deepcopy(model).to(dtype)
    fast = packed(plain)
    ids = torch.tensor([tok.encode(p)[:3] for p in PROMPTS[1:]])  # 4 rows of 3 tokens
    out = []
    with torch.inference_mode():
        for m in (plain, fast):
            slots = torch.zeros(2, m.cfg.n_layer, 2, len(ids), m.cfg.kv_heads, 4, m.cfg.head_dim, dtype=dtype)
            first = m.forward_cached(ids, SlotKVCache(slots, [0] * len(ids)))
            step = m.forward_cached(first[:, -1:].argmax(-1), SlotKVCache(slots, [3] * len(ids)))
            out.append(torch.cat([first, step], 1).float())
    scale = out[0].abs().max()
    assert (out[0] - out[1]).abs().max() < tol * scale
    assert (out[0].argmax(-1) == out[1].argmax(-1)).float().mean() >= (1.0 if dtype == torch.float32 else 0.9)


def test_the_batch_buffer_waits_for_the_next_burst_and_a_new_row_reads_nothing_old(sharp_model):
    """Kept after a burst and reused by the next (no new allocation), then freed when idle; a
    sequence that joins a kept row never reads what was there, even NaN (a masked NaN key still
    makes the softmax NaN, and a zero weight times a NaN value is NaN)."""
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=4, keep_slots_s=1.0)
    prompt = tok.encode(PROMPTS[2])
    try:
        first = engine.generate(prompt, GREEDY)
        kept = engine._slots
        assert kept is not None
        with torch.inference_mode():
            kept.fill_(float("nan"))  # whatever an earlier request left there
        again = engine.generate(prompt, GREEDY)
        assert engine._slots is not None and engine._slots.data_ptr() == kept.data_ptr()  # reused, not made anew
        assert again.token_ids == first.token_ids and again.finish_reason == first.finish_reason
        deadline = time.time() + 15
        while engine._slots is not None and time.time() < deadline:
            time.sleep(0.05)
        assert engine._slots is None  # idle past keep_slots_s: the memory is back
    finally:
        engine.close()


def test_after_a_long_burst_a_short_one_reads_a_shorter_buffer_in_the_same_memory(sharp_model):
    """Attention reads every row's whole length, so a buffer kept from long prompts must not
    stay that long for short ones: with no live row it is cut to what the newcomers need, in
    the memory it had (no fresh pages), and grows back into that memory; whatever the memory
    held (NaN here) never reaches a token."""
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=4, keep_slots_s=60.0)
    short = tok.encode(PROMPTS[2])
    long = (tok.encode(" ".join(PROMPTS)) * 20)[: model.cfg.block_size - GREEDY.max_tokens - 1]
    try:
        want = engine.generate(short, GREEDY)
        capacity = lambda: engine._slots.size(0) * engine._slots.size(5)  # noqa: E731
        short_len = capacity()
        engine.generate(long, GREEDY)
        long_len, store = capacity(), engine._store
        assert long_len > short_len
        with torch.inference_mode():
            store.fill_(float("nan"))
        again = engine.generate(short, GREEDY)
        assert capacity() == short_len and engine._store is store
        assert engine._slots.data_ptr() == store.data_ptr()
        assert again.token_ids == want.token_ids
        engine.generate(long, GREEDY)
        assert capacity() == long_len and engine._store is store
    finally:
        engine.close()


def test_the_batch_buffer_has_rows_for_a_whole_burst_from_its_first_row(sharp_model):
    """Rows join one by one as their prompts complete; the buffer is made once with as many
    rows as max_batch and the KV budget allow, not grown (a copy and fresh pages) as they come."""
    model, tok = sharp_model
    text = tok.encode(" ".join(PROMPTS) * 4)
    prompts = [text[i: i + 10] for i in range(4)]  # one length: one row length for all
    alone = [Engine(model, tok, max_batch=1).generate(p, GREEDY).token_ids for p in prompts]
    length = -(-(10 + GREEDY.max_tokens - 1) // KV_BLOCK) * KV_BLOCK  # a row: prompt and new tokens, in whole blocks
    per_token = model.cfg.n_layer * 2 * model.cfg.n_embd * 4
    for budget_rows, want_rows in ((100, 4), (3, 3)):
        engine = Engine(model, tok, max_batch=4, prefill_chunk=4, kv_budget_bytes=budget_rows * length * per_token)
        shapes, grow = [], engine._grow
        engine._grow = lambda *a: shapes.append(((out := grow(*a)).size(3), out.size(4), out.size(0) * out.size(5))) or out
        events = [[] for _ in prompts]
        try:
            with engine._cv:  # all waiting before the engine admits any
                for i, p in enumerate(prompts):
                    engine.submit(p, GREEDY, events[i].append)
            deadline = time.time() + 60
            while not all(e and e[-1].finish_reason for e in events) and time.time() < deadline:
                time.sleep(0.01)
            assert [[t for ev in e for t in ev.token_ids] for e in events] == alone
            assert shapes == [(want_rows, model.cfg.n_head, length)]  # made once, for the whole burst
        finally:
            engine.close()


def test_packed_mlp_runs_gelu_inside_its_first_matmul(sharp_model):
    """The serving path's MLP hands GELU to the packed matmul's kernel: no separate GELU pass
    over the activations (it was lost once, unnoticed, costing 3% of a decode step)."""
    from torch.profiler import profile

    model = packed(deepcopy(sharp_model[0]))
    with torch.inference_mode(), profile() as prof:
        model(torch.zeros(2, 4, dtype=torch.long))
    names = {e.name for e in prof.events()}
    assert "mkldnn::_linear_pointwise" in names and "aten::gelu" not in names


def test_chunked_prefill_and_the_prefix_cache_give_the_whole_prompts_cache(sharp_model):
    from stoker.models.gpt import KVCache
    from stoker.serve.engine import PrefixCache

    model, tok = sharp_model
    ids = tok.encode(PROMPTS[3] * 2)[:37]
    whole, chunked = model.new_cache_buffer(37), model.new_cache_buffer(37)
    with torch.no_grad():
        ref = model.forward_cached(torch.tensor([ids]), KVCache([whole], [0]))[0, -1]
        for s in range(0, 37, 8):  # chunks of 8, the last of 5
            last = model.forward_cached(torch.tensor([ids[s:s + 8]]), KVCache([chunked], [s]), last_only=True)[0, -1]
    # Rounding only (another chunking sums in another order): ~1e-6 of the values' scale.
    assert (chunked - whole).abs().max() < 1e-5 * whole.abs().max() and (last - ref).abs().max() < 1e-5 * ref.abs().max()
    cache = PrefixCache(block=16, budget_bytes=1 << 30)
    cache.insert(ids, whole)
    assert [b.size(3) for b in cache.lookup(ids)] == [16, 16]  # two whole blocks; the rest is computed
    assert [b.size(3) for b in cache.lookup(ids[:33])] == [16, 16]
    assert [b.size(3) for b in cache.lookup(ids[:32])] == [16]  # its last token must stay to compute
    assert cache.lookup([ids[0] + 1] + ids[1:]) == []  # another first token: nothing in common
    assert torch.equal(torch.cat(cache.lookup(ids), dim=3), whole[:, :, :, :32])
    # Room for one block: the second goes, as a child goes before its parent (without the parent
    # the child could never be found).
    small = PrefixCache(block=16, budget_bytes=cache.used // 2)
    small.insert(ids, whole)
    assert small.used <= cache.used // 2 and [b.size(3) for b in small.lookup(ids)] == [16]


def test_prefix_cache_and_chunked_prefill_in_the_engine(sharp_model):
    model, tok = sharp_model
    system = tok.encode("# A system prompt that every request shares, long enough for blocks.\n" * 2)[:20]
    prompts = [system + tok.encode(p) for p in PROMPTS]
    plain = Engine(model, tok, max_batch=4, prefix_cache_bytes=0, prefill_chunk=1000)
    try:
        want = [plain.generate(p, GREEDY).token_ids for p in prompts]
    finally:
        plain.close()
    hits: list[tuple[int, int]] = []

    class Hits(EngineMetrics):
        def prefix_hit(self, tokens: int, of: int) -> None:
            hits.append((tokens, of))

    engine = Engine(model, tok, max_batch=4, prefix_block=8, prefill_chunk=7, metrics=Hits())
    try:
        got = [engine.generate(p, GREEDY).token_ids for p in prompts]
    finally:
        engine.close()
    assert got == want  # the sharp model's margins are far above the rounding of another chunking
    # The first request finds nothing; the others reuse the shared prefix's 2 whole blocks of 8.
    assert [t for t, _ in hits] == [0] + [16] * (len(prompts) - 1)


def test_in_throughput_mode_a_failure_in_prefill_or_decode_ends_its_own_request(sharp_model):
    model, tok = sharp_model
    engine = Engine(model, tok, max_batch=4, prefill_chunk=5, prefix_block=4, keep_slots_s=0.05)
    real_prefilled, real_pick, real_forward = engine._prefilled, engine._pick, model.forward_cached

    def prefilled(seq, n, logits):
        if seq.params.seed == 13 and seq.filled > 0:  # after its second chunk
            raise RuntimeError("prefill poisoned")
        return real_prefilled(seq, n, logits)

    def pick(seq, logits):
        if seq.params.seed == 666 and seq.sampled == 3:
            raise RuntimeError("decode poisoned")
        return real_pick(seq, logits)

    def forward(idx, cache, last_only=False):  # a packed prefill that holds token 499 fails whole
        if idx.size(1) > 1 and 499 in idx.tolist()[0] and len(getattr(cache, "lengths", ())) > 1:
            raise RuntimeError("pack poisoned")
        if idx.size(1) > 1 and 499 in idx.tolist()[0]:  # and alone, only its own request
            raise RuntimeError("prompt poisoned")
        return real_forward(idx, cache, last_only=last_only)

    engine._prefilled, engine._pick = prefilled, pick
    model.forward_cached = forward
    prompts = [tok.encode(p) for p in PROMPTS]
    try:
        solo = [engine.generate(p, GREEDY) for p in prompts]
        mixed = [(p, GREEDY) for p in prompts]
        mixed.insert(1, (prompts[3], SamplingParams(max_tokens=20, temperature=0, seed=13)))
        mixed.insert(3, (prompts[2], SamplingParams(max_tokens=20, temperature=0, seed=666)))
        mixed.insert(5, (prompts[4][:3] + [499] + prompts[4][3:], GREEDY))
        busy = run_staggered(engine, [p for p, _ in mixed], [sp for _, sp in mixed], joins=[0, 0, 0, 0, 1, 2, 4, 4])
        after = engine.generate(prompts[0], GREEDY)
        deadline = time.time() + 10
        while engine._slots is not None and time.time() < deadline:  # kept 0.05 s for a next burst
            time.sleep(0.02)
    finally:
        engine.close()
        del model.forward_cached
    assert [b.finish_reason for b in busy].count("error") == 3
    assert busy[1].finish_reason == busy[3].finish_reason == busy[5].finish_reason == "error"
    good = [b for i, b in enumerate(busy) if i not in (1, 3, 5)]
    assert [b.token_ids for b in good] == [s.token_ids for s in solo]
    assert after.token_ids == solo[0].token_ids
    assert engine._slots is None and engine._rows == []  # everything freed once idle


def test_an_engine_refuses_a_keep_time_its_wait_cannot_take(sharp_model):
    """The batch buffer's keep time bounds a condition wait: an infinite or NaN one would fail
    inside the engine thread (an overflowing timeout), leaving every later request unanswered,
    so it is refused where the engine is made."""
    model, tok = sharp_model
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="keep_slots_s"):
            Engine(model, tok, keep_slots_s=bad)
