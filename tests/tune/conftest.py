import json
import random
from pathlib import Path

import pytest

from conftest import run_train

BASE_CONTEXT = 64


@pytest.fixture(scope="session")
def tune_base(small_data, tmp_path_factory) -> Path:
    """A briefly trained debug model (context 64) to tune."""
    out = tmp_path_factory.mktemp("tune") / "base"
    run_train(small_data, out, "--train.steps=30", f"--train.seq_len={BASE_CONTEXT}")
    return out


def write_records(path: Path, n: int, seed: int = 0, task: str | None = None, mode: str = "a") -> Path:
    """Records of a task a code model does not do by itself: name the first word of a line
    (task "first"), or the last (task "last"); `task` names the records' task."""
    words = ["def", "class", "return", "import", "for", "while", "if", "with", "yield", "raise"]
    rng = random.Random(seed)
    with path.open(mode) as f:
        for _ in range(n):
            line = " ".join(rng.choice(words) for _ in range(3))
            rec = {"prompt": f"{line}\n=", "completion": " " + line.split()[-1 if task == "last" else 0]}
            if task is not None:
                rec["task"] = task
            f.write(json.dumps(rec) + "\n")
    return path
