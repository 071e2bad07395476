"""What a run does to the files around it: one writer per run directory, nothing foreign deleted,
no non-finite state saved, leftovers of a crash cleaned, a full disk named."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY, losses, train_here
from stoker.cli import main
from stoker.config import ConfigError, load_config
from stoker.demo import _fresh_out_dir
from stoker.errors import RunError
from stoker.runs import open_run_dir
from stoker.train import trainer
from stoker.train.checkpoint import find_checkpoint, list_checkpoints, verify_checkpoint


def _cfg(data, out, **kw):
    over = {k.removeprefix("--").split("=")[0]: k.split("=")[1] for k in TINY}
    over.update({"data.dir": str(data), "train.out_dir": str(out)})
    over.update(kw)
    return load_config(overrides=over)


def _poison_grads(monkeypatch, calls: set[int], what: str = "grads"):
    """Make the gradients (or a weight) NaN on the given forward-backward calls (1-based)."""
    real, n = trainer.forward_backward, [0]

    def fb(ctx, x, y, *rest):
        n[0] += 1
        loss = real(ctx, x, y, *rest)
        if n[0] in calls:
            p = next(ctx.parts[0].parameters())
            (p.grad if what == "grads" else p.data).fill_(float("nan"))
        return loss

    monkeypatch.setattr(trainer, "forward_backward", fb)


def test_divergence_stops_and_keeps_the_good_checkpoints(small_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_grads(monkeypatch, {7})
    with pytest.raises(RunError, match="step 7: the gradient norm is nan"):
        trainer.train(_cfg(small_data, out, **{"train.steps": "10", "train.ckpt_every": "2", "train.keep_last": "2"}))
    kept = [p.name for p in list_checkpoints(out)]
    assert kept == ["step_00000004", "step_00000006"]  # keep_last did not make room for a bad one
    for p in list_checkpoints(out):
        verify_checkpoint(p)
    assert max(losses(out)) == 6


def test_non_finite_weights_are_never_saved(small_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_grads(monkeypatch, {4}, what="weights")  # finite gradients, NaN weight: caught at the save
    with pytest.raises(RunError, match="step 4: the model holds NaN"):
        trainer.train(_cfg(small_data, out, **{"train.steps": "6", "train.ckpt_every": "2"}))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]


def test_skip_mode_skips_a_bad_step_and_stops_on_a_run_of_them(small_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_grads(monkeypatch, {3})
    s = trainer.train(_cfg(small_data, out, **{"train.steps": "6", "train.on_nonfinite": "skip"}))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("skipped")] == [3]
    assert s["steps"] == 6 and all(torch.isfinite(torch.tensor(v)) for v in losses(out).values() if v == v)
    out2 = tmp_path / "run2"
    _poison_grads(monkeypatch, set(range(2, 20)))
    with pytest.raises(RunError, match="for 5 steps in a row"):
        trainer.train(_cfg(small_data, out2, **{"train.steps": "10", "train.on_nonfinite": "skip"}))


def test_resume_with_another_schedule_is_refused_unless_allowed(small_data, tmp_path):
    out = tmp_path / "run"
    train_here(small_data, out, "--train.steps=2")
    r = train_here(small_data, out, "--train.steps=4", check=False)
    assert r.returncode == 2 and "decay_steps 2 -> 4" in r.stderr and "Traceback" not in r.stderr
    train_here(small_data, out, "--train.steps=4", "--train.allow_schedule_change=true")
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_second_writer_is_refused_naming_the_holder(small_data, tmp_path):
    out = tmp_path / "run"
    held = open_run_dir(out)
    try:
        r = train_here(small_data, out, "--train.steps=2", check=False)
    finally:
        held.close()
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()
    with pytest.raises(ConfigError, match="another stoker train"):
        held = open_run_dir(out)
        try:
            open_run_dir(out)
        finally:
            held.close()


def test_foreign_or_unusable_out_dir_is_one_line(small_data, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = train_here(small_data, foreign, "--train.steps=2", check=False)
    assert r.returncode == 2 and "not a stoker run" in r.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    r = train_here(small_data, foreign / "notes.txt" / "run", "--train.steps=2", check=False)
    assert r.returncode == 2 and "train.out_dir: cannot write" in r.stderr and "Traceback" not in r.stderr


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_launcher_ends_its_workers(small_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stoker", "train", *TINY, f"--data.dir={small_data}", f"--train.out_dir={out}",
           "--train.steps=5000", "--train.decay_steps=5000", "--train.ckpt_every=0", "--nproc=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 3):
        time.sleep(0.1)
    family = _descendants(proc.pid)
    assert len(family) >= 3  # torchrun and its two workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(p) for p in family):
        time.sleep(0.2)
    assert not [p for p in family if _alive(p)]
    # They stopped as on SIGTERM (a checkpoint of the last step), and the lock went with them.
    ckpt, state = find_checkpoint(out)
    assert state["step"] == max(losses(out))
    open_run_dir(out).close()


def test_torn_metrics_line_and_crash_leftovers_do_not_block_resume(small_data, tmp_path):
    out = tmp_path / "run"
    train_here(small_data, out, "--train.steps=4", "--train.decay_steps=8")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 5.1')  # a crash mid-write
    leftover = out / "checkpoints" / ".tmp_step_00000005"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"\0" * 1000)
    r = train_here(small_data, out, "--train.steps=6", "--train.decay_steps=8")
    assert "half-written" in r.stdout and not leftover.exists()
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="a small tmpfs needs root to mount")
def test_full_disk_is_named_and_the_last_checkpoint_kept(small_data, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for the run's small files and one checkpoint of the debug model (~2.5 MB), not two.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        r = train_here(small_data, out, "--train.steps=4", "--train.ckpt_every=2", check=False)
        assert r.returncode == 1 and "no space left on the device" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
        verify_checkpoint(out / "checkpoints" / "step_00000002")
        assert not list((out / "checkpoints").glob(".tmp*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_demo_never_deletes_what_it_did_not_make(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    code = main(["demo", "--data-dir", str(data), "--out-dir", str(data)])
    assert code == 2 and "overlap" in capsys.readouterr().err and (data / "meta.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code = main(["demo", "--data-dir", str(data), "--out-dir", str(mine)])
    assert code == 2 and "not made by `stoker demo`" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    # Its own directory it empties and reuses.
    demo_out = tmp_path / "demo"
    _fresh_out_dir(data, demo_out)
    (demo_out / "metrics.jsonl").write_text("old run")
    _fresh_out_dir(data, demo_out)
    assert [p.name for p in demo_out.iterdir()] == [".stoker-demo"]


def test_a_repeated_sigterm_never_aborts_the_checkpoint_but_a_second_ctrl_c_does(monkeypatch):
    from stoker.train import trainer

    exits = []
    monkeypatch.setattr(trainer.os, "_exit", exits.append)
    clock = [100.0]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock[0])
    flag = trainer.StopFlag()
    try:
        flag._handle(signal.SIGTERM, None)
        clock[0] += 3.0  # Slurm: the step's own SIGTERM, then srun's, 3 s apart
        flag._handle(signal.SIGTERM, None)
        assert flag.set and exits == []
        flag._handle(signal.SIGINT, None)  # a person pressing Ctrl-C again
        assert exits == [128 + signal.SIGINT]
    finally:
        flag.restore()
