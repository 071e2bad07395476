from pathlib import Path

import pytest
import torch

from conftest import run_train
from stoker.data.tokenizer import Tokenizer
from stoker.models.gpt import GPT, GPTConfig

SEQ_LEN = 64  # the trained models' context (block_size)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: fast on a shared 2-core machine, and the same arithmetic as the servers started here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serve_runs(small_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two briefly trained debug models that differ (steps, seed): 'alpha' and 'beta'."""
    root = tmp_path_factory.mktemp("serve")
    a, b = root / "alpha", root / "beta"
    run_train(small_data, a, "--train.steps=30", f"--train.seq_len={SEQ_LEN}")
    run_train(small_data, b, "--train.steps=20", "--train.seed=7", f"--train.seq_len={SEQ_LEN}")
    return a, b


@pytest.fixture(scope="session")
def sharp_model(serve_runs) -> tuple[GPT, Tokenizer]:
    """A random model with weights scaled up 8x: its greedy tokens change from step to step and
    the top logit leads by a clear margin, which makes token-for-token comparisons a strong test
    (a briefly trained toy repeats one token). Tokenizer of the trained runs."""
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=512, block_size=SEQ_LEN))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model.eval(), Tokenizer.load(serve_runs[0])
