"""Load a trained run's latest checkpoint: sample text (in one process, or split across
processes by tensor parallelism), measure val loss, or export the weights to safetensors."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from stoker.config import ConfigError, load_config
from stoker.data.loader import TokenWindows
from stoker.data.prepare import load_split
from stoker.data.tokenizer import FILENAME as TOKENIZER_FILE
from stoker.data.tokenizer import Tokenizer
from stoker.models.gpt import GPT, GPTConfig, KVCache, loss_fn
from stoker.train.checkpoint import find_checkpoint, latest_checkpoint, load_checkpoint

EXPORT_NAME = "model.safetensors"


def run_model_config(out_dir: str | Path, tp: int = 1) -> GPTConfig:
    """The model shape a run directory records; ConfigError if it is not a run or tp does not
    divide its heads."""
    spec = Path(out_dir) / "model.json"
    if not spec.is_file():
        raise ConfigError(f"{str(out_dir)!r} is not a training run directory (no model.json); "
                          "train one with `stoker train`")
    try:
        gcfg = GPTConfig(**json.loads(spec.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{spec}: not a model description ({e})") from None
    if gcfg.n_head % tp or gcfg.kv_heads % tp:
        raise ConfigError(f"--tp: {tp} does not divide the model's {gcfg.n_head} heads and {gcfg.kv_heads} "
                          "key/value heads")
    return gcfg


def load_trained(out_dir: str | Path, device: str = "cpu", tp_mesh=None) -> tuple[GPT, Tokenizer, int]:
    """(model in eval mode, tokenizer, step) from the run's latest checkpoint, whatever layout
    wrote it. With a tensor-parallel mesh (under torchrun), each rank loads only its shard."""
    out = Path(out_dir)
    gcfg = run_model_config(out, tp=tp_mesh.size() if tp_mesh is not None else 1)
    tok = _run_tokenizer(out)  # before the (slower) checkpoint: an incomplete run fails at once
    found = find_checkpoint(out)  # the newest that verifies; a damaged one is named and skipped
    if found is None:
        raise ConfigError(f"{str(out)!r} holds no complete checkpoint" + (" that verifies" if latest_checkpoint(out) else " yet"))
    ckpt, state = found
    with torch.device("meta"):
        model = GPT(gcfg)
    if (out / "config.toml").is_file():  # a LoRA or prompt-tuning run: its checkpoint holds the adapter too
        from stoker.tune.setup import add_adapter

        add_adapter(model, load_config(out / "config.toml"), tasks=state.get("tasks"))
    if tp_mesh is not None:
        from stoker.parallel.parallelize import apply_tp

        apply_tp(model, tp_mesh, sequence_parallel=False)
    model.to_empty(device=device)
    model.tie_weights()
    load_checkpoint(ckpt, model, state=state)
    return model.eval(), tok, state["step"]


@torch.no_grad()
def sample(
    model: GPT, ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
    seed: int | None = None, stop_id: int | None = None,
) -> list[int]:
    """Autoregressive sampling with a KV cache (the model's cached path, as the serving engine
    uses); temperature 0 is greedy. Stops at the model's context."""
    device = model.wte.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    ids = ids[-(model.cfg.block_size - 1):]  # room for at least one new token
    room = min(max_new_tokens, model.cfg.block_size - len(ids))
    cache = KVCache([model.new_cache_buffer(len(ids) + room)], [0])
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out: list[int] = []
    for _ in range(room):
        logits = model.forward_cached(x, cache)[:, -1, :].float()  # (1, V)
        cache.starts[0] += x.size(1)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        tok = int(nxt)
        if tok == stop_id:
            break
        out.append(tok)
        x = nxt
    return out


