"""LoRA and prompt tuning against PEFT on transformers: the same logits both ways."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import save_file

from stoker.config import ConfigError
from stoker.models.gpt import GPT, GPTConfig
from stoker.models.hf import hf_config, to_hf
from stoker.tune.adapters import apply_adapter, save_adapter
from stoker.tune.lora import LoRALinear, apply_lora, merge_lora
from stoker.tune.prompt import apply_prompt

# fp32 throughout; PEFT sums the same products in another order (GPT-2's fused q/k/v, the
# low-rank path added separately): measured <= 4e-7 on logits of scale ~1. 1e-5 of the
# scale leaves room and stays far below the effect of any wrong or missing update.
TOL = 1e-5
FAMILIES = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300, block_size=64),
    "llama": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=300, block_size=64, norm="rmsnorm",
                  mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
}


def base(kind: str) -> GPT:
    m = GPT(GPTConfig(**FAMILIES[kind]))
    m.init_weights(seed=1)
    return m.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, a Hugging Face directory of the base model, as `stoker export` writes it)."""
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    m = base(kind)
    (d / "config.json").write_text(json.dumps(hf_config(m.cfg)))
    save_file(to_hf({k: v.detach() for k, v in m.state_dict().items()}, m.cfg), str(d / "model.safetensors"))
    return kind, d


def randomize_b(model) -> None:
    """A trained-looking adapter: B away from its zero start."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


IDX = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora-all", "lora-qv", "lora-rslora", "prompt"])
def test_stoker_adapter_gives_peft_logits_and_loads_back(exported, tmp_path, method):
    kind, hf_dir = exported
    model = base(kind)
    if method == "prompt":
        apply_prompt(model, 5, seed=3)
    else:
        apply_lora(model, "q_proj,v_proj" if method == "lora-qv" else "q_proj,k_proj,v_proj,o_proj,gate,fc,proj",
                   rank=4, alpha=8, rslora=method == "lora-rslora")
        randomize_b(model)
    save_adapter(model, tmp_path / "a", base=str(hf_dir))
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "a")
    with torch.no_grad():
        ours = model(IDX)
        theirs = pm.eval()(input_ids=IDX).logits
        theirs = theirs[:, 5:] if method == "prompt" else theirs  # PEFT returns the virtual tokens' too
        assert close(ours, theirs)
        assert not close(base(kind)(IDX), theirs)  # the adapter changes the output
        again = base(kind)
        apply_adapter(again, tmp_path / "a")
        assert torch.equal(again(IDX), ours) or close(again(IDX), ours)


def test_a_peft_made_lora_adapter_loads_into_stoker(exported, tmp_path):
    kind, hf_dir = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True))
    randomize_b(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = base(kind)
    assert apply_adapter(model, tmp_path / "peft") == "LORA"
    with torch.no_grad():
        assert close(model(IDX), pm.eval()(input_ids=IDX).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_lora_merged_equals_unmerged_and_a_new_adapter_changes_nothing():
    model = base("llama")
    ref = model(IDX)
    wrapped = apply_lora(model, "attn.*,mlp.fc", rank=4, alpha=8)
    assert len(wrapped) == 2 * 5 and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    assert torch.equal(model(IDX), ref)  # B starts at zero: exactly the base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    randomize_b(model)
    with torch.no_grad():
        unmerged = model(IDX)
        assert merge_lora(model) == 10
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        # W + s B A in fp32 against the two paths summed: rounding of the fold, ~1e-7.
        assert close(model(IDX), unmerged) and not close(ref, unmerged)


def test_adapter_errors_are_one_line(exported, tmp_path):
    kind, _ = exported
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        apply_adapter(base(kind), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="never loads"):
        apply_adapter(base(kind), tmp_path)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(300, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="not a layer of this"):
        apply_adapter(base(kind), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="IA3"):
        apply_adapter(base(kind), tmp_path)
