"""`stoker.jobs.Client`: submit and watch jobs from Python (a notebook, a script, the CLI).

    from stoker.jobs import Client
    jobs = Client()                       # HOME: $STOKER_JOBS_HOME or ~/.stoker/jobs
    job = jobs.submit(command=["stoker", "train", "run.toml"], queue="default", priority="low")
    print(jobs.why(job).text())
    jobs.wait(job)

Writes go straight to the store; the scheduler daemon is woken (and started, when none runs)
after each submit or cancel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stoker.config import ConfigError
from stoker.jobs import policy
from stoker.jobs.backends import backend
from stoker.jobs.policy import ACTIVE, CANCELLED, DONE, PREEMPTED, WAITING, Why
from stoker.jobs.spec import BACKENDS, JobSpec, PoolConfig, load_pool, load_spec
from stoker.jobs.store import JobInfo, Store
from stoker.launch import job_command


@dataclass
class QueueStatus:
    name: str
    cohort: str
    nominal_quota: int
    borrowing_limit: int | None
    used: int  # slots held by its jobs
    running: int  # jobs holding slots
    waiting: int  # jobs in the queue
    strategy: str

    @property
    def borrowed(self) -> int:
        return max(0, self.used - self.nominal_quota)


class Client:
    """The job queue's verbs: submit, list, status, why, logs, cancel, queues, wait."""

    def __init__(self, home: str | Path | None = None, autostart: bool = True):
        self.store = Store(home)
        self.home = self.store.home
        self.autostart = autostart

    def pool(self) -> PoolConfig:
        return load_pool(self.home / "queues.toml")

    def _nudge(self) -> None:
        from stoker.jobs.local import nudge

        nudge(self.home, self.autostart)

    def submit(self, spec: JobSpec | str | Path | None = None, backend: str | None = None, **fields) -> int:
        """Queue a job: a JobSpec, a spec TOML file, or JobSpec's fields as keywords. Its id.
        `backend` (default: the queue's, else local): local, slurm, kubernetes or ray."""
        if spec is None:
            spec = JobSpec.from_dict(fields, "submit")
        else:
            spec = spec if isinstance(spec, JobSpec) else load_spec(spec)
            if fields:  # keywords override the spec's fields
                spec = JobSpec.from_dict({**spec.to_dict(), **fields}, "submit")
        spec.workdir = str(Path(spec.workdir or os.getcwd()).resolve())
        if not Path(spec.workdir).is_dir():
            raise ConfigError(f"workdir: {spec.workdir} is not a directory")
        pool = self.pool()
        if spec.queue in pool.queues and backend is None:
            backend = pool.queues[spec.queue].backend
        backend = backend or "local"
        if backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        pool.check(spec, backend)
        if backend != "local":
            return self._submit_remote(spec, pool, backend)
        job_command(spec.command, spec.slots)  # a --nproc that contradicts the slots: refused now
        job_id = self.store.submit(spec, pool.priorities[spec.priority])
        self._nudge()
        return job_id

    def _submit_remote(self, spec: JobSpec, pool: PoolConfig, backend: str) -> int:
        """Record the job here first, then hand it to the cluster: if the cluster cannot be
        reached, the record stays, failed with the reason, for `resubmit`."""
        job_id = self.store.submit(spec, pool.priorities[spec.priority], backend=backend)
        self._send(job_id, spec, pool)
        return job_id

    def _send(self, job_id: int, spec: JobSpec, pool: PoolConfig) -> None:
        info = self.store.get(job_id, history=False)
        remote = backend(info.backend, pool)
        try:
            remote_id = remote.submit(spec, job_id, self.store.job_dir(job_id))
        except ConfigError as e:
            self.store.update(job_id, WAITING, f"not submitted: {e}", state=policy.FAILED, reason=f"not submitted: {e}",
                              finished=time.time())
            raise ConfigError(f"{e} (recorded as job {job_id}; `stoker jobs resubmit {job_id}` tries again)") from None
        self.store.update(job_id, WAITING, f"submitted to {remote.name} as {remote_id}", remote_id=remote_id)

    def resubmit(self, job_id: int) -> int:
        """Send a cluster job again under the same id: one whose cluster could not be reached, or
        one that ended there (stopped, failed); a training job resumes from its checkpoint."""
        info = self._refresh(self.store.get(job_id, history=False))
        if info.backend == "local":
            raise ConfigError(f"job {job_id} runs on this machine's queue, which retries and requeues it itself: "
                              "submit it anew instead")
        if info.state not in (policy.FAILED, CANCELLED):
            raise ConfigError(f"job {job_id} is {info.state} on {info.backend}"
                              + (f" as {info.remote_id}" if info.remote_id else "")
                              + ": only a job that failed or was cancelled is sent again")
        was = f" (was {info.remote_id})" if info.remote_id else ""
        self.store.update(job_id, (info.state,), f"resubmitting{was}", state=policy.PENDING, reason="",
                          finished=None, exit_code=None, remote_id="")
        self._send(job_id, info.spec, self.pool())
        return job_id

    def _remote(self, info: JobInfo):
        return backend(info.backend, self.pool())

    def _refresh(self, info: JobInfo) -> JobInfo:
        """A cluster job's record brought up to date from the cluster."""
        if info.backend == "local" or not info.remote_id or info.state in DONE:
            return info
        remote = self._remote(info)
        st = remote.status(info.remote_id, info.spec)
        if st.state == policy.PENDING and info.state in (policy.RUNNING, PREEMPTED):
            st.state = PREEMPTED  # it ran and waits again: evicted (a JobSet suspended by Kueue)
        restarts = max(st.restarts, info.preemptions + (st.state == PREEMPTED and info.state != PREEMPTED))
        if (st.state, st.exit_code, restarts) != (info.state, info.exit_code, info.preemptions):
            done = {"finished": time.time()} if st.state in DONE else {}
            said = f"{remote.name}: {st.native}" + (f" ({st.reason})" if st.reason not in ("", "None") else "")
            self.store.update(info.id, (info.state,), said, state=st.state, exit_code=st.exit_code,
                              preemptions=restarts, reason=st.reason if st.reason != "None" else "", **done)
        return self.store.get(info.id)

    def list(self, states: tuple[str, ...] | None = None, limit: int | None = None) -> list[JobInfo]:
        return [self._refresh(j) for j in self.store.list(states, limit)]

    def status(self, job_id: int) -> JobInfo:
        return self._refresh(self.store.get(job_id))

    def why(self, job_id: int) -> Why:
        return self.explain([job_id])[job_id]

    def explain(self, job_ids: list[int]) -> dict[int, Why]:
        """`why` for several jobs, reading the pool and the queue once for all of them."""
        out, view, now = {}, None, time.time()
        for job_id in job_ids:
            info = self.store.get(job_id, history=False)  # an unknown id: ConfigError
            if info.backend != "local" and info.remote_id:
                info = self._refresh(info)
                out[job_id] = Why(job_id, info.state, None, [], self._remote(info).why(info.remote_id, info.spec))
                continue
            if view is None:
                pool, view = self.pool(), self.store.scheduling_view()
            out[job_id] = policy.explain(pool, view + ([info] if info.state in DONE else []), job_id, now)
        return out

    def cancel(self, job_id: int) -> str:
        """Cancel a job: at once when it waits; a running one gets SIGTERM (it may checkpoint),
        then SIGKILL after the grace period. The state it is in afterwards."""
        info = self._refresh(self.store.get(job_id, history=False))
        if info.state in DONE:
            raise ConfigError(f"job {job_id} already {info.state}")
        if info.backend != "local" and info.remote_id:
            settled = self._remote(info).cancel(info.remote_id, info.spec)
            if settled:  # the cluster takes it back later, but it will never run: cancelled here now
                self.store.update(job_id, (info.state,), settled, state=CANCELLED, reason=settled,
                                  finished=time.time())
            return self.status(job_id).state
        if self.store.update(job_id, WAITING, "cancelled while waiting", state=CANCELLED, reason="cancelled",
                             finished=time.time()):
            return CANCELLED
        if self.store.update(job_id, ACTIVE, "cancel requested", cancel_requested=1):
            self._nudge()
            return self.store.get(job_id, history=False).state
        return self.cancel(job_id)  # it moved between our read and write: look again

    def queues(self) -> list[QueueStatus]:
        pool, usage = self.pool(), self.store.usage()
        return [QueueStatus(q.name, q.cohort, q.nominal_quota, q.borrowing_limit, *usage.get(q.name, (0, 0, 0)),
                            q.strategy) for q in pool.queues.values()]

    def log_path(self, job_id: int) -> Path:
        self.store.get(job_id, history=False)
        return self.store.job_dir(job_id) / "output.log"

    def logs(self, job_id: int, follow: bool = False, poll_s: float = 0.5) -> Iterator[str]:
        """The job's output (every attempt, each after a `--- job N attempt K` line); with
        `follow`, go on yielding new output until the job is done."""
        info = self.store.get(job_id, history=False)
        if info.backend != "local" and info.remote_id:
            text = self._remote(info).logs(info.remote_id, info.spec)
            if text is not None:  # the cluster keeps them (Kubernetes: the pods' logs)
                yield text
                return
        path = self.log_path(job_id)
        pos = 0
        while True:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos += len(chunk)
                if chunk:
                    yield chunk.decode(errors="replace")
            if not follow:
                return
            if self.status(job_id).state in DONE and (not path.exists() or path.stat().st_size == pos):
                return
            time.sleep(poll_s)

    def wait(self, job_id: int, timeout: float | None = None, states: tuple[str, ...] = DONE,
             poll_s: float = 0.2) -> JobInfo:
        """Block until the job is in one of `states` (default: finished); TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.status(job_id)
            if info.state in states:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.state} after {timeout:g} s")
            time.sleep(poll_s)

    def daemon_pid(self) -> int | None:
        from stoker.jobs.local import DaemonLock

        return DaemonLock(self.home).holder()

    def close(self) -> None:
        self.store.close()
