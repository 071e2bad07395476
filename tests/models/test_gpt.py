import math

import pytest
import torch

from stoker.models.gpt import GPT, GPTConfig, count_params, flops_per_token, loss_fn
from stoker.models.presets import GPT3_PAPER_PARAMS, LLAMA_PUBLISHED_PARAMS, PRESETS


@pytest.mark.parametrize("name", sorted(GPT3_PAPER_PARAMS))
def test_gpt3_param_counts_match_paper(name):
    n = count_params(GPTConfig.from_preset(name))
    # Table 2.1 of the GPT-3 paper rounds its counts (e.g. "350M"), and its head sizes for
    # 1.3B/13B do not divide d_model: 2% covers both.
    assert abs(n / GPT3_PAPER_PARAMS[name] - 1) < 0.02, (name, n)


def test_175b_is_described_on_meta_without_allocating():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt3-175b"))
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight


def test_175b_training_flops_match_paper():
    # GPT-3 paper, Table D.1: 175B on 300B tokens = 3.14e23 FLOPs, counted as 6N per token.
    # Our count adds the attention-score term (~3% at 2048 context), so allow 5%.
    cfg = GPTConfig.from_preset("gpt3-175b")
    total = flops_per_token(cfg, 2048) * 300e9
    assert abs(total / 3.14e23 - 1) < 0.05


def test_debug_preset_shape_and_forward():
    p = PRESETS["debug"]
    assert p.n_layer >= 4 and p.n_head % 2 == 0
    cfg = GPTConfig.from_preset("debug", vocab_size=512, block_size=64)
    assert 1e5 <= count_params(GPTConfig.from_preset("debug")) < 1e6
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 512, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 512)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_loss_at_init_is_log_vocab():
    cfg = GPTConfig.from_preset("debug", vocab_size=8192, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 64))
    loss = loss_fn(model(idx), torch.randint(0, cfg.vocab_size, (4, 64))).item()
    # Init logits have std ~ sqrt(n_embd) * 0.02 ~ 0.11, which raises the loss above ln(V) by
    # about var/2 ~ 0.006 nats: 0.05 leaves room for sampling noise, and fails a broken init.
    assert abs(loss - math.log(cfg.vocab_size)) < 0.05


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("debug", vocab_size=256, block_size=32)).eval()
    a = torch.randint(0, 256, (1, 20))
    b = a.clone()
    b[0, 10:] = torch.randint(0, 256, (10,))
    torch.testing.assert_close(model(a)[0, :10], model(b)[0, :10])


@pytest.mark.parametrize("name", sorted(LLAMA_PUBLISHED_PARAMS))
def test_llama_param_counts_equal_the_published_ones(name):
    # Exact: the published figure is the sum of the released tensors, and the shapes are the same.
    assert count_params(GPTConfig.from_preset(name)) == LLAMA_PUBLISHED_PARAMS[name]


def test_llama_options_are_what_the_preset_says():
    cfg = GPTConfig.from_preset("llama3-8b")
    with torch.device("meta"):
        model = GPT(cfg)
    attn, mlp = model.blocks["0"].attn, model.blocks["0"].mlp
    assert model.wpe is None and model.lm_head.weight is not model.wte.weight
    assert attn.k_proj.weight.shape == (8 * 128, 4096) and attn.q_proj.bias is None
    assert mlp.gate.weight.shape == (14336, 4096) and isinstance(model.ln_f, torch.nn.RMSNorm)
    with pytest.raises(ValueError, match="n_kv_head 3 does not divide n_head 4"):
        GPTConfig.from_preset("llama-debug", n_kv_head=3)


def test_llama3_rope_scaling_matches_the_reference_formula():
    # Llama 3's rule, written out per frequency as its release describes it: wavelengths over
    # 8192/1 slowed by 8, under 8192/4 kept, a linear blend of the two in between.
    from stoker.models.gpt import rope_frequencies

    cfg = GPTConfig.from_preset("llama3-8b")
    got = rope_frequencies(cfg).double()
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).double() / 128))
    want = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(f)
        elif wavelen > 8192 / 1:
            want.append(f / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want.append((1 - smooth) * f / 8 + smooth * f)
    # fp32 frequencies against float64 ones: relative rounding of a few 1e-7.
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)


def test_linear_cross_entropy_matches_the_full_logits_loss_in_float64():
    from stoker.models.gpt import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[[3, 20]] = -100  # ignored, as F.cross_entropy ignores them
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_elems=50 * 8, min_rows=1)  # 8 rows a chunk: 5, the last short
    grads = torch.autograd.grad(3.0 * loss, (h, w))  # the incoming gradient scales both
    # The softmax runs in fp32 (as loss_fn's does): agreement to fp32's ~1e-7 relative, not float64's.
    assert abs(loss.item() - ref.item()) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, 3.0 * b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tie", [True, False])
def test_loss_through_the_model_matches_loss_fn_under_bf16_autocast(tie):
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=300, block_size=32, tie_embeddings=tie)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 300, (3, 33))
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:]) if fused else loss_fn(model(x[:, :-1]), x[:, 1:])
        results.append((loss.item(), torch.autograd.grad(loss, list(model.parameters()))))
    (a, ga), (b, gb) = results
    # Both round the head's matmul to bf16 alike, so the losses agree to fp32 summation order;
    # the chunked gradient accumulates in fp32 where autocast's rounds to bf16 (8-bit mantissa):
    # within 2% relative of each parameter's gradient norm.
    assert abs(a - b) < 1e-4
    for p_a, p_b in zip(ga, gb):
        if p_a.norm() > 1e-6:  # a key bias's exact gradient is zero: only rounding is left to compare
            assert (p_a - p_b).norm() / p_a.norm() < 0.02


def test_matmul_attention_matches_sdpa_in_float64_with_grouped_heads_and_rope():
    from stoker.models.gpt import set_attention

    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=100, block_size=16, pos="rope",
                    norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    model = GPT(cfg).double()
    x = torch.randint(0, 100, (2, 16))
    out = {}
    for kernel in ("sdpa", "matmul"):
        set_attention(model, kernel)
        loss = model(x[:, :-1], x[:, 1:])
        out[kernel] = (model(x).detach(), torch.autograd.grad(loss, list(model.parameters())))
    assert torch.allclose(out["sdpa"][0], out["matmul"][0], atol=1e-10)  # float64: rounding only
    for a, b in zip(out["sdpa"][1], out["matmul"][1]):
        assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="sdpa, matmul"):
        set_attention(model, "flash")
