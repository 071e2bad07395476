"""Named model sizes, from a debug toy to GPT-3 175B, and the Llama 3 shapes.

The GPT-3 rows follow Table 2.1 of Brown et al. 2020 ("Language Models are Few-Shot
Learners"): vocabulary 50257, context 2048, learned position embeddings, tied output.
Where the paper's table is not self-consistent (1.3B lists 24 heads of 128 for a 2048
model; 13B lists d_model 5140 with 40 heads of 128) we keep d_model and the head size
that divide evenly.

The Llama rows are the shapes of Meta's Llama 3.2 1B and 3B and Llama 3.1 8B and 70B, as
their published configurations give them (vocabulary 128256, RoPE theta 500000 with Llama
3's frequency scaling, RMSNorm, SwiGLU, 8 key/value heads; 1B and 3B tie the output head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

GPT3_VOCAB = 50257
GPT3_CONTEXT = 2048


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 8192
    block_size: int = 1024
    arch: dict = field(default_factory=dict)  # GPTConfig's other fields: the Llama options

    def fields(self) -> dict:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "arch"}, **self.arch}


LLAMA3_VOCAB = 128256


def llama(n_kv_head: int, ffn_hidden: int, factor: float, tied: bool, theta: float = 500000.0) -> dict:
    return dict(n_kv_head=n_kv_head, ffn_hidden=ffn_hidden, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                rope_theta=theta, tie_embeddings=tied,
                rope_scaling={"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192} if factor else None)


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
    # The Llama options at toy size, for tests: 2 key/value heads for 4 query heads.
    "llama-debug": Preset(4, 32, 4, block_size=256, arch=llama(2, 64, 0, tied=False, theta=10000.0)),
    "llama-tiny": Preset(4, 256, 8, block_size=512, arch=llama(2, 688, 0, tied=False, theta=10000.0)),
    "llama3-1b": Preset(16, 2048, 32, LLAMA3_VOCAB, 131072, llama(8, 8192, 32.0, tied=True)),
    "llama3-3b": Preset(28, 3072, 24, LLAMA3_VOCAB, 131072, llama(8, 8192, 32.0, tied=True)),
    "llama3-8b": Preset(32, 4096, 32, LLAMA3_VOCAB, 131072, llama(8, 14336, 8.0, tied=False)),
    "llama3-70b": Preset(80, 8192, 64, LLAMA3_VOCAB, 131072, llama(8, 28672, 8.0, tied=False)),
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

# Parameter counts of the Llama 3 models as published with their weights (the sum of the
# tensors in Meta's Hugging Face releases: meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B, -70B).
LLAMA_PUBLISHED_PARAMS: dict[str, int] = {
    "llama3-1b": 1_235_814_400,
    "llama3-3b": 3_212_749_824,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
}
