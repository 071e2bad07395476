"""Layouts and resumption against single-process reference runs (CPU, gloo, fp32)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import LAYOUT_ATOL, TINY, assert_curves_close, losses, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "single"
    run_train(small_data, out, "--train.steps=20")
    return losses(out)


@pytest.mark.parametrize("layout", ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], ids=["ddp", "fsdp2"])
def test_two_process_layouts_match_single_process(small_data, tmp_path, reference, layout):
    run_train(small_data, tmp_path / "run", "--train.steps=20", layout, nproc=2)
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 21))
    assert_curves_close(got, reference, range(1, 21), LAYOUT_ATOL)
    assert reference[20] < reference[1] - 0.5  # it learns: the comparison is not between two flat lines


def test_grad_accumulation_matches_one_big_batch(small_data, tmp_path, reference):
    # 8 sequences as 4 micro-batches of 2 on each of 2 ranks: same global batch, same curve.
    run_train(small_data, tmp_path / "run", "--train.steps=20", "--parallel.dp_shard=2",
              "--train.micro_batch_size=1", nproc=2)
    assert_curves_close(losses(tmp_path / "run"), reference, range(1, 21), LAYOUT_ATOL)


def test_bf16_fsdp_mixed_precision_tracks_bf16_autocast(small_data, tmp_path):
    run_train(small_data, tmp_path / "single", "--train.steps=20", "--train.dtype=bf16")
    run_train(small_data, tmp_path / "fsdp", "--train.steps=20", "--train.dtype=bf16", "--parallel.dp_shard=2", nproc=2)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    # bf16 keeps 8 bits of mantissa (~0.4% relative); autocast and FSDP's parameter cast round
    # at different places, so the curves agree to a few hundredths of a nat, not to fp32 precision.
    assert_curves_close(a, b, range(1, 21), 0.05)
    assert a[20] < a[1] - 0.5


def test_resume_is_bit_exact_single_process(small_data, tmp_path):
    run_train(small_data, tmp_path / "full", "--train.steps=16", "--train.ckpt_every=0")
    # Stop at 8 with the schedule of a 16-step run, then resume the same directory to 16.
    run_train(small_data, tmp_path / "split", "--train.steps=8", "--train.decay_steps=16")
    run_train(small_data, tmp_path / "split", "--train.steps=16")
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 17))  # no duplicated or missing lines after resume
    # Same process, same thread count, fp32, deterministic CPU kernels: identical to the last bit.
    assert split == full


@pytest.mark.parametrize(
    "first, second",
    [(("--parallel.dp_shard=2",), ()), ((), ("--parallel.dp_replicate=2",)), ((), ("--parallel.dp_shard=2",))],
    ids=["fsdp2_to_1", "1_to_ddp2", "1_to_fsdp2"],
)
def test_checkpoint_reshards_between_process_counts(small_data, tmp_path, first, second):
    run_train(small_data, tmp_path / "ref", "--train.steps=16")
    n1 = 2 if first else 1
    n2 = 2 if second else 1
    run_train(small_data, tmp_path / "run", "--train.steps=8", "--train.decay_steps=16", *first, nproc=n1)
    run_train(small_data, tmp_path / "run", "--train.steps=16", *second, nproc=n2)
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_00000016/trainer.json")).read_text())
    assert state["world"] == n2 and state["loader"]["step"] == 16
    assert_curves_close(losses(tmp_path / "run"), losses(tmp_path / "ref"), range(1, 17), LAYOUT_ATOL)


def test_sigterm_checkpoints_and_resume_continues_the_curve(small_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stoker", "train", *TINY, f"--data.dir={small_data}", f"--train.out_dir={out}",
           "--train.steps=5000", "--train.decay_steps=5000", "--train.ckpt_every=0", "--parallel.dp_shard=2",
           "--nproc=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(losses(out)) >= 5:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer.json").is_file()
    stopped = int(ckpts[0].name.split("_")[1])
    assert 5 <= stopped < 5000
    assert max(losses(out)) == stopped  # the step in flight finished, nothing ran past it
    assert not list((out / "checkpoints").glob(".tmp*"))

    # Resume for 4 more steps and compare with an uninterrupted run to the same step.
    run_train(small_data, out, f"--train.steps={stopped + 4}", "--train.decay_steps=5000",
              "--parallel.dp_shard=2", nproc=2)
    run_train(small_data, tmp_path / "ref", f"--train.steps={stopped + 4}", "--train.decay_steps=5000",
              "--parallel.dp_shard=2", nproc=2)
    # Same layout and process count on both sides: the curves agree to fp32 rounding.
    assert_curves_close(losses(out), losses(tmp_path / "ref"), range(1, stopped + 5), 1e-5)
