"""The job queue's speed: how long the scheduler takes to decide once a slot frees, with
10,000 jobs pending across 20 queues, and how many jobs one client submits per second.

    python benchmarks/jobs_scheduler.py            # about a minute
    python benchmarks/jobs_scheduler.py --pending 10000 --queues 20 --out benchmarks/results/jobs_scheduler.json

Three measurements, each against a baseline taken in the same run (this machine's speed drifts):
1. decision: a running job ends; the time to read the store, decide and record the admission
   (what one pass of the daemon does), at --pending jobs against the same at 100 (baseline).
2. live: a real daemon with --pending jobs waiting, its 2 slots busy with short jobs: from the
   moment a job's process exits (the time its shim writes) to the next job's admission.
3. submissions: Client.submit in a loop from one process, with no daemon and with a daemon that
   each submission wakes, against a bare sqlite INSERT of the same row committed one at a time
   (baseline: the floor the store can do).
Targets: a decision under 50 ms at 10,000 pending; 200 submissions/s from one client.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stoker.jobs import Client, policy
from stoker.jobs.local import Engine
from stoker.jobs.spec import JobSpec, load_pool
from stoker.jobs.store import Store


def pool_toml(queues: int, slots_per_queue: int = 2, cohort_size: int = 5) -> str:
    lines = [f"slots = {queues * slots_per_queue}"]
    for q in range(queues):
        lines += [f"[queues.q{q:02d}]", f"nominal_quota = {slots_per_queue}", f"cohort = 'c{q // cohort_size}'"]
    return "\n".join(lines) + "\n"


def fill(store: Store, n: int, queues: int, state: str = "pending", seed: int = 0,
         prios: tuple = (("low", 0), ("normal", 100), ("high", 200))) -> None:
    """n jobs in one transaction (setting up, not what is measured)."""
    rng = random.Random(seed)
    spec = json.dumps(JobSpec(command=["true"]).to_dict())
    now = time.time()
    rows = []
    for i in range(n):
        cls, val = rng.choice(prios)
        # Not preemptible: the admissions this benchmark records are never carried out as
        # processes, so a preemption it decided would never free its slots.
        rows.append((f"j{i}", spec, f"q{rng.randrange(queues):02d}", cls, val, rng.choice((1, 1, 1, 2)), 0, 0.0, 3,
                     state, now - rng.random() * 3600, now - rng.random() * 3600, now, now))
    insert(store, rows)


def insert(store: Store, rows: list[tuple]) -> None:
    """Rows of (name, spec, queue, class, priority, slots, preemptible, max_runtime, retries, state,
    submitted, queued_at, started, updated), numbered as changes the way the store numbers them."""
    with store._tx() as db:
        seq = db.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()[0]
        db.executemany(
            "INSERT INTO jobs (name, spec, queue, priority_class, priority, slots, preemptible, max_runtime, retries, "
            "state, submitted, queued_at, started, updated, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(*r, seq + 1 + i) for i, r in enumerate(rows)])


def decision_ms(pending: int, queues: int, reps: int) -> dict:
    """One scheduler pass after a slot frees: read, decide, record the admission."""
    with tempfile.TemporaryDirectory() as home:
        Path(home, "queues.toml").write_text(pool_toml(queues))
        store = Store(home)
        pool = load_pool(Path(home) / "queues.toml")
        # Every slot busy: one running 1-slot job per slot, spread over the queues.
        spec = json.dumps(JobSpec(command=["true"]).to_dict())
        now = time.time()
        insert(store, [(f"r{i}", spec, f"q{i % queues:02d}", "high", 1000, 1, 0, 0.0, 3, "running", now, now, now, now)
                       for i in range(pool.slots)])
        fill(store, pending, queues)
        engine = Engine(home)
        engine._refresh()  # the daemon's first pass reads everything; later passes read what changed
        times, reads, decides, admitted = [], [], [], 0
        for _ in range(reps):
            running = store.db.execute("SELECT id FROM jobs WHERE state = 'running' LIMIT 1").fetchone()[0]
            store.update(running, ("running",), state="succeeded")  # a slot frees
            t0 = time.perf_counter()
            jobs = engine._refresh()
            t1 = time.perf_counter()
            d = policy.decide(pool, jobs, time.time())
            t2 = time.perf_counter()
            for job_id in d.admit:  # what the engine writes before it starts the process
                engine.store.update(job_id, policy.WAITING, "admitted", state="running", started=time.time())
            t3 = time.perf_counter()
            admitted += len(d.admit)
            times.append((t3 - t0) * 1e3)
            reads.append((t1 - t0) * 1e3)
            decides.append((t2 - t1) * 1e3)
        store.close()
        engine.store.close()
    assert admitted >= reps, "every freed slot should let a job start"
    times.sort()
    return {"pending": pending, "queues": queues, "reps": reps, "median_ms": statistics.median(times),
            "p95_ms": times[int(0.95 * (len(times) - 1))], "read_ms": statistics.median(reads),
            "decide_ms": statistics.median(decides), "admitted": admitted}


def live_ms(pending: int, queues: int, admissions: int) -> dict:
    """A real daemon: a job's exit (its shim's timestamp) to the next admission (the store's)."""
    with tempfile.TemporaryDirectory() as home:
        Path(home, "queues.toml").write_text("slots = 2\n")
        store = Store(home)
        c = Client(home, autostart=False)
        short = [c.submit(command=[sys.executable, "-c", "pass"], priority="high") for _ in range(admissions + 2)]
        fill(store, pending, 1, prios=(("low", 0),))  # behind the short high-priority jobs timed
        store.db.execute("UPDATE jobs SET queue = 'default' WHERE queue != 'default'")
        log = open(Path(home, "daemon.log"), "wb")
        d = subprocess.Popen([sys.executable, "-m", "stoker", "jobs", "--home", home, "daemon", "--poll", "1"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while store.db.execute(f"SELECT count(*) FROM jobs WHERE state = 'succeeded' AND id IN "
                                   f"({','.join(map(str, short))})").fetchone()[0] < len(short):
                assert time.time() < deadline and d.poll() is None, Path(home, "daemon.log").read_text()[-2000:]
                time.sleep(0.2)
        finally:
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)
            d.wait()
        exits = sorted(json.loads((store.job_dir(i) / "exit-1.json").read_text())["time"] for i in short)
        admits = sorted(t for (t,) in store.db.execute(
            "SELECT time FROM events WHERE state = 'admitted' ORDER BY time"))
        lat = []
        for t in exits[:admissions]:  # each exit frees a slot; the next admission after it fills it
            later = [a for a in admits if a >= t]
            if later:
                lat.append((later[0] - t) * 1e3)
        store.close()
    lat.sort()
    return {"pending": pending, "admissions": len(lat), "median_ms": statistics.median(lat),
            "p95_ms": lat[int(0.95 * (len(lat) - 1))]}


def submissions_per_s(n: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        c = Client(home, autostart=False)
        spec = JobSpec(command=["stoker", "train", "--train.steps=10"], priority="low")
        t0 = time.perf_counter()
        for _ in range(n):
            c.submit(spec)
        client = n / (time.perf_counter() - t0)
        c.close()
    with tempfile.TemporaryDirectory() as home:
        # The same with a daemon running, woken by every submission; its one slot is held by a
        # job that outlasts the measurement, so each wake-up is a full pass over the queue.
        Path(home, "queues.toml").write_text("slots = 1\n")
        c = Client(home, autostart=False)
        blocker = c.submit(command=["sleep", "600"], preemptible=False)
        d = subprocess.Popen([sys.executable, "-m", "stoker", "jobs", "--home", home, "daemon"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            c.wait(blocker, timeout=60, states=("running",))
            t0 = time.perf_counter()
            for _ in range(n):
                c.submit(spec)
            with_daemon = n / (time.perf_counter() - t0)
        finally:
            c.cancel(blocker)
            c.wait(blocker, timeout=120)
            os.killpg(d.pid, signal.SIGKILL)
            d.wait()
            c.close()
    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        spec.workdir = home
        t0 = time.perf_counter()
        for _ in range(n):
            store.submit(spec, 0)
        bare = n / (time.perf_counter() - t0)
        store.close()
    return {"n": n, "client_per_s": client, "client_with_daemon_per_s": with_daemon, "store_insert_per_s": bare,
            "ratio": client / bare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pending", type=int, default=10000)
    p.add_argument("--queues", type=int, default=20)
    p.add_argument("--reps", type=int, default=40, help="slot frees timed per size (default 40)")
    p.add_argument("--live", type=int, default=20, help="admissions timed with a real daemon (default 20; 0: skip)")
    p.add_argument("--submissions", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    from rich.console import Console
    from rich.table import Table

    base = decision_ms(100, a.queues, a.reps)
    big = decision_ms(a.pending, a.queues, a.reps)
    print(f"decision at {a.pending:,} pending: median {big['median_ms']:.1f} ms", flush=True)
    live = live_ms(a.pending, a.queues, a.live) if a.live else None
    sub = submissions_per_s(a.submissions)
    t = Table(title=f"job scheduler ({os.cpu_count()} CPUs)")
    for col in ("measurement", "value", "baseline", "ratio", "target"):
        t.add_column(col, justify="right")
    t.add_row(f"decision, {a.pending:,} pending / {a.queues} queues (median, p95)",
              f"{big['median_ms']:.1f} / {big['p95_ms']:.1f} ms",
              f"{base['median_ms']:.1f} ms at 100 pending", f"{big['median_ms'] / base['median_ms']:.1f}x", "< 50 ms")
    t.add_row("  of which: read the store / decide", f"{big['read_ms']:.1f} / {big['decide_ms']:.1f} ms",
              f"{base['read_ms']:.1f} / {base['decide_ms']:.1f} ms", "", "")
    if live:
        t.add_row(f"live daemon: exit -> next admission, {a.pending:,} pending (median, p95)",
                  f"{live['median_ms']:.0f} / {live['p95_ms']:.0f} ms", "", "", "")
    t.add_row("submissions, one client", f"{sub['client_per_s']:,.0f} /s",
              f"{sub['store_insert_per_s']:,.0f} /s bare insert", f"{sub['ratio']:.2f}", ">= 200 /s")
    t.add_row("submissions, one client, a daemon woken by each", f"{sub['client_with_daemon_per_s']:,.0f} /s",
              f"{sub['store_insert_per_s']:,.0f} /s bare insert",
              f"{sub['client_with_daemon_per_s'] / sub['store_insert_per_s']:.2f}", ">= 200 /s")
    Console(width=150).print(t)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"baseline_decision": base, "decision": big, "live": live,
                                           "submissions": sub}, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
