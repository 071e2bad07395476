"""Jobs on a real Slurm (one node, started by the test): the sbatch script, submit, status,
logs, why, cancel, and the local record when Slurm cannot be reached."""

import os
import sys
import time

import pytest

from conftest import TINY, assert_curves_close, losses, run_train

from stoker.config import ConfigError
from stoker.jobs import Client

from .slurm_cluster import SlurmCluster, why_not

POOL = '[slurm]\npartitions = { low = "low", high = "high" }\n[queues.default]\nnominal_quota = 2\nbackend = "slurm"\n'


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def test_submit_status_logs_why_cancel_through_slurm(slurm, tmp_path):
    (tmp_path / "queues.toml").write_text(POOL)
    c = Client(tmp_path, autostart=False)
    a = c.submit(command=[sys.executable, "-c", "import os; print('rank file', os.environ['STOKER_JOB_ID'])"],
                 priority="high", env={"GREETING": "hello there"})
    s = c.wait(a, timeout=60)
    assert (s.state, s.exit_code, s.backend) == ("succeeded", 0, "slurm") and s.remote_id.isdigit()
    log = "".join(c.logs(a))
    assert f"rank file {a}" in log and f"--- job {a} attempt 1" in log
    script = (c.store.job_dir(a) / "job.sbatch").read_text()
    assert "#SBATCH --partition=high" in script and "export GREETING='hello there'" in script
    failing = c.submit(command=["sh", "-c", "exit 3"], priority="high")
    assert c.wait(failing, timeout=60).exit_code == 3 and c.status(failing).state == "failed"
    # A job holding every CPU, then one more: Slurm's reason and the place in its partition.
    cpus = len(os.sched_getaffinity(0))
    hold = c.submit(command=["sleep", "60"], priority="low", cpus=cpus)
    c.wait(hold, timeout=60, states=("running",))
    waiting = c.submit(command=["true"], priority="low", cpus=cpus)
    deadline = time.time() + 30
    while "Slurm's reason: None" in c.why(waiting).text() or not c.why(waiting).reasons[0].startswith("Slurm job"):
        assert time.time() < deadline
        time.sleep(0.3)
    w = c.why(waiting).text()
    assert "position 1 of 1 pending in partition low" in w and ("Resources" in w or "Priority" in w)
    for j in (waiting, hold):
        c.cancel(j)
        assert c.wait(j, timeout=60).state == "cancelled"


def test_an_unreachable_slurm_keeps_the_job_on_record_for_resubmission(slurm, tmp_path, monkeypatch):
    (tmp_path / "queues.toml").write_text(POOL)
    c = Client(tmp_path, autostart=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch to be found
    with pytest.raises(ConfigError, match=r"sbatch not found.*recorded as job 1"):
        c.submit(command=["true"], priority="high")
    s = c.status(1)
    assert s.state == "failed" and s.reason.startswith("not submitted") and s.remote_id == ""
    monkeypatch.undo()
    assert c.resubmit(1) == 1
    assert c.wait(1, timeout=60).state == "succeeded"
    with pytest.raises(ConfigError, match="is succeeded on slurm as .*only a job that failed or was cancelled"):
        c.resubmit(1)


def test_a_train_job_preempted_by_slurm_checkpoints_is_requeued_and_matches_an_uninterrupted_run(
        slurm, tmp_path, small_data):
    (tmp_path / "queues.toml").write_text(POOL)
    c = Client(tmp_path, autostart=False)
    steps = 300
    cpus = len(os.sched_getaffinity(0))
    train = ["stoker", "train", *TINY, f"--data.dir={small_data}", f"--train.out_dir={tmp_path / 'low'}",
             f"--train.steps={steps}", f"--train.decay_steps={steps}", "--train.ckpt_every=0"]
    # Every CPU, so that the high-priority job needs them; one thread, as the reference has.
    low = c.submit(command=train, priority="low", cpus=cpus, env={"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((tmp_path / "low" / "metrics.jsonl").exists() and len(losses(tmp_path / "low")) >= 10):
        assert time.time() < deadline, "".join(c.logs(low))
        time.sleep(0.1)
    high = c.submit(command=["sleep", "1"], priority="high", cpus=cpus)
    assert c.wait(high, timeout=120).state == "succeeded"
    s = c.wait(low, timeout=300)
    log = "".join(c.logs(low))
    assert s.state == "succeeded" and s.preemptions == 1, log
    assert "attempt 2" in log and "resuming at step" in log and "DUE TO PREEMPTION" in log
    stopped = int(log.split("resuming at step ")[1].split()[0])
    assert 10 <= stopped < steps
    run_train(small_data, tmp_path / "ref", f"--train.steps={steps}", f"--train.decay_steps={steps}",
              "--train.ckpt_every=0")
    # One process with one thread on both sides, the same data order, an exact resume.
    assert_curves_close(losses(tmp_path / "low"), losses(tmp_path / "ref"), range(1, steps + 1), 1e-5)


def test_a_job_slurmctld_forgot_is_read_from_sacct_when_accounting_exists(tmp_path, monkeypatch):
    from stoker.jobs.backends.slurm import status

    # Stand-ins with Slurm's own answers: scontrol after MinJobAge, sacct with and without accounting.
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    (tmp_path / "sacct").write_text("#!/bin/sh\ncase \"$5\" in\n"
                                    "  5) echo 'COMPLETED|0:0|None';;\n"
                                    "  6) echo 'CANCELLED by 0|0:15|None';;\n"
                                    "  7) echo 'FAILED|3:0|NonZeroExitCode';;\n"
                                    "  *) echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1;;\n"
                                    "esac\n")
    for f in ("scontrol", "sacct"):
        (tmp_path / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    got = {i: status(i) for i in ("5", "6", "7", "8")}
    assert [(s.state, s.native, s.exit_code) for s in got.values()] == [
        ("succeeded", "COMPLETED", 0), ("cancelled", "CANCELLED", 128 + 15), ("failed", "FAILED", 3),
        ("failed", "UNKNOWN", None)]
    assert got["7"].reason == "NonZeroExitCode" and "keeps no accounting" in got["8"].reason
