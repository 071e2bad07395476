"""Prompt tuning (Lester et al., 2021): N learned embeddings put before every input, the model
itself frozen. The model runs them at positions 0..N-1 and the text after them
(stoker.models.gpt.GPT.prompt); only the text's outputs come back.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptTuning(nn.Module):
    """N virtual tokens; with `n_tasks`, multitask prompt tuning (Wang et al., 2023): task t's
    prompt is the shared one times, elementwise, a rank-`task_rank` matrix cols[t] @ rows[t]."""

    def __init__(self, n_tokens: int, dim: int, device=None, n_tasks: int = 0, task_rank: int = 1):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(n_tokens, dim, device=device))
        self.task_cols = nn.Parameter(torch.empty(n_tasks, n_tokens, task_rank, device=device)) if n_tasks else None
        self.task_rows = nn.Parameter(torch.empty(n_tasks, task_rank, dim, device=device)) if n_tasks else None
        self.task_names: list[str] = []

    @property
    def n_tokens(self) -> int:
        return self.embedding.size(0)

    @property
    def n_tasks(self) -> int:
        return 0 if self.task_cols is None else self.task_cols.size(0)

    def forward(self, batch: int, task: torch.Tensor | None = None) -> torch.Tensor:
        if self.task_cols is None:
            return self.embedding[None].expand(batch, -1, -1)  # (B, N, C)
        if task is None:
            raise ValueError("multitask prompt: each input needs its task (task ids, one a row)")
        task = task.to(self.embedding.device)
        return self.embedding[None] * (self.task_cols[task] @ self.task_rows[task])  # (B, N, C)


@torch.no_grad()
def initial_prompt(wte: torch.Tensor, n_tokens: int, text_ids: list[int] | None, seed: int) -> torch.Tensor:
    """The virtual tokens' first values, (N, C) fp32: the embeddings of a text's tokens (cycled
    or cut to N, as PEFT's TEXT initialisation), or of N random vocabulary tokens."""
    if text_ids:
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(n_tokens)])
    else:
        ids = torch.randint(0, wte.size(0), (n_tokens,), generator=torch.Generator().manual_seed(seed))
    return wte[ids.to(wte.device)].float().clone()


def apply_prompt(model: nn.Module, n_tokens: int, text_ids: list[int] | None = None, seed: int = 0,
                 tasks: list[str] | None = None, task_rank: int = 1, start: torch.Tensor | None = None) -> PromptTuning:
    """Give a GPT prompt tuning, in place: freeze every parameter, add N trained virtual tokens
    (with `tasks`: multitask, each task's factor near 1); `start`, an
    (N, C) prompt to begin from (a multitask run's shared prompt, for a new task)."""
    if model.wte is None:
        raise ValueError("prompt tuning needs the model's token embedding (a first pipeline stage)")
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = PromptTuning(n_tokens, model.cfg.n_embd, device=model.wte.weight.device, n_tasks=len(tasks or []),
                          task_rank=task_rank)
    prompt.task_names = list(tasks or [])
    if not model.wte.weight.is_meta:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            if start is not None:
                if tuple(start.shape) != tuple(prompt.embedding.shape):
                    raise ValueError(f"the starting prompt is {tuple(start.shape)}; this run's is "
                                     f"{tuple(prompt.embedding.shape)} (tune.virtual_tokens x the model's width)")
                prompt.embedding.copy_(start)
            else:
                prompt.embedding.copy_(initial_prompt(model.wte.weight, n_tokens, text_ids, seed))
            if prompt.task_cols is not None:
                # Each task's factor starts at 1 (its prompt = the shared one), a little noise
                # apart. PEFT's N(0, 0.02) draws assume a source prompt trained first: from scratch
                # they scale the prompt by ~1e-3 and it barely learns (measured: loss 6.09 -> 6.09
                # in 40 steps where this start learns the task).
                r = prompt.task_cols.size(2)
                prompt.task_cols.copy_(1 + torch.randn(prompt.task_cols.shape, generator=gen) * 0.02)
                prompt.task_rows.copy_(1 / r + torch.randn(prompt.task_rows.shape, generator=gen) * 0.02 / r)
    model.prompt = prompt
    return prompt
