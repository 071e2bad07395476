"""The local engine with real processes: restarts of the scheduler, concurrent clients,
stopping (cancel, max_runtime, grace), retries with backoff."""

import os
import signal
import subprocess
import sys
import time

from stoker.jobs import Client


def wait_until(cond, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


RECORD = ("import os, sys, time; open(sys.argv[1], 'a').write(os.environ['STOKER_JOB_ID'] + ' ' + "
          "os.environ['STOKER_JOB_ATTEMPT'] + '\\n'); time.sleep(float(sys.argv[2]))")


def test_scheduler_killed_with_sigkill_loses_nothing_and_runs_nothing_twice(jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("slots = 2\n")
    ledger = jobs_home / "ledger"
    c = Client(jobs_home, autostart=False)
    ids = [c.submit(command=[sys.executable, "-c", RECORD, str(ledger), "0.8"], retries=0) for _ in range(8)]
    daemon.start()
    for kill in range(3):  # killed while jobs run, each time at a different point of the queue
        wait_until(lambda: sum(c.status(i).state == "succeeded" for i in ids) >= 2 * kill
                   and any(c.status(i).state == "running" for i in ids), what="jobs running")
        daemon.kill9()
        time.sleep(1.0)  # the running jobs end while no scheduler watches them
        daemon.start()
    wait_until(lambda: all(c.status(i).state == "succeeded" for i in ids), what="all jobs succeeded")
    runs = ledger.read_text().split("\n")[:-1]
    assert sorted(runs) == sorted(f"{i} 1" for i in ids)  # every job ran once, on its first attempt
    for i in ids:
        s = c.status(i)
        assert s.exit_code == 0 and s.restarts == 0 and s.attempt == 1
    adopted = [i for i in ids if any("after a scheduler restart" in e.detail or e.state == "succeeded"
                                     for e in c.status(i).history)]
    assert len(adopted) == len(ids)


def test_a_start_cut_short_by_a_scheduler_kill_is_not_counted_as_an_attempt(jobs_home, daemon):
    # The moment between recording the admission and starting the shim, made exact: the store
    # says admitted (attempt 1) and no process exists, as after a SIGKILL there.
    from stoker.jobs.policy import WAITING

    (jobs_home / "queues.toml").write_text("slots = 1\n")
    ledger = jobs_home / "ledger"
    c = Client(jobs_home, autostart=False)
    j = c.submit(command=[sys.executable, "-c", RECORD, str(ledger), "0"], retries=0)
    assert c.store.update(j, WAITING, "admitted (attempt 1)", state="admitted", attempt=1, slot_ids="0")
    daemon.start()
    s = c.wait(j, timeout=60)
    assert (s.state, s.attempt, s.restarts) == ("succeeded", 1, 0) and ledger.read_text() == f"{j} 1\n"
    assert any("start interrupted" in e.detail for e in s.history)


def test_400_concurrent_submissions_none_lost_none_doubled(jobs_home):
    code = ("import sys; from stoker.jobs import Client; c = Client(sys.argv[1], autostart=False); "
            "[c.submit(command=['true'], name=f'{sys.argv[2]}-{k}') for k in range(50)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(jobs_home), str(p)]) for p in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    jobs = Client(jobs_home, autostart=False).list()
    assert len(jobs) == 400
    assert sorted(j.name for j in jobs) == sorted(f"{p}-{k}" for p in range(8) for k in range(50))
    assert sorted(j.id for j in jobs) == list(range(1, 401))
    assert all(j.state == "pending" for j in jobs)


TRAP = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], 'w').write('checkpoint')
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(60)
"""
IGNORE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def test_max_runtime_sigterm_and_cancel_sigkill_after_grace(jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("slots = 2\n[scheduler]\ngrace = '0.5s'\n")
    c = Client(jobs_home, autostart=False)
    marker = jobs_home / "ckpt"
    timed = c.submit(command=[sys.executable, "-c", TRAP, str(marker)], max_runtime="1s")
    stubborn = c.submit(command=[sys.executable, "-c", IGNORE])
    daemon.start()
    t = c.wait(timed, timeout=30)
    # Stopped by SIGTERM at max_runtime; it had its chance to write a checkpoint, and is not retried.
    assert t.state == "failed" and "max_runtime" in t.reason and marker.read_text() == "checkpoint"
    assert t.exit_code == 0 and t.restarts == 0 and 1.0 <= t.runtime_used < 10
    wait_until(lambda: "ready" in "".join(c.logs(stubborn)), what="the stubborn job to start")
    t0 = time.time()
    assert c.cancel(stubborn) == "running"  # asked to stop; it ignores SIGTERM
    s = c.wait(stubborn, timeout=30)
    assert s.state == "cancelled" and s.exit_code == 128 + 9  # SIGKILL after the 0.5 s grace
    assert time.time() - t0 >= 0.5


def test_failures_are_retried_with_exponential_backoff(jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("slots = 1\n[scheduler]\nretry_pause = '0.4s'\n")
    c = Client(jobs_home, autostart=False)
    count = jobs_home / "count"
    # Fails on its first two attempts, succeeds on the third.
    code = ("import sys, pathlib, time; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0; "
            "p.write_text(str(n + 1)); p.with_name(f'at{n}').write_text(repr(time.time())); sys.exit(0 if n == 2 else 5)")
    j = c.submit(command=[sys.executable, "-c", code, str(count)])
    daemon.start()
    s = c.wait(j, timeout=60)
    assert s.state == "succeeded" and s.restarts == 2 and s.attempt == 3 and count.read_text() == "3"
    at = [float((jobs_home / f"at{n}").read_text()) for n in range(3)]
    # The pause doubles: >= 0.4 s before the first retry and >= 0.8 s before the second.
    assert at[1] - at[0] >= 0.4 and at[2] - at[1] >= 0.8
    details = [e.detail for e in s.history]
    assert "exit 5; retry 1 of 3 after 0.4 s" in details and "exit 5; retry 2 of 3 after 0.8 s" in details
    failing = c.submit(command=["false"], retries=0)
    f = c.wait(failing, timeout=30)
    assert f.state == "failed" and f.exit_code == 1 and "no retries left" in f.reason


def test_a_job_whose_process_dies_is_noticed_and_retried(jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("slots = 1\n[scheduler]\nretry_pause = '0.2s'\n")
    c = Client(jobs_home, autostart=False)
    j = c.submit(command=["sleep", "30"], retries=1)
    daemon.start()
    first = c.wait(j, timeout=30, states=("running",))
    os.kill(first.pid, signal.SIGKILL)  # the shim itself, as an OOM killer would: no exit code written
    wait_until(lambda: c.status(j).attempt == 2, what="the retry")
    s = c.status(j)
    assert s.restarts == 1 and any("its process vanished; retry 1 of 1" in e.detail for e in s.history)
    c.cancel(j)
    assert c.wait(j, timeout=30).state == "cancelled"


def test_on_a_gpu_host_each_job_sees_only_its_own_gpus(jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("[scheduler]\ngrace = '0.5s'\n")  # slots: the host's GPUs
    out = jobs_home / "seen"
    code = "import os, sys, time; open(sys.argv[1], 'a').write(os.environ['CUDA_VISIBLE_DEVICES'] + '\\n'); time.sleep(1)"
    c = Client(jobs_home, autostart=False)
    # The daemon sees 2 GPUs, numbered 4 and 5 on the machine: two 1-slot jobs run side by side.
    a = c.submit(command=[sys.executable, "-c", code, str(out)])
    b = c.submit(command=[sys.executable, "-c", code, str(out)])
    daemon.start(env=dict(os.environ, CUDA_VISIBLE_DEVICES="4,5"))
    assert c.wait(a, timeout=30).state == "succeeded" and c.wait(b, timeout=30).state == "succeeded"
    assert sorted(out.read_text().split()) == ["4", "5"]
    both = c.submit(command=[sys.executable, "-c", code, str(out)], slots=2)
    assert c.wait(both, timeout=30).state == "succeeded"
    assert out.read_text().split()[-1] == "4,5"


def test_a_store_from_before_the_added_columns_opens_upgraded_and_keeps_its_jobs(tmp_path):
    import re
    import sqlite3

    from stoker.jobs.store import ADDED_COLUMNS, SCHEMA, Store

    old = SCHEMA
    for col, decl in ADDED_COLUMNS:
        old = re.sub(rf",\s*{col} {re.escape(decl)}", "", old)
    table = old.split("CREATE TABLE IF NOT EXISTS events")[0]
    assert not any(f" {col} " in table for col, _ in ADDED_COLUMNS)  # really the old table
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.executescript(old)
    db.execute("INSERT INTO jobs (name, spec, queue, priority_class, priority, slots, preemptible, max_runtime, "
               "retries, state, submitted, queued_at, updated) VALUES ('old', '{\"command\": [\"true\"]}', 'default', "
               "'normal', 100, 1, 1, 0, 3, 'succeeded', 1, 1, 1)")
    db.commit()
    db.close()
    c = Client(tmp_path, autostart=False)
    have = {r[1] for r in c.store.db.execute("PRAGMA table_info(jobs)")}
    assert {col for col, _ in ADDED_COLUMNS} <= have
    assert [(j.name, j.state, j.backend) for j in c.list()] == [("old", "succeeded", "local")]
    assert c.submit(command=["true"]) == 2
    Store(tmp_path)  # opening it again changes nothing


def test_a_broken_queues_toml_edit_keeps_the_last_good_pool(jobs_home, daemon):
    (jobs_home / "queues.toml").write_text("slots = 1\n")
    c = Client(jobs_home, autostart=False)
    first = c.submit(command=["sleep", "1"])
    second = c.submit(command=["true"])
    daemon.start()
    c.wait(first, timeout=30, states=("running",))
    (jobs_home / "queues.toml").write_text("slots = 'one'\n")  # a typo while jobs wait
    assert c.wait(first, timeout=30).state == "succeeded"
    assert c.wait(second, timeout=30).state == "succeeded"  # scheduled under the last good pool
    assert "queues.toml not applied, keeping the previous pool" in (jobs_home / "daemon.log").read_text()
