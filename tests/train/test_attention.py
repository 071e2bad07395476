"""The attention kernel: chosen by timing both on the run's shape, kept across a resume."""

import torch

from conftest import LAYOUT_ATOL, assert_curves_close, losses, train_here
from stoker.train.checkpoint import find_checkpoint
from stoker.train.metrics import fastest_attention


def test_probe_times_both_kernels_and_skips_matmul_over_the_memory_budget():
    kernel, times = fastest_attention(2, 4, 2, 32, 16, "fp32", torch.device("cpu"))
    assert kernel in times and set(times) == {"sdpa", "matmul"}
    assert times[kernel] == min(times.values()) and all(0 < t < 5 for t in times.values())
    # 2 x 4 heads x 32 x 32 fp32 scores = 32 KiB: over a 16 KiB budget the matmul kernel is not tried.
    assert fastest_attention(2, 4, 2, 32, 16, "fp32", torch.device("cpu"), budget_bytes=16 << 10) == ("sdpa", {})


def test_kernels_train_alike_and_a_resumed_run_keeps_its_kernel(small_data, tmp_path):
    train_here(small_data, tmp_path / "sdpa", "--train.steps=8", "--train.attention=sdpa")
    train_here(small_data, tmp_path / "matmul", "--train.steps=8", "--train.attention=matmul")
    # Same arithmetic up to the order of fp32 sums inside the two kernels.
    assert_curves_close(losses(tmp_path / "sdpa"), losses(tmp_path / "matmul"), range(1, 9), LAYOUT_ATOL)

    first = train_here(small_data, tmp_path / "auto", "--train.steps=4", "--train.decay_steps=8")
    assert "attention: " in first.stdout  # timed, and said which
    chosen = find_checkpoint(tmp_path / "auto")[1]["attention"]
    assert chosen in ("sdpa", "matmul")
    again = train_here(small_data, tmp_path / "auto", "--train.steps=8")
    assert "attention: " not in again.stdout  # not timed again: the checkpoint's kernel
    assert find_checkpoint(tmp_path / "auto")[1]["attention"] == chosen
    # And so the resumed curve continues the one of an uninterrupted run with that kernel.
    assert losses(tmp_path / "auto") == losses(tmp_path / chosen)
