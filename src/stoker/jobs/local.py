"""The local engine: the scheduler daemon for this machine's slots.

One daemon per jobs home (a lock file says which). Each pass it reads the store, notices ended
attempts, stops what must stop (cancel, max_runtime, preemption: SIGTERM, then SIGKILL after the
grace period), asks the policy what to start, and starts it. Every step is written to the store
before or right after it happens, so a daemon killed at any point and started again finds each
job where it was: a running job's process is recognised by pid and start time and kept, an
attempt that ended meanwhile is read from the exit file its shim wrote.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stoker.config import ConfigError
from stoker.jobs import policy
from stoker.jobs.policy import ACTIVE, ADMITTED, RUNNING, WAITING, Job
from stoker.jobs.spec import PoolConfig, load_pool
from stoker.jobs.store import Store
from stoker.launch import job_command, kill_tree, spawn, start_time


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", flush=True)


class DaemonLock:
    """An exclusive lock on HOME/daemon.lock held for the daemon's life; the file holds its pid.
    The kernel drops the lock when the process dies, however it dies."""

    def __init__(self, home: Path):
        self.path = home / "daemon.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def holder(self) -> int | None:
        """The running daemon's pid, or None when no daemon holds the lock."""
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = Path(self.path).read_text().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


class Engine:
    """Carries out the policy's decisions with real processes."""

    def __init__(self, home: str | Path | None = None, poll_s: float = 0.5):
        self.store = Store(home)
        self.home = self.store.home
        self.poll_s = poll_s
        self.procs: dict[int, subprocess.Popen] = {}  # shims this daemon started, by job id
        self._pool: PoolConfig | None = None
        self._pool_mtime: float | None = None
        self.stop = False
        self.view: dict[int, Job] = {}  # jobs waiting or holding slots, kept up to date from the store
        self.seq = 0

    # The pool: queues.toml, read again when it changes; a broken edit keeps the last good one.
    def pool(self) -> PoolConfig:
        path = self.home / "queues.toml"
        mtime = path.stat().st_mtime if path.exists() else None
        if self._pool is None or mtime != self._pool_mtime:
            try:
                self._pool = load_pool(path)
            except ConfigError as e:
                if self._pool is None:
                    raise
                log(f"queues.toml not applied, keeping the previous pool: {e}")
            self._pool_mtime = mtime
        return self._pool

    # One pass.
    def cycle(self, now: float | None = None) -> policy.Decision:
        now = time.time() if now is None else now
        pool = self.pool()
        jobs = self._refresh()
        live = []
        for j in jobs:
            if j.state in ACTIVE and not self._alive(j):
                self._finish(j, pool, now)
                continue
            live.append(j)
        for j in live:
            if j.state in ACTIVE and j.cancel_requested and j.stopping != "cancel":
                self._ask_stop(j, "cancel", pool, now)
        for j in policy.over_runtime(live, now):
            self._ask_stop(j, "timeout", pool, now)
        for j in policy.past_grace(live, now):
            log(f"job {j.id}: grace period over, SIGKILL")
            pid = self._pid(j)
            if pid:
                kill_tree(pid, keep_root=True)  # the shim stays to record the exit
        decision = policy.decide(pool, live, now)
        by_id = {j.id: j for j in live}
        for victim, for_job in decision.preempt:
            log(f"job {victim}: preempted for job {for_job}")
            self._ask_stop(by_id[victim], "preempt", pool, now, f"preempted for job {for_job}")
        for job_id in decision.admit:
            self._start(by_id[job_id], pool, now)
        return decision

    def _refresh(self) -> list[Job]:
        """The scheduling view, reading only the jobs changed since the last pass (a pass at
        10,000 waiting jobs would otherwise spend most of its time reading them all again)."""
        changed, self.seq = self.store.changes(self.seq)
        for j in changed:
            if j.state in WAITING + ACTIVE:
                self.view[j.id] = j
            else:
                self.view.pop(j.id, None)
        return list(self.view.values())

    def _pid(self, j: Job) -> int | None:
        row = self.store.db.execute("SELECT pid, pid_start FROM jobs WHERE id = ?", (j.id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return row[0] if start_time(row[0]) == row[1] else None

    def _alive(self, j: Job) -> bool:
        proc = self.procs.get(j.id)
        if proc is not None:
            if proc.poll() is None:
                return True
            del self.procs[j.id]
            return False
        if j.state == ADMITTED:
            # Admitted but no pid written: the daemon stopped between the two. Its shim, if it
            # was started, names the job and attempt on its command line.
            pid = self._find_shim(j)
            if pid is None:
                return False
            self.store.update(j.id, (ADMITTED,), "running (found after a scheduler restart)", state=RUNNING,
                              pid=pid, pid_start=start_time(pid))
            return True
        return self._pid(j) is not None

    def _find_shim(self, j: Job) -> int | None:
        attempt = self.store.db.execute("SELECT attempt FROM jobs WHERE id = ?", (j.id,)).fetchone()[0]
        marker = str(self._exit_file(j.id, attempt)).encode()
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if marker in (p / "cmdline").read_bytes() and start_time(int(p.name)):
                        return int(p.name)
                except OSError:
                    continue
        return None

    def _exit_file(self, job_id: int, attempt: int) -> Path:
        return self.store.job_dir(job_id) / f"exit-{attempt}.json"

    def _finish(self, j: Job, pool: PoolConfig, now: float) -> None:
        info = self.store.get(j.id, history=False)
        try:
            code = json.loads(self._exit_file(j.id, info.attempt).read_text())["exit_code"]
        except (OSError, ValueError, KeyError):
            code = None
        if j.state == ADMITTED and code is None and not j.stopping:
            # The scheduler stopped between admitting and starting it: nothing ran, nothing failed,
            # and the attempt it was to be does not count.
            self.store.update(j.id, (ADMITTED,), "start interrupted by a scheduler restart: back in the queue",
                              now=now, state=policy.PENDING, queued_at=now, reason="start interrupted", slot_ids="",
                              attempt=max(0, info.attempt - 1))
            return
        out = policy.after_exit(j, code, pool, now, info.preemptions)
        ran = policy.runtime(j, now) if j.state == RUNNING else j.runtime_used
        fields = dict(state=out.state, exit_code=code, restarts=out.restarts, preemptions=out.preemptions,
                      backoff_until=out.backoff_until, runtime_used=ran, stopping="", stop_deadline=0.0, pid=None,
                      pid_start=None, reason=out.reason)
        if out.state in WAITING:
            fields["queued_at"] = now
        else:
            fields["finished"] = now
        self.store.update(j.id, ACTIVE, out.reason, now=now, slot_ids="", **fields)
        log(f"job {j.id}: {out.state} ({out.reason})")

    def _ask_stop(self, j: Job, why: str, pool: PoolConfig, now: float, detail: str | None = None) -> None:
        info = self.store.get(j.id, history=False)
        grace = pool.grace if info.spec.grace is None else info.spec.grace
        detail = detail or {"cancel": "cancel requested", "timeout": f"max_runtime of {j.max_runtime:g} s reached"}[why]
        if not self.store.update(j.id, ACTIVE, f"{detail}: SIGTERM, SIGKILL after {grace:g} s", now=now,
                                 stopping=why, stop_deadline=now + grace):
            return
        j.stopping, j.stop_deadline = why, now + grace
        pid = self._pid(j)
        if pid is None:
            return  # ended meanwhile: the next pass records it
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass

    def _start(self, j: Job, pool: PoolConfig, now: float) -> None:
        info = self.store.get(j.id, history=False)
        attempt = info.attempt + 1
        eff = policy.effective_priority(j, pool, now)
        held = self.store.held_slots()
        slots = [i for i in range(max(pool.slots, len(held) + j.slots)) if i not in held][:j.slots]
        if not self.store.update(j.id, WAITING, f"admitted (attempt {attempt})", state=ADMITTED,
                                 attempt=attempt, admit_priority=eff, started=now, exit_code=None, reason="",
                                 slot_ids=",".join(map(str, slots))):
            return  # cancelled meanwhile
        spec = info.spec
        d = self.store.job_dir(j.id)
        d.mkdir(parents=True, exist_ok=True)
        exit_file = self._exit_file(j.id, attempt)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(spec.cpus))), **spec.env,
               "STOKER_JOB_ID": str(j.id), "STOKER_JOB_ATTEMPT": str(attempt), "STOKER_JOB_SLOTS": str(spec.slots)}
        if pool.gpus:  # a slot is a GPU: the job sees its own
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(pool.gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in slots if i < len(ids))
        try:
            cmd = job_command(spec.command, spec.slots)
            shim = [sys.executable, "-m", "stoker.jobs.shim", "--job", str(j.id), "--attempt", str(attempt),
                    "--exit-file", str(exit_file), "--", *cmd]
            with open(d / "output.log", "ab") as out:
                proc = spawn(shim, env=env, cwd=spec.workdir or None, stdout=out)
        except (OSError, ConfigError) as e:
            reason = f"cannot start: {getattr(e, 'strerror', None) or e}"
            if isinstance(e, OSError) and spec.workdir and not Path(spec.workdir).is_dir():
                reason = f"cannot start: workdir {spec.workdir} is not a directory"
            self.store.update(j.id, (ADMITTED,), reason, state=policy.FAILED, reason=reason, finished=now, slot_ids="")
            log(f"job {j.id}: {reason}")
            return
        self.procs[j.id] = proc
        self.store.update(j.id, (ADMITTED,), f"running, pid {proc.pid}", state=RUNNING, pid=proc.pid,
                          pid_start=start_time(proc.pid) or "", started=now)
        log(f"job {j.id}: started attempt {attempt}, pid {proc.pid}: {' '.join(spec.command)}")

    # The daemon's loop.
    def run(self, exit_when_idle_s: float | None = None) -> int:
        lock = DaemonLock(self.home)
        if not lock.acquire():
            log(f"a scheduler already runs for {self.home} (pid {lock.holder()})")
            return 0
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        signal.set_wakeup_fd(wfd)

        def on_stop(signum, frame):
            self.stop = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGUSR1, lambda s, f: None)  # a client's nudge: the wake-up fd does the work
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        self.pool()
        log(f"scheduler started, pid {os.getpid()}, home {self.home}, {self._pool.slots} slots, "
            f"queues {', '.join(self._pool.queues)}")
        idle_since = time.time()
        import select

        while not self.stop:
            try:
                self.cycle()
            except ConfigError as e:
                log(f"cannot schedule: {e}")
            except Exception:  # a bug must not stop the queue: the jobs run on, the next pass retries
                import traceback

                log("a scheduling pass failed:\n" + traceback.format_exc())
                time.sleep(1.0)
            if exit_when_idle_s is not None:
                busy = self.store.db.execute("SELECT count(*) FROM jobs WHERE state IN (?,?,?,?)",
                                             WAITING + ACTIVE).fetchone()[0]
                idle_since = time.time() if busy else idle_since
                if time.time() - idle_since > exit_when_idle_s:
                    log(f"no jobs for {exit_when_idle_s:g} s: exiting")
                    break
            select.select([rfd], [], [], self.poll_s)
            try:
                os.read(rfd, 4096)
            except BlockingIOError:
                pass
        log("scheduler stopped; running jobs go on, and the next scheduler takes them over")
        return 0


def start_daemon(home: Path, exit_when_idle_s: float = 600) -> None:
    """Start a daemon for `home` in the background (its output in HOME/daemon.log)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "daemon.log", "ab") as out:
        spawn([sys.executable, "-m", "stoker", "jobs", "--home", str(home), "daemon",
               "--exit-when-idle", str(exit_when_idle_s)], env=dict(os.environ), stdout=out)


def nudge(home: Path, autostart: bool = True) -> int | None:
    """Wake the daemon for `home` (start one when none runs and `autostart`); its pid."""
    lock = DaemonLock(home)
    pid = lock.holder()
    if pid is None or pid < 0:
        if autostart and pid is None:
            start_daemon(home)
        return pid
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        pass
    return pid