def generate(
    out_dir: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 50, seed: int | None = None, tp: int = 1, chat: bool = False,
) -> str:
    """The prompt's continuation from the latest checkpoint of `out_dir`.

    tp > 1 splits the model over that many processes by tensor parallelism: call it in every
    process of a torchrun launch of `tp` processes (`stoker generate --tp N` does that). Every
    rank computes the same whole logits, so with one seed they all sample the same tokens.
    With `chat`, the prompt is a user's message, put in the model's chat template.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {temperature}")
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from stoker.parallel.mesh import init_distributed

        info = init_distributed()
        if info.world != tp:
            raise ConfigError(f"--tp: {tp} does not match the {info.world} process(es) of this launch")
        mesh = init_device_mesh(info.device.type, (tp,), mesh_dim_names=("tp",))
        seed = 0 if seed is None else seed  # the ranks must draw the same samples
    model, tok, _ = load_trained(out_dir, device="cuda" if mesh is not None and mesh.device_type == "cuda" else "cpu",
                                 tp_mesh=mesh)
    if chat:
        try:
            ids = tok.chat_ids([{"role": "user", "content": prompt}])
        except ValueError as e:
            raise ConfigError(f"--chat: {e}") from None
    else:
        ids = tok.encode(prompt) or [tok.eot_id]
    return tok.decode(sample(model, ids, max_new_tokens, temperature, top_k, seed, stop_id=tok.eot_id))


def export(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """The latest checkpoint as one plain safetensors file for inference (tied head stored
    once; the model's shape in the file's metadata). Default path: <out_dir>/model.safetensors."""
    from safetensors.torch import save_model

    from stoker.tune.lora import merge_lora

    model, _, step = load_trained(out_dir)
    if model.prompt is not None:
        raise ConfigError(f"{out_dir} is a prompt-tuning run: its virtual tokens cannot fold into the weights; "
                          f"export its base (model.init_from) and use {Path(out_dir) / 'adapter'} with it")
    merge_lora(model)  # a LoRA run: its updates folded into the weights
    dest = Path(path) if path is not None else Path(out_dir) / EXPORT_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_model(model, str(tmp), metadata={"stoker_model": json.dumps(asdict(model.cfg)), "step": str(step)})
    tmp.replace(dest)
    return dest


def load_exported(path: str | Path, device: str = "cpu") -> GPT:
    """A model from a file written by `export`, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "stoker_model" not in meta:
        raise ConfigError(f"{str(path)!r} was not written by `stoker export` (no stoker_model metadata)")
    try:
        model = GPT(GPTConfig(**json.loads(meta["stoker_model"])))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{str(path)!r}: its stoker_model metadata is not a model description ({e})") from None
    load_model(model, str(path), device=device)
    return model.eval()


@torch.no_grad()
def evaluate(out_dir: str | Path, batches: int = 16, batch_size: int = 8, data_dir: str | Path | None = None,
             seq_len: int | None = None) -> dict:
    """Validation loss (nats/token) and perplexity over the first `batches` x `batch_size` val
    windows of `data_dir` (default: the run's data.dir, which may have moved since training)."""
    if batches < 1:
        raise ConfigError(f"--batches: must be >= 1, got {batches}")
    gcfg = run_model_config(out_dir)  # not a run: say so before anything else
    trained = (Path(out_dir) / "config.toml").is_file()  # an imported model has no training config
    if not trained and data_dir is None:
        raise ConfigError(f"--data: {out_dir} was not trained here (imported): give the data to measure on, "
                          f"prepared with `stoker prepare --tokenizer {out_dir} ...`")
    cfg = load_config(Path(out_dir) / "config.toml") if trained else None
    seq_len = seq_len or (cfg.train.seq_len if cfg else min(gcfg.block_size, 1024))
    if not 1 <= seq_len <= gcfg.block_size:
        raise ConfigError(f"--seq-len: must be from 1 to the model's context {gcfg.block_size}, got {seq_len}")
    ddir = Path(data_dir if data_dir is not None else cfg.data.dir)
    where = "--data" if data_dir is not None else f"data.dir of {out_dir} (give another with --data DIR)"
    try:
        windows = TokenWindows(load_split(ddir, "val"), seq_len)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    model, _, step = load_trained(out_dir)
    # Another tokenizer's ids would give a meaningless loss (or index past the embedding).
    if (ddir / TOKENIZER_FILE).read_bytes() != (Path(out_dir) / TOKENIZER_FILE).read_bytes():
        raise ConfigError(f"{where}: {str(ddir)!r} was prepared with another tokenizer than this run's")
    n = min(len(windows), batches * batch_size)
    total = 0.0
    for i in range(0, n, batch_size):
        data = torch.from_numpy(np.stack([windows[j] for j in range(i, min(n, i + batch_size))]))
        total += loss_fn(model(data[:, :-1]), data[:, 1:]).item() * data.size(0)
    loss = total / n
    return {"step": step, "val_loss": loss, "perplexity": math.exp(loss), "windows": n, "tokens": n * seq_len}


def _run_tokenizer(out: Path) -> Tokenizer:
    try:
        return Tokenizer.load(out)
    except FileNotFoundError:
        raise ConfigError(f"{out / TOKENIZER_FILE} is missing: the run directory is incomplete; copy the "
                          f"tokenizer.json of the data it was trained on into it") from None
