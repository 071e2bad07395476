"""Hugging Face model directories and stoker's model: configurations and tensor names of the
GPT-2 and Llama architectures, both ways.

Only local files are read (config.json, *.safetensors with their index); nothing is fetched
and nothing is unpickled, so a model directory from elsewhere never runs code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from stoker.config import ConfigError
from stoker.models.gpt import GPTConfig

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConfigError(f"{where}: no {key!r}")
    return hf[key]


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """stoker's GPTConfig for a Hugging Face config.json; ConfigError naming what is not supported."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {kind!r} is not supported; stoker imports: {', '.join(ARCHITECTURES)}")
    try:
        if kind == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ConfigError(f"{where}: activation_function {act!r} is not supported (stoker's GPT-2 MLP is the "
                                  "tanh-approximated GELU, gelu_new)")
            for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
                if hf.get(flag):
                    raise ConfigError(f"{where}: {flag} = true is not supported")
            if hf.get("scale_attn_weights", True) is False:
                raise ConfigError(f"{where}: scale_attn_weights = false is not supported")
            return GPTConfig(n_layer=_need(hf, "n_layer", where), n_embd=_need(hf, "n_embd", where),
                             n_head=_need(hf, "n_head", where), vocab_size=_need(hf, "vocab_size", where),
                             block_size=_need(hf, "n_positions", where), bias=True, ffn_hidden=hf.get("n_inner"),
                             norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                             tie_embeddings=hf.get("tie_word_embeddings", True))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (SwiGLU uses silu)")
        hidden, heads = _need(hf, "hidden_size", where), _need(hf, "num_attention_heads", where)
        if hf.get("head_dim") not in (None, hidden // heads):
            raise ConfigError(f"{where}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
                              f"({hidden // heads}); stoker's model needs them equal")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", hf.get("attention_bias", False))):
            raise ConfigError(f"{where}: attention_bias and mlp_bias differ; stoker's model has one bias setting")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if scaling:
            kind_ = scaling.get("rope_type", scaling.get("type"))
            if kind_ != "llama3":
                raise ConfigError(f"{where}: rope scaling {kind_!r} is not supported (only Llama 3's, 'llama3')")
            scaling = {k: float(scaling[k]) if k != "original_max_position_embeddings" else int(scaling[k])
                       for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        return GPTConfig(n_layer=_need(hf, "num_hidden_layers", where), n_embd=hidden, n_head=heads,
                         n_kv_head=hf.get("num_key_value_heads") or heads, vocab_size=_need(hf, "vocab_size", where),
                         block_size=_need(hf, "max_position_embeddings", where),
                         ffn_hidden=_need(hf, "intermediate_size", where), bias=bool(hf.get("attention_bias", False)),
                         norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu", pos="rope",
                         rope_theta=float(theta), rope_scaling=scaling,
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConfigError(f"{where}: rope scaling lacks {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def family(cfg: GPTConfig) -> str:
    """Which Hugging Face architecture holds this shape: gpt2 or llama."""
    if (cfg.norm, cfg.mlp, cfg.pos) == ("layernorm", "gelu", "learned") and cfg.bias and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    if (cfg.norm, cfg.mlp, cfg.pos) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise ConfigError(f"this model mixes the families' options (norm {cfg.norm}, mlp {cfg.mlp}, positions {cfg.pos}, "
                      f"bias {cfg.bias}): neither GPT-2 nor Llama in Hugging Face's format can hold it")


def hf_config(cfg: GPTConfig) -> dict:
    """A config.json for transformers, of the architecture `family(cfg)` names."""
    kind = family(cfg)
    if kind == "gpt2":
        return {"architectures": [ARCHITECTURES[kind]], "model_type": "gpt2", "n_layer": cfg.n_layer,
                "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_inner": cfg.ffn_hidden, "vocab_size": cfg.vocab_size,
                "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    out = {"architectures": [ARCHITECTURES[kind]], "model_type": "llama", "num_hidden_layers": cfg.n_layer,
           "hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden, "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
           "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "rope_theta": cfg.rope_theta,
           "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    return out


# Tensor names: (stoker's per-layer name, Hugging Face's), "{i}" for the layer.
_LLAMA = [("wte.weight", "model.embed_tokens.weight"), ("ln_f.weight", "model.norm.weight"),
          ("lm_head.weight", "lm_head.weight")]
_LLAMA_LAYER = [("ln_1.weight", "input_layernorm.weight"), ("ln_2.weight", "post_attention_layernorm.weight"),
                ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
                ("mlp.gate", "mlp.gate_proj"), ("mlp.fc", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")]
_GPT2 = [("wte.weight", "transformer.wte.weight"), ("wpe.weight", "transformer.wpe.weight"),
         ("ln_f.weight", "transformer.ln_f.weight"), ("ln_f.bias", "transformer.ln_f.bias"),
         ("lm_head.weight", "lm_head.weight")]
_GPT2_LAYER = [("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.o_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
               ("mlp.proj", "mlp.c_proj")]  # GPT-2's Conv1D weights are stored transposed; q/k/v are fused


def _layer_key(name: str) -> tuple[int, str] | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("h", "layers") and parts[i + 1].isdigit():
            return int(parts[i + 1]), ".".join(parts[i + 2 :])
    return None


def to_stoker(name: str, tensor: torch.Tensor, cfg: GPTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The stoker tensor(s) a Hugging Face tensor becomes (none for buffers stoker does not keep)."""
    kind = family(cfg)
    plain = name.removeprefix("transformer.") if kind == "gpt2" else name  # GPT2Model files lack the prefix
    top = {hf.removeprefix("transformer."): st for st, hf in (_LLAMA if kind == "llama" else _GPT2)}
    if plain in top:
        if plain != "lm_head.weight" or not cfg.tie_embeddings:  # a tied head is the embedding itself
            yield top[plain], tensor
        return
    if kind == "llama":
        layer = _layer_key(name)
        if layer is not None:
            i, rest = layer
            for st, hf in _LLAMA_LAYER:
                if rest == hf or rest.startswith(hf + "."):
                    yield f"blocks.{i}.{st}{rest[len(hf):]}", tensor
                    return
        raise ConfigError(f"tensor {name!r} is not part of a Llama model")
    layer = _layer_key("transformer." + plain)
    if layer is not None:
        i, rest = layer
        if rest in ("attn.bias", "attn.masked_bias"):  # the causal mask, a buffer in old files
            return
        if rest.startswith("attn.c_attn."):
            part = rest.rsplit(".", 1)[1]
            pieces = tensor.split(cfg.n_embd, dim=-1)  # weight (C, 3C) or bias (3C,)
            for proj, piece in zip(("q_proj", "k_proj", "v_proj"), pieces):
                yield f"blocks.{i}.attn.{proj}.{part}", piece.t() if part == "weight" else piece
            return
        for st, hf in _GPT2_LAYER:
            if rest.startswith(hf + "."):
                part = rest[len(hf) + 1 :]
                conv = part == "weight" and not st.startswith("ln_")
                yield f"blocks.{i}.{st}.{part}", tensor.t() if conv else tensor
                return
    raise ConfigError(f"tensor {name!r} is not part of a GPT-2 model")


def to_hf(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """stoker's state dict under Hugging Face's names (GPT-2's q/k/v fused, Conv1D transposed)."""
    kind, out = family(cfg), {}
    top = dict(_LLAMA if kind == "llama" else _GPT2)
    for name, t in state.items():
        if name in top:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            out[top[name]] = t
            continue
        _, i, rest = name.split(".", 2)
        if kind == "llama":
            st, hf = next((st, hf) for st, hf in _LLAMA_LAYER if rest == st or rest.startswith(st + "."))
            out[f"model.layers.{i}.{hf}{rest[len(st):]}"] = t
        elif rest.startswith("attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            if rest.startswith("attn.q_proj"):
                part = rest.rsplit(".", 1)[1]
                qkv = [state[f"blocks.{i}.attn.{p}.{part}"] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"transformer.h.{i}.attn.c_attn.{part}"] = (torch.cat(qkv, 0).t() if part == "weight"
                                                               else torch.cat(qkv, 0))
        else:
            st, hf = next((st, hf) for st, hf in _GPT2_LAYER if rest.startswith(st + "."))
            part = rest[len(st) + 1 :]
            conv = part == "weight" and not st.startswith("ln_")
            out[f"transformer.h.{i}.{hf}.{part}"] = t.t() if conv else t
    return {k: v.contiguous() for k, v in out.items()}


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's, or the one model.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise ConfigError(f"{index}: not a safetensors index (no weight_map)") from None
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ConfigError(f"{src / missing[0]}: missing (named by {index.name})")
        return [src / n for n in names]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    if list(src.glob("*.bin")) or list(src.glob("*.pt")):
        raise ConfigError(f"{src}: has only PyTorch pickle weights (*.bin); stoker reads safetensors only, since "
                          "loading a pickle runs code. Convert them where you trust the files.")
    raise ConfigError(f"{src}: no model.safetensors or model.safetensors.index.json")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d




def import_hf(src: str | Path, out: str | Path, progress: bool = True) -> Path:
    """A local Hugging Face model directory as a stoker run directory (model.json, the
    tokenizer, one weights-only checkpoint at step 0) that eval, generate, serve and
    `train --model.init_from` take. The weights keep their dtype; memory holds one copy of
    them and, while it is read, one tensor of the file at hand (safetensors maps files)."""
    from safetensors import SafetensorError, safe_open

    from stoker.data.tokenizer import Tokenizer
    from stoker.data.tokenizer import copy_files as copy_tokenizer
    from stoker.models.gpt import GPT
    from stoker.train.checkpoint import save_checkpoint

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConfigError(f"{src}: not a directory (a Hugging Face model directory: config.json, *.safetensors, "
                          "tokenizer.json)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not empty; give a new directory")
    cfg = config_from_hf(_read_json(src / "config.json"), str(src / "config.json"))
    if not (src / "tokenizer.json").is_file():
        raise ConfigError(f"{src / 'tokenizer.json'}: missing (stoker needs the fast tokenizer's file)")
    try:
        tok = Tokenizer.load(src)
    except ValueError as e:
        raise ConfigError(f"{src / 'tokenizer.json'}: {e}; its tokenizer_config.json should name the eos_token") from None
    except Exception as e:  # the tokenizers library's own parse error
        raise ConfigError(f"{src / 'tokenizer.json'}: cannot be read ({e})") from None
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {tok.vocab_size} tokens, the model's vocab_size is only "
                          f"{cfg.vocab_size}")
    files = weight_files(src)
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    dtype = None
    seen: set[str] = set()
    for n, path in enumerate(files):
        if progress:
            print(f"reading {path.name} ({n + 1}/{len(files)}, {path.stat().st_size / 2**30:.2f} GiB)", flush=True)
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    for name, t in to_stoker(key, f.get_tensor(key), cfg):
                        if name not in shapes:
                            raise ConfigError(f"{path.name}: tensor {key!r} has no place in this model")
                        if tuple(t.shape) != shapes[name]:
                            raise ConfigError(f"{path.name}: tensor {key!r} has shape {tuple(t.shape)}; the config "
                                              f"makes it {shapes[name]}")
                        dtype = dtype or (t.dtype if t.is_floating_point() else torch.float32)
                        # The tensor read becomes the parameter itself: no second copy of the weights.
                        module, _, attr = name.rpartition(".")
                        param = torch.nn.Parameter(t.to(dtype).contiguous(), requires_grad=False)
                        model.get_submodule(module).register_parameter(attr, param)
                        seen.add(name)
        except SafetensorError as e:
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    model.tie_weights()
    missing = sorted(set(n for n, p in model.named_parameters() if p.is_meta) | (set(shapes) - seen - (
        {"lm_head.weight"} if cfg.tie_embeddings else set())))
    if missing:
        raise ConfigError(f"{src}: the weights lack {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                          if len(missing) > 1 else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(asdict(cfg), indent=1))
    copy_tokenizer(src, out)
    save_checkpoint(out, 0, [model], None, {"loader": {}, "imported_from": str(src.resolve()), "dtype": str(dtype)},
                    keep_last=1)
    return out


def export_hf(run: str | Path, out: str | Path) -> Path:
    """A run's latest checkpoint as a Hugging Face model directory that
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load."""
    from safetensors.torch import save_file

    from stoker.data.tokenizer import copy_files as copy_tokenizer
    from stoker.generate import load_trained

    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not empty; give a new directory")
    model, tok, step = load_trained(run)
    if model.prompt is not None:
        raise ConfigError(f"{run} is a prompt-tuning run: its virtual tokens cannot fold into the weights. Export "
                          f"its base (model.init_from) and use {Path(run) / 'adapter'} with it (PEFT's format)")
    from stoker.tune.lora import merge_lora

    merge_lora(model)  # a LoRA run exports as one plain model, its updates folded into the weights
    cfg = model.cfg
    config = hf_config(cfg)  # a shape neither family holds: refused before anything is written
    tensors = to_hf({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    out.mkdir(parents=True, exist_ok=True)
    config["eos_token_id"] = config["bos_token_id"] = tok.eot_id
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "stoker_step": str(step)})
    copy_tokenizer(run, out)
    if not (run / "tokenizer_config.json").is_file():  # a tokenizer stoker trained: one end-of-text token
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eot, "bos_token": tok.eot,
             "unk_token": tok.eot, "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False},
            indent=1))
    return out
