from pathlib import Path

import pytest

from conftest import train_here


@pytest.fixture(scope="session")
def runs_root(small_data, tmp_path_factory) -> Path:
    """A runs directory holding one finished run, `short` (30 steps, validation every 10)."""
    root = tmp_path_factory.mktemp("dashboard") / "runs"
    train_here(small_data, root / "short", "--train.steps=30", "--train.eval_every=10", "--train.seq_len=64")
    return root
