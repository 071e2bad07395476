"""Prompt tuning (Lester et al., 2021): N learned embeddings put before every input, the model
itself frozen. The model runs them at positions 0..N-1 and the text after them
(stoker.models.gpt.GPT.prompt); only the text's outputs come back.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptTuning(nn.Module):
    def __init__(self, n_tokens: int, dim: int, device=None):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(n_tokens, dim, device=device))

    @property
    def n_tokens(self) -> int:
        return self.embedding.size(0)

    def forward(self, batch: int) -> torch.Tensor:
        return self.embedding[None].expand(batch, -1, -1)  # (B, N, C)


@torch.no_grad()
def initial_prompt(wte: torch.Tensor, n_tokens: int, text_ids: list[int] | None, seed: int) -> torch.Tensor:
    """The virtual tokens' first values, (N, C) fp32: the embeddings of a text's tokens (cycled
    or cut to N, as PEFT's TEXT initialisation), or of N random vocabulary tokens."""
    if text_ids:
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(n_tokens)])
    else:
        ids = torch.randint(0, wte.size(0), (n_tokens,), generator=torch.Generator().manual_seed(seed))
    return wte[ids.to(wte.device)].float().clone()


def apply_prompt(model: nn.Module, n_tokens: int, text_ids: list[int] | None = None, seed: int = 0) -> PromptTuning:
    """Give a GPT prompt tuning, in place: freeze every parameter, add N trained virtual tokens."""
    if model.wte is None:
        raise ValueError("prompt tuning needs the model's token embedding (a first pipeline stage)")
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = PromptTuning(n_tokens, model.cfg.n_embd, device=model.wte.weight.device)
    if not model.wte.weight.is_meta:
        with torch.no_grad():
            prompt.embedding.copy_(initial_prompt(model.wte.weight, n_tokens, text_ids, seed))
    model.prompt = prompt
    return prompt
