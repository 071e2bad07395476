"""Hugging Face import and export against transformers itself: small random GPT-2 and Llama
models built locally (nothing downloaded), imported, compared logit for logit and token for
token, exported back and loaded by transformers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import processors

from stoker.config import ConfigError
from stoker.data.prepare import default_sources
from stoker.data.tokenizer import train_bpe
from stoker.generate import load_trained, sample
from stoker.models.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

# Llama 3's chat format, in the Jinja that chat templates are written in.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
                 "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
TEXT = "def add(a, b):\n    return a + b  # sum\n\nclass Füße:\n    \"\"\"ünïcödé ✓ 😀 tabs\tand  spaces\"\"\"\n"


def _texts():
    src = default_sources()[0] / "json"
    return [p.read_text() for p in sorted(src.glob("*.py"))]


def _tokenizer(dest, llama: bool):
    """A byte-level BPE tokenizer saved the way transformers saves one; the Llama one adds a
    beginning-of-text token in front of every text, as Llama 3's does."""
    tok = train_bpe(_texts(), 400)
    kw = {"eos_token": "<|endoftext|>"}
    if llama:
        tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
        kw["bos_token"] = "<|begin_of_text|>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if llama:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    return fast


def _save(model, tok, dest):
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    made = {}
    gpt2_tok = _tokenizer(root / "gpt2", llama=False)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(gpt2_tok), n_positions=160,
        bos_token_id=gpt2_tok.eos_token_id, eos_token_id=gpt2_tok.eos_token_id)).eval()
    _save(gpt2, gpt2_tok, root / "gpt2")
    made["gpt2"] = (gpt2, gpt2_tok)
    llama_tok = _tokenizer(root / "llama", llama=True)
    # GQA (2 key/value heads for 4), Llama 3 rope scaling with a short original context so that
    # it changes the frequencies here, an untied head.
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(llama_tok) + 3, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id)).eval()
    with torch.no_grad():  # random norms and the unused extra vocabulary rows: a mapping mistake shows
        for m in llama.modules():
            if isinstance(m, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                m.weight.uniform_(0.5, 1.5)
    _save(llama, llama_tok, root / "llama")
    made["llama"] = (llama, llama_tok)
    for name in made:
        import_hf(root / name, root / f"{name}-run", progress=False)
    return root, made


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_imported_model_gives_transformers_logits_and_greedy_tokens(hf_models, name):
    root, made = hf_models
    ref, ref_tok = made[name]
    model, tok, step = load_trained(root / f"{name}-run")
    assert step == 0
    ids = ref_tok(TEXT)["input_ids"]
    # The same text gives the same ids (the beginning-of-text token included, for Llama).
    assert tok.encode(TEXT) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        want = ref(x).logits
    got = model(x)
    # Both fp32 on the same weights; only the order of a few sums differs (fused vs split
    # q/k/v, SDPA vs eager attention): a few ulp of logits of size ~1.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    prompt = ids[:12]
    with torch.no_grad():
        hf_out = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=ref_tok.eos_token_id)[0, len(prompt):].tolist()
    assert sample(model, prompt, 20, temperature=0) == hf_out
    # The serving engine (batched decode over the model's cached path, GQA caches for Llama)
    # gives the same tokens, alone and beside other requests.
    from stoker.serve.engine import Engine, SamplingParams

    engine = Engine(model, tok, max_batch=4)
    try:
        params = SamplingParams(max_tokens=20, temperature=0)
        others = [engine.submit(ids[i:i + 5], params, lambda ev: None) for i in (3, 9, 30)]
        got = engine.generate(prompt, params).token_ids
        assert others and got == hf_out[: len(got)] and (len(got) == 20 or hf_out[len(got)] == tok.eot_id)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_round_trip(hf_models, tmp_path, name):
    root, made = hf_models
    ref, ref_tok = made[name]
    out = export_hf(root / f"{name}-run", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert back_tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]
    x = torch.tensor([ref_tok(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    # HF -> stoker -> HF gives the very tensors transformers saved.
    mine, theirs = load_file(out / "model.safetensors"), load_file(root / name / "model.safetensors")
    theirs = {k: v for k, v in theirs.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    # stoker -> HF -> stoker: identical tensors.
    again = import_hf(out, tmp_path / "again", progress=False)
    a, _, _ = load_trained(root / f"{name}-run")
    b, _, _ = load_trained(again)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_sharded_weights_with_their_index_import_the_same(hf_models, tmp_path):
    root, made = hf_models
    ref, ref_tok = made["llama"]
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    ref_tok.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    run = import_hf(tmp_path / "sharded", tmp_path / "run", progress=False)
    a, _, _ = load_trained(run)
    b, _, _ = load_trained(root / "llama-run")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_import_errors_are_one_line(hf_models, tmp_path):
    root, _ = hf_models
    cases = []
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases.append((bad, "model_type 'bert' is not supported"))
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    cases.append((nocfg, "config.json: missing"))
    for what, text in cases:
        with pytest.raises(ConfigError, match=text):
            import_hf(what, tmp_path / "out", progress=False)
    # A shape the config does not make: named with both shapes.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in (root / "llama").iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ConfigError, match=r"mlp\.\w+_proj\.weight. has shape \((88, 32|32, 88)\); the config makes it \((96, 32|32, 96)\)"):
        import_hf(wrong, tmp_path / "out", progress=False)
    # A tensor missing from the weights: named.
    (wrong / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    tensors = load_file(wrong / "model.safetensors")
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"the weights lack 'blocks.1.mlp.gate.weight'$"):
        import_hf(wrong, tmp_path / "out", progress=False)
    # Pickle weights only: refused, never loaded.
    (wrong / "model.safetensors").rename(wrong / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickle"):
        import_hf(wrong, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "stoker", "import", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bert" in r.stderr


def test_cached_decode_equals_the_full_forward_for_both_families():
    from stoker.models.gpt import GPT, GPTConfig, KVCache

    torch.manual_seed(0)
    for preset in ("debug", "llama-debug"):
        model = GPT(GPTConfig.from_preset(preset, vocab_size=100, block_size=64)).eval()
        idx = torch.randint(0, 100, (1, 24))
        full = model(idx)
        buf = model.new_cache_buffer(24)
        # A prompt of 10, then 4 tokens at once after the cache, then one at a time.
        parts = [model.forward_cached(idx[:, :10], KVCache([buf], [0])),
                 model.forward_cached(idx[:, 10:14], KVCache([buf], [10]))]
        parts += [model.forward_cached(idx[:, i:i + 1], KVCache([buf], [i])) for i in range(14, 24)]
        # fp32; the cached path sums the same products over the same keys, in SDPA's other
        # kernels (one query row, or an explicit mask): rounding-level differences.
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_continued_pretraining_of_an_imported_model_on_two_processes(hf_models, small_data, tmp_path):
    from conftest import losses
    from stoker.data.prepare import prepare
    from stoker.generate import evaluate

    root, made = hf_models
    run = root / "llama-run"
    data = tmp_path / "data"
    prepare([default_sources()[0] / "json", default_sources()[0] / "email"], data, val_fraction=0.2,
            progress=False, tokenizer=run)
    assert (data / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    before = evaluate(run, batches=2, batch_size=4, data_dir=data, seq_len=32)
    out = tmp_path / "cont"
    # FSDP over 2 processes, from the imported weights, with a learning rate so small that
    # the weights stay where they started: what the run holds after 2 steps is what it loaded.
    r = subprocess.run([sys.executable, "-m", "stoker", "train", f"--model.init_from={run}", f"--data.dir={data}",
                        f"--train.out_dir={out}", "--train.steps=2", "--train.lr=1e-7", "--train.warmup_steps=0",
                        "--train.seq_len=32", "--train.batch_size=4", "--train.eval_every=0", "--train.progress=false",
                        "--parallel.dp_shard=2", "--nproc=2"],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                          "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(losses(out)) == [1, 2]
    a, _, _ = load_trained(run)
    b, tok, step = load_trained(out)
    assert step == 2 and tok.eot == "<|endoftext|>"
    for (name, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        # Adam moves each weight by about lr per step: 2e-7 at most; a fresh init is ~0.02 away.
        assert (va - vb).abs().max() < 1e-5, name
    after = evaluate(out, batches=2, batch_size=4, data_dir=data)  # its own train.seq_len: 32
    # The same weights to ~1e-7 on the same windows: the same loss to well under a step's change.
    assert abs(after["val_loss"] - before["val_loss"]) < 1e-4
    # Data tokenized another way is refused, in one line.
    bad = subprocess.run([sys.executable, "-m", "stoker", "train", f"--model.init_from={run}",
                          f"--data.dir={small_data}", f"--train.out_dir={tmp_path / 'x'}"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "stoker prepare --tokenizer" in bad.stderr


def test_chat_template_renders_and_encodes_as_transformers_does(hf_models):
    root, made = hf_models
    ref, ref_tok = made["llama"]
    tok = load_trained(root / "llama-run")[1]
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is 2 + 2?"}]
    want = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tok.chat_ids(messages) == want
    assert tok.chat(messages).startswith("<|begin_of_text|><|start_header_id|>system")
    # A template cannot reach Python: the sandbox refuses attribute access to internals.
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValueError, match="chat template"):
        tok.chat(messages)
    # `generate --chat`: the reply to one user message, greedy, as transformers generates it.
    prompt = ref_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    r = subprocess.run([sys.executable, "-m", "stoker", "generate", str(root / "llama-run"), "--chat", "--prompt", "hi",
                        "--temperature", "0", "--max-new-tokens", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(out) + "\n"
    gpt2 = subprocess.run([sys.executable, "-m", "stoker", "generate", str(root / "gpt2-run"), "--chat", "--prompt",
                           "hi"], capture_output=True, text=True)
    assert gpt2.returncode == 2 and "no chat template" in gpt2.stderr
