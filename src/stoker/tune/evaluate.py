"""How well a model does on instruction records: the loss on their completions and the share
of records whose greedy completion is exactly theirs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from stoker.models.gpt import IGNORE_INDEX, GPT
from stoker.tune.records import RecordError, read_records


@torch.no_grad()
def greedy(model: GPT, ids: list[int], n: int, task: int | None = None) -> list[int]:
    """n greedy tokens after ids, each from a full forward pass (prompt tuning's virtual tokens
    included, which the cached decode path does not take)."""
    out = list(ids)
    kw = {"task": torch.tensor([task])} if task is not None else {}
    for _ in range(n):
        logits = model(torch.tensor([out[-model.cfg.block_size:]], device=model.wte.weight.device), **kw)
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


@torch.no_grad()
def evaluate_records(model: GPT, tok, path: str | Path, limit: int = 0) -> dict:
    """{"loss": mean nats per completion token, "accuracy": exact greedy completions / records,
    "records", "tokens"} over the file's records (the first `limit`, if set). A record's greedy
    completion is exact when its len(completion) greedy tokens are the completion's tokens (its
    end-of-text included: the model must also stop)."""
    model.eval()
    virtual = model.prompt.n_tokens if model.prompt is not None else 0
    names = model.prompt.task_names if model.prompt is not None and model.prompt.n_tasks else None
    examples, tasks = read_records(path, tok, model.cfg.block_size - virtual, names)
    if names is not None and len(tasks) > len(names):
        raise RecordError(f"{path}: task(s) {', '.join(repr(t) for t in tasks[len(names):])} are not among the "
                          f"multitask prompt's: {', '.join(repr(t) for t in names)}")
    examples = examples[:limit] if limit else examples
    total, count, exact = 0.0, 0, 0
    for e in examples:
        task = e.task if names is not None else None
        kw = {"task": torch.tensor([task])} if task is not None else {}
        x = torch.tensor([e.ids[:-1]], device=model.wte.weight.device)
        y = torch.tensor([[IGNORE_INDEX] * (e.n_prompt - 1) + e.ids[e.n_prompt:]], device=x.device)
        total += F.cross_entropy(model(x, **kw)[0].float(), y[0], reduction="sum").item()
        count += len(e.ids) - e.n_prompt
        exact += greedy(model, e.ids[:e.n_prompt], len(e.ids) - e.n_prompt, task) == e.ids[e.n_prompt:]
    return {"loss": total / count, "accuracy": exact / len(examples), "records": len(examples), "tokens": count}
