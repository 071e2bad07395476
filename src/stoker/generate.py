"""Load a trained run's latest checkpoint in one process: sample text, or measure val loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from stoker.config import ConfigError, load_config
from stoker.data.loader import TokenWindows
from stoker.data.prepare import load_split
from stoker.data.tokenizer import Tokenizer
from stoker.models.gpt import GPT, GPTConfig, loss_fn
from stoker.train.checkpoint import latest_checkpoint, load_checkpoint


def load_trained(out_dir: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, int]:
    """(model in eval mode, tokenizer, step) from the run's latest checkpoint."""
    out = Path(out_dir)
    if not (out / "model.json").is_file():
        raise ConfigError(f"{str(out)!r} is not a training run directory (no model.json); train one with `stoker train`")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ConfigError(f"{str(out)!r} holds no complete checkpoint yet")
    gcfg = GPTConfig(**json.loads((out / "model.json").read_text()))
    with torch.device("meta"):
        model = GPT(gcfg)
    model.to_empty(device=device)
    model.tie_weights()
    state = load_checkpoint(ckpt, model)
    return model.eval(), Tokenizer.load(out), state["step"]


@torch.no_grad()
def sample(
    model: GPT, ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
    seed: int | None = None, stop_id: int | None = None,
) -> list[int]:
    """Autoregressive sampling without a KV cache (the serving engine keeps one); temperature 0 is greedy."""
    device = model.wte.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(x[:, -model.cfg.block_size :])[:, -1, :].float()  # (1, V)
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
        x = torch.cat([x, nxt], dim=1)
    return out


def generate(
    out_dir: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 50, seed: int | None = None,
) -> str:
    """The prompt's continuation from the latest checkpoint of `out_dir`."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {temperature}")
    model, tok, _ = load_trained(out_dir)
    ids = tok.encode(prompt) or [tok.eot_id]
    return tok.decode(sample(model, ids, max_new_tokens, temperature, top_k, seed, stop_id=tok.eot_id))


@torch.no_grad()
def evaluate(out_dir: str | Path, batches: int = 16, batch_size: int = 8) -> dict:
    """Validation loss (nats/token) and perplexity over the first `batches` x `batch_size` val windows."""
    model, _, step = load_trained(out_dir)
    cfg = load_config(Path(out_dir) / "config.toml")
    windows = TokenWindows(load_split(cfg.data.dir, "val"), cfg.train.seq_len)
    n = min(len(windows), batches * batch_size)
    total = 0.0
    for i in range(0, n, batch_size):
        data = torch.from_numpy(np.stack([windows[j] for j in range(i, min(n, i + batch_size))]))
        total += loss_fn(model(data[:, :-1]), data[:, 1:]).item() * data.size(0)
    loss = total / n
    return {"step": step, "val_loss": loss, "perplexity": math.exp(loss), "windows": n, "tokens": n * cfg.train.seq_len}
