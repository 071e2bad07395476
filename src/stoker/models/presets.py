"""Named model sizes, from a debug toy to GPT-3 175B.

The GPT-3 rows follow Table 2.1 of Brown et al. 2020 ("Language Models are Few-Shot
Learners"): vocabulary 50257, context 2048, learned position embeddings, tied output.
Where the paper's table is not self-consistent (1.3B lists 24 heads of 128 for a 2048
model; 13B lists d_model 5140 with 40 heads of 128) we keep d_model and the head size
that divide evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

GPT3_VOCAB = 50257
GPT3_CONTEXT = 2048


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 8192
    block_size: int = 1024


PRESETS: dict[str, Preset] = {
    # A few hundred thousand parameters: for tests and smoke runs.
    "debug": Preset(n_layer=4, n_embd=32, n_head=4, block_size=256),
    # ~5M parameters: what `make demo` trains in a few minutes on two CPU cores.
    "tiny": Preset(n_layer=4, n_embd=256, n_head=8, block_size=512),
    # ~23M parameters: the throughput benchmark's default.
    "mini": Preset(n_layer=6, n_embd=512, n_head=8, block_size=512),
    "gpt3-125m": Preset(12, 768, 12, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-350m": Preset(24, 1024, 16, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-760m": Preset(24, 1536, 16, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-1.3b": Preset(24, 2048, 16, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-2.7b": Preset(32, 2560, 32, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-6.7b": Preset(32, 4096, 32, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-13b": Preset(40, 5120, 40, GPT3_VOCAB, GPT3_CONTEXT),
    "gpt3-175b": Preset(96, 12288, 96, GPT3_VOCAB, GPT3_CONTEXT),
}

# Parameter counts as printed in the GPT-3 paper's Table 2.1.
GPT3_PAPER_PARAMS: dict[str, float] = {
    "gpt3-125m": 125e6,
    "gpt3-350m": 350e6,
    "gpt3-760m": 760e6,
    "gpt3-1.3b": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
}
