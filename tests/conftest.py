import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite's own peak-FLOP/s cache: a probe taken while tests keep the cores busy must not
# become the figure that later runs on this machine report MFU against.
os.environ["STOKER_CACHE"] = tempfile.mkdtemp(prefix="stoker-cache-")

from stoker.data.prepare import default_sources, prepare


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A few stdlib packages, 512-token vocabulary: real text, prepared in seconds."""
    stdlib = default_sources()[0]
    out = tmp_path_factory.mktemp("data") / "small"
    prepare([stdlib / "json", stdlib / "email", stdlib / "asyncio"], out, vocab_size=512, val_fraction=0.1,
            progress=False)
    return out


TINY = ["--model.preset=debug", "--train.seq_len=32", "--train.batch_size=8", "--train.lr=3e-3",
        "--train.warmup_steps=2", "--train.eval_every=0", "--train.progress=false"]


def run_train(data: Path, out: Path, *overrides: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`stoker train` in a fresh process (under torchrun when nproc > 1), one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stoker", "train", *TINY, f"--data.dir={data}", f"--train.out_dir={out}", *overrides]
    if nproc > 1:
        cmd.append(f"--nproc={nproc}")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def train_here(data: Path, out: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`stoker train` through the CLI's own entry point in this process: the same exit codes and
    messages as run_train, without the ~4 s a new process spends importing torch."""
    import contextlib
    import io

    from stoker.cli import main

    argv = ["train", *TINY, f"--data.dir={data}", f"--train.out_dir={out}", *overrides]
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        code = main(argv)
    r = subprocess.CompletedProcess(argv, code, out_buf.getvalue(), err_buf.getvalue())
    if check:
        assert code == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(out: Path) -> dict[int, float]:
    """step -> train loss, from the run's metrics.jsonl."""
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


# Different layouts sum the same fp32 numbers in a different order (a mean of two half-batch
# means, reduce-scatter instead of one backward, a matmul split in two): ~1e-7 relative per
# operation. Adam keeps such differences at that scale over 20 steps (measured: <= 2e-6); 1e-4
# leaves room for it while staying ~100x below the loss change of one step, so a wrong
# gradient fails the test.
LAYOUT_ATOL = 1e-4


def assert_curves_close(a: dict, b: dict, steps, atol: float = LAYOUT_ATOL) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= atol, (s, a[s], b[s])
