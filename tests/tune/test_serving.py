"""Adapters served per request on one base: what each computes, mixed batches, slots, HTTP."""

import copy
import shutil
import threading

import httpx
import pytest
import torch
from safetensors.torch import save_file

from stoker.cli import main
from stoker.config import ConfigError
from stoker.data.tokenizer import Tokenizer
from stoker.generate import load_trained, run_model_config
from stoker.models.gpt import GPT, KVCache, pack_linears
from stoker.serve.adapters import Adapters, describe
from stoker.serve.engine import Engine, Event, SamplingParams
from stoker.serve.models import ModelPool, parse_adapters, parse_models
from stoker.serve.server import BackgroundServer, create_app
from stoker.tune.adapters import apply_adapter, save_adapter
from stoker.tune.lora import apply_lora, lora_layers
from stoker.tune.prompt import apply_prompt

PROMPTS = ["import os\nfor i in", "def f(x):\n    return", "class A:\n", "x = [1, 2"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def make_adapters(base, root):
    """Adapters of `base`, made rather than trained (updates drawn large enough to change greedy
    text): two LoRA (GPT-2's fused q/v and the MLP; o_proj alone at another rank), a prompt, a
    two-task multitask prompt."""
    for name, targets, rank, seed in [("l1", "q_proj,v_proj,fc,proj", 4, 1), ("l2", "o_proj", 2, 2)]:
        m = copy.deepcopy(base)
        apply_lora(m, targets, rank, 2 * rank, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(m).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        save_adapter(m, root / name)
    m = copy.deepcopy(base)
    apply_prompt(m, 5, seed=3)
    with torch.no_grad():
        m.prompt.embedding.mul_(10)  # token embeddings are small: scaled up to steer the text
    save_adapter(m, root / "p1")
    m = copy.deepcopy(base)
    apply_prompt(m, 4, tasks=["first", "last"], task_rank=2, seed=4)
    with torch.no_grad():
        m.prompt.embedding.mul_(10)
        m.prompt.task_cols.normal_(1, 0.5, generator=torch.Generator().manual_seed(5))
    save_adapter(m, root / "mt")
    return root


@pytest.fixture(scope="module")
def adapters(tune_base, tmp_path_factory):
    return make_adapters(load_trained(tune_base)[0], tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def sharp(tune_base, tmp_path_factory):
    """A random model of the tune base's shape, weights scaled up 8x, and adapters of it: its
    greedy tokens change from step to step with a clear lead (a briefly trained toy repeats one
    token), which makes token-for-token comparisons a strong test."""
    model = GPT(run_model_config(tune_base))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model.eval(), Tokenizer.load(tune_base), make_adapters(model, tmp_path_factory.mktemp("sharp"))


def reference(tune_base, adapters, name):
    """The base with the adapter applied as training applies it (full forward, no cache)."""
    model, _, _ = load_trained(tune_base)
    apply_adapter(model, adapters / name.split(":")[0])
    return model.eval()


def specs_of(model, adapters):
    return [s for n in ("l1", "l2", "p1", "mt") for s in describe(model, n, adapters / n)]


def test_each_row_of_a_mixed_call_computes_what_its_adapter_does(tune_base, adapters):
    served, tok, _ = load_trained(tune_base)
    pack_linears(served)
    bank = Adapters(served.eval(), specs_of(served, adapters), slots=8)
    names = [None, "l1", "l2", "p1", "mt:last"]
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    T = ids.size(1)
    with torch.inference_mode():
        slots = [bank.acquire(n, set()) if n else 0 for n in names]
        bufs, starts = [], []
        for n in names:
            N = bank.virtual(n)
            buf = served.new_cache_buffer(N + T)
            if N:
                buf[:, :, :, :N] = bank.virtual_kv[n]
            bufs.append(buf)
            starts.append(N)
        bank.select([s for s in slots for _ in range(T)])
        got = served.forward_cached(ids.expand(len(names), T), KVCache(bufs, starts))
        base, _, _ = load_trained(tune_base)
        for row, n in enumerate(names):
            ref = reference(tune_base, adapters, n) if n else base
            want = ref(ids, **({"task": torch.tensor([1])} if n == "mt:last" else {}))[0]
            # Packed (oneDNN) against plain kernels and the update unmerged in both: fp32
            # rounding, ~1e-6 of the logits' scale.
            assert (got[row] - want).abs().max() <= 1e-5 * want.abs().max(), n
            if n:
                assert (want - base(ids)[0]).abs().max() > 0.05, f"{n} hardly changes the base: a weak test"


def run_all(engine, requests):
    """Submit every (prompt ids, adapter) at once; their token ids."""
    out = [None] * len(requests)
    done = [threading.Event() for _ in requests]

    def on_event(i, ev: Event):
        out[i] = (out[i] or []) + ev.token_ids
        if ev.finish_reason:
            assert ev.error is None, ev.error
            done[i].set()

    for i, (ids, name) in enumerate(requests):
        engine.submit(ids, GREEDY, lambda ev, i=i: on_event(i, ev), adapter=name)
    for d in done:
        assert d.wait(60)
    return out


@pytest.mark.parametrize("invariant", [True, False])
def test_mixed_adapter_batch_equals_each_adapter_alone(sharp, invariant):
    model, tok, adapters = sharp
    model = copy.deepcopy(model)
    pack_linears(model)
    engine = Engine(model, tok, max_batch=8, batch_invariant=invariant,
                    adapters=Adapters(model, specs_of(model, adapters), slots=8))
    names = [None, "l1", "l2", "p1", "mt:first", "mt:last"]
    requests = [(tok.encode(p), n) for n in names for p in PROMPTS[:2]]
    try:
        alone = [run_all(engine, [r])[0] for r in requests]
        together = run_all(engine, requests)
    finally:
        engine.close()
    assert len({tuple(t) for t in alone}) >= 8, "adapters barely change the text: a weak test"
    if invariant:
        assert together == alone
    else:  # rows' bits depend on the batch's row count: the first tokens agree (no near tie there)
        assert [t[:4] for t in together] == [t[:4] for t in alone]


def test_adapter_slots_are_least_recently_used_and_never_taken_from_a_running_request(tune_base, adapters):
    model, tok, _ = load_trained(tune_base)
    bank = Adapters(model, specs_of(model, adapters), slots=2)
    assert (bank.acquire("l1", set()), bank.acquire("p1", set())) == (1, 2)
    assert bank.acquire("l1", set()) == 1 and bank.loads == 2  # loaded: nothing read again
    assert bank.acquire("l2", {1, 2}) is None  # both held by running requests: it waits
    assert bank.acquire("l2", {1}) == 2 and "p1" not in bank.loaded and "p1" not in bank.virtual_kv
    assert bank.acquire("mt:first", set()) == 1 and list(bank.loaded) == ["l2", "mt:first"]  # l1 was older
    # A slot that changes hands is cleared: l1's updates are gone from the layers it adapted.
    layer = bank.layers["blocks.0.attn.q_proj"]
    assert not layer.A.any() and not layer.B.any()


def test_served_over_http_by_name_with_parent_and_metrics(tune_base, adapters, tmp_path):
    run = tmp_path / "base"
    shutil.copytree(tune_base, run)
    shutil.copytree(adapters / "p1", run / "adapters" / "found")  # found by itself under adapters/
    runs = parse_models([f"code={run}"])
    pool = ModelPool(runs, adapters=parse_adapters([f"mine={adapters / 'l1'}", f"tasks={adapters / 'mt'}"], runs),
                     max_adapters=2, max_batch=4, batch_invariant=True)
    model, tok, _ = load_trained(run)
    pack_linears(model)
    engine = Engine(model, tok, max_batch=4, batch_invariant=True,
                    adapters=Adapters(model, specs_of(model, adapters) + describe(model, "found", adapters / "p1"),
                                      slots=2))
    try:
        with BackgroundServer(create_app(pool)) as url:
            listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
            assert set(listed) == {"code", "found", "mine", "tasks:first", "tasks:last"}
            assert listed["mine"]["parent"] == "code" and listed["code"]["parent"] is None
            assert listed["found"]["context_length"] == listed["code"]["context_length"] - 5  # its virtual tokens
            # Two slots: found takes mine's (the least recently used), and mine comes back into tasks:last's.
            for served, ours in [("mine", "l1"), ("tasks:last", "mt:last"), ("found", "found"), ("code", None),
                                 ("mine", "l1")]:
                r = httpx.post(f"{url}/v1/completions", json={"model": served, "prompt": PROMPTS[1], "max_tokens": 8,
                                                              "temperature": 0}, timeout=60)
                assert r.status_code == 200, r.text
                want = engine.generate(tok.encode(PROMPTS[1]), SamplingParams(max_tokens=8, temperature=0), ours)
                assert r.json()["choices"][0]["text"] == want.text, served
                assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(PROMPTS[1]))  # virtual ones not counted
            r = httpx.post(f"{url}/v1/completions", json={"model": "tasks", "prompt": "x"})
            assert r.status_code == 404 and "tasks:first" in r.json()["error"]["message"]
            metrics = httpx.get(f"{url}/metrics").text
            assert 'stoker_adapter_loads_total{adapter="mine",model="code"} 2.0' in metrics
            assert 'stoker_adapter_loads_total{adapter="found",model="code"} 1.0' in metrics
            assert [l for l in metrics.splitlines() if 'kind="adapters"' in l and not l.endswith(" 0.0")]
    finally:
        pool.close()
        engine.close()


def test_cli_refuses_a_bad_adapter_in_one_line(tune_base, adapters, tmp_path, capsys):
    assert main(["serve", str(tune_base), "--adapter", f"x={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a PEFT adapter directory" in err and len(err.splitlines()) == 1
    assert main(["serve", str(tune_base), "--adapter", "nameless"]) == 2
    assert "write NAME=DIR" in capsys.readouterr().err
    wide = tmp_path / "wide"
    shutil.copytree(adapters / "p1", wide)
    save_file({"prompt_embeddings": torch.zeros(5, 7)}, str(wide / "adapter_model.safetensors"))
    assert main(["serve", str(tune_base), "--adapter", f"w={wide}"]) == 2
    assert "do not fit this model" in capsys.readouterr().err


def test_the_prefix_cache_never_gives_one_adapter_another_ones_keys(sharp):
    """The same prompt under the base, a LoRA adapter and a prompt adapter: each its own cached
    prefix blocks (a LoRA changes the keys and values of the same tokens)."""
    base, tok, adapters = sharp
    ids = tok.encode(PROMPTS[0] * 4)[:40]

    def engine():  # each its own copy: the adapters wrap the model's layers in place
        model = copy.deepcopy(base)
        pack_linears(model)
        return Engine(model, tok, max_batch=4, prefix_block=4, adapters=Adapters(model, specs_of(model, adapters), 8))

    fresh = {}
    for name in (None, "l1", "p1"):
        e = engine()
        fresh[name] = run_all(e, [(ids, name)])[0]
        e.close()
    shared = engine()
    try:
        got = {name: run_all(shared, [(ids, name)])[0] for name in (None, "l1", "p1", "l1")}
        hits = shared.prefixes.used
    finally:
        shared.close()
    assert got == fresh and len(set(map(tuple, fresh.values()))) == 3
    assert hits > 0  # the cache was in use, and the second l1 request could reuse its own blocks


def test_an_adapter_broken_after_start_fails_its_request_alone(sharp, tmp_path):
    """Adapters are read again whenever they load: one whose files went bad fails the request
    that needs it, and the requests beside it finish as they would without it."""
    base, tok, adapters = sharp
    for name in ("l1", "l2", "mt"):
        shutil.copytree(adapters / name, tmp_path / name)
    model = copy.deepcopy(base)
    pack_linears(model)
    specs = [s for n in ("l1", "l2", "mt") for s in describe(model, n, tmp_path / n)]
    with pytest.raises(ConfigError, match="stoker_tasks.json is not readable JSON"):
        (tmp_path / "mt" / "stoker_tasks.json").write_text("{not json")
        describe(model, "mt", tmp_path / "mt")
    (tmp_path / "l2" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # truncated by a bad copy
    (tmp_path / "mt" / "adapter_model.safetensors").unlink()
    engine = Engine(model, tok, max_batch=8, batch_invariant=True, adapters=Adapters(model, specs, 8))
    ids = tok.encode(PROMPTS[1])
    events: dict[str, list[Event]] = {}
    done = threading.Event()

    def on_event(name, ev):
        events.setdefault(name, []).append(ev)
        if sum(bool(e and e[-1].finish_reason) for e in events.values()) == 4:
            done.set()

    try:
        alone = {n: run_all(engine, [(ids, n)])[0] for n in (None, "l1")}
        for name in (None, "l1", "l2", "mt:last"):
            engine.submit(ids, GREEDY, lambda ev, name=name: on_event(name, ev), adapter=name)
        assert done.wait(60)
    finally:
        engine.close()
    for name in ("l2", "mt:last"):
        last = events[name][-1]
        assert last.finish_reason == "error" and f"adapter {name!r} did not load" in last.error
    for name in (None, "l1"):
        assert [t for e in events[name] for t in e.token_ids] == alone[name] and events[name][-1].error is None
