"""The scheduler's decisions as pure functions of (pool, jobs, now): which pending jobs start,
which running jobs are preempted for them, what a finished attempt means, and why a job waits.

No clock, no processes, no database: the local engine feeds it rows and carries out the result,
and the tests drive it with a simulated clock. The rules follow Kueue:

- A job is admitted whole (all its slots) when its queue's usage stays within its nominal
  quota plus what it may borrow, and its cohort's usage within the cohort's quota.
- Pending jobs are taken highest priority first, then oldest; a priority grows while a job waits
  (aging), so a low-priority job cannot wait for ever. A queue with strategy strict_fifo stops at
  its first job that does not fit; best_effort_fifo lets smaller jobs behind it start.
- A job that does not fit may preempt: lower-priority jobs of its own queue, and jobs of other
  queues in its cohort that run on borrowed quota when it takes back its own (reclaim). Victims
  are the lowest priority first, the most recently started first among equals, and no more than
  needed. The slots they free are kept for the job that preempted them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from stoker.jobs.spec import PoolConfig, QueueConfig

PENDING, ADMITTED, RUNNING, PREEMPTED = "pending", "admitted", "running", "preempted"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATES = (PENDING, ADMITTED, RUNNING, PREEMPTED, SUCCEEDED, FAILED, CANCELLED)
WAITING = (PENDING, PREEMPTED)  # in the queue
ACTIVE = (ADMITTED, RUNNING)  # holding slots
DONE = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class Job:
    """What the scheduler knows of a job (times are seconds since the epoch)."""

    id: int
    queue: str = "default"
    priority: int = 100  # the class's value
    slots: int = 1
    state: str = PENDING
    submitted: float = 0.0  # order among equal priorities
    queued_at: float = 0.0  # when it last entered the queue: aging counts from here
    backoff_until: float = 0.0  # not before this, after a failure
    preemptible: bool = True
    started: float = 0.0  # when the current attempt started
    admit_priority: float = 0.0  # effective priority when admitted: what protects it from preemption
    runtime_used: float = 0.0  # seconds run by earlier attempts
    max_runtime: float = 0.0
    retries: int = 3
    restarts: int = 0  # restarts after failures so far
    stopping: str = ""  # "preempt", "cancel" or "timeout" while it has been asked to stop
    stop_deadline: float = 0.0  # SIGKILL after this
    priority_class: str = "normal"
    cancel_requested: bool = False


@dataclass
class Decision:
    admit: list[int] = field(default_factory=list)
    preempt: list[tuple[int, int]] = field(default_factory=list)  # (victim, for this job)


def effective_priority(job: Job, pool: PoolConfig, now: float) -> float:
    return job.priority + pool.aging_per_hour * max(0.0, now - job.queued_at) / 3600.0


class _Usage:
    """Slots held per queue and in all, with the fit test of the quota rules."""

    def __init__(self, pool: PoolConfig, jobs: list[Job]):
        self.pool = pool
        self.by_queue = {q: 0 for q in pool.queues}
        self.total = 0
        # Per cohort (a queue alone is its own): slots it shares, and how many of them are used.
        self.shared: dict[str, int] = {}
        for q in pool.queues.values():
            self.shared[self._key(q)] = self.shared.get(self._key(q), 0) + q.lendable
        self.pool_used = {k: 0 for k in self.shared}
        for j in jobs:
            self.add(j, j.slots)

    @staticmethod
    def _key(q: QueueConfig) -> str:
        return f"cohort:{q.cohort}" if q.cohort else f"queue:{q.name}"

    def add(self, job: Job, slots: int) -> None:
        before = self.by_queue.get(job.queue, 0)
        self.by_queue[job.queue] = before + slots
        self.total += slots
        q = self.pool.queues.get(job.queue)
        if q is not None:  # what it uses beyond the part of its quota it keeps comes from the pool
            self.pool_used[self._key(q)] += max(0, before + slots - q.kept) - max(0, before - q.kept)

    def cohort(self, q: QueueConfig) -> tuple[int, int]:
        """(slots used, slots shared) of q's cohort's shared pool (q alone when it has none).
        Each queue puts `lending_limit` of its quota in the pool (all of it by default) and keeps
        the rest for itself; what a queue uses beyond the part it keeps comes from the pool."""
        return self.pool_used[self._key(q)], self.shared[self._key(q)]

    def room(self, q: QueueConfig) -> int:
        """The most slots a job of queue q could get now under the quota rules."""
        used_q = self.by_queue.get(q.name, 0)
        limit = float("inf") if q.borrowing_limit is None else q.nominal_quota + q.borrowing_limit
        used, shared = self.cohort(q)
        from_pool = shared - used + max(0, q.kept - used_q)
        return int(max(0, min(limit - used_q, from_pool, self.pool.slots - self.total)))

    def fits(self, job: Job) -> bool:
        q = self.pool.queues.get(job.queue)
        return q is not None and self.total + job.slots <= self.pool.slots and job.slots <= self.room(q)

    def borrowing(self, queue: str) -> bool:
        q = self.pool.queues.get(queue)
        return q is None or self.by_queue.get(queue, 0) > q.nominal_quota


def order_key(pool: PoolConfig, now: float):
    """Sort key of waiting jobs: highest effective priority (aging included) first, then oldest.
    (effective_priority inlined: this runs for every waiting job of every pass.)"""
    rate = pool.aging_per_hour / 3600.0
    return lambda j: (-(j.priority + rate * max(0.0, now - j.queued_at)), j.submitted, j.id)


def queue_order(pool: PoolConfig, jobs: list[Job], now: float) -> list[Job]:
    """The jobs that may start now (waiting, not backing off), in the order they are considered."""
    ready = [j for j in jobs if j.state in WAITING and j.backoff_until <= now and j.queue in pool.queues]
    return sorted(ready, key=order_key(pool, now))


def decide(pool: PoolConfig, jobs: list[Job], now: float) -> Decision:
    """Which waiting jobs start now and which running jobs are preempted for whom."""
    active = [j for j in jobs if j.state in ACTIVE]
    usage = _Usage(pool, active)
    out = Decision()
    blocked: set[str] = set()  # strict_fifo queues whose head waits
    tried: set[str] = set()  # one preemption search per queue per decision
    for job in queue_order(pool, jobs, now):
        q = pool.queues[job.queue]
        if job.queue in blocked:
            continue
        if usage.fits(job):
            out.admit.append(job.id)
            usage.add(job, job.slots)
            continue
        if q.strategy == "strict_fifo":
            blocked.add(job.queue)
        if job.queue in tried:
            continue
        tried.add(job.queue)
        victims = find_victims(pool, job, active, now)
        if victims is None:
            continue
        out.preempt += [(v.id, job.id) for v in victims]
        # Keep the slots being freed for this job: until its victims are gone, count it as
        # holding them, so that nothing behind it slips into them.
        usage.add(job, job.slots)
    return out


def _candidates(pool: PoolConfig, job: Job, active: list[Job], usage: _Usage, now: float) -> list[Job]:
    q = pool.queues[job.queue]
    eff = effective_priority(job, pool, now)
    reclaiming = q.cohort and q.reclaim_within_cohort != "never" and \
        usage.by_queue.get(q.name, 0) + job.slots <= q.nominal_quota
    out = []
    for v in active:
        if not v.preemptible or v.stopping:
            continue
        lower = v.priority < job.priority and v.admit_priority < eff
        if v.queue == job.queue:
            if q.within_queue == "lower_priority" and lower:
                out.append(v)
        elif reclaiming and pool.queues.get(v.queue) is not None and pool.queues[v.queue].cohort == q.cohort:
            if q.reclaim_within_cohort == "any" or lower:
                out.append(v)
    return sorted(out, key=lambda v: (v.priority, -v.started, -v.id))


def find_victims(pool: PoolConfig, job: Job, active: list[Job], now: float) -> list[Job] | None:
    """The running jobs to preempt so that `job` fits: [] when jobs already stopping will make
    room, None when no allowed set does."""
    usage = _Usage(pool, [j for j in active if not j.stopping])
    if usage.fits(job):
        return []
    chosen = []
    for v in _candidates(pool, job, active, usage, now):
        if v.queue != job.queue and not usage.borrowing(v.queue):
            continue  # that queue is back within its own quota: what it runs now is its own
        usage.add(v, -v.slots)
        chosen.append(v)
        if usage.fits(job):
            break
    else:
        return None
    for v in reversed(list(chosen)):  # give back every victim that is not needed after all
        usage.add(v, v.slots)
        if usage.fits(job):
            chosen.remove(v)
        else:
            usage.add(v, -v.slots)
    return chosen


# What ends an attempt, and what follows.

@dataclass
class Outcome:
    state: str
    reason: str
    backoff_until: float = 0.0
    restarts: int = 0
    preemptions: int = 0


def after_exit(job: Job, exit_code: int | None, pool: PoolConfig, now: float, preemptions: int = 0) -> Outcome:
    """The state a job goes to when its attempt ends with `exit_code` (None: its process vanished
    without one). A failure is retried after retry_pause, doubled for each retry before it."""
    if job.stopping == "cancel":
        return Outcome(CANCELLED, "cancelled", restarts=job.restarts, preemptions=preemptions)
    if job.stopping == "preempt":
        return Outcome(PREEMPTED, "preempted; waits to resume from its checkpoint",
                       restarts=job.restarts, preemptions=preemptions + 1)
    if job.stopping == "timeout":
        return Outcome(FAILED, f"stopped at max_runtime ({job.max_runtime:g} s)", restarts=job.restarts,
                       preemptions=preemptions)
    if exit_code == 0:
        return Outcome(SUCCEEDED, "exit 0", restarts=job.restarts, preemptions=preemptions)
    what = "its process vanished" if exit_code is None else f"exit {exit_code}"
    if job.restarts < job.retries:
        pause = pool.retry_pause * 2 ** job.restarts
        return Outcome(PENDING, f"{what}; retry {job.restarts + 1} of {job.retries} after {pause:g} s",
                       backoff_until=now + pause, restarts=job.restarts + 1, preemptions=preemptions)
    return Outcome(FAILED, f"{what}; no retries left ({job.retries})", restarts=job.restarts, preemptions=preemptions)


def runtime(job: Job, now: float) -> float:
    return job.runtime_used + (now - job.started if job.state == RUNNING else 0.0)


def over_runtime(jobs: list[Job], now: float) -> list[Job]:
    """Running jobs past their max_runtime that have not been asked to stop yet."""
    return [j for j in jobs if j.state == RUNNING and not j.stopping and j.max_runtime
            and runtime(j, now) >= j.max_runtime]


def past_grace(jobs: list[Job], now: float) -> list[Job]:
    """Jobs asked to stop whose grace period is over: time for SIGKILL."""
    return [j for j in jobs if j.state in ACTIVE and j.stopping and j.stop_deadline and now >= j.stop_deadline]


# Why a job waits: Kueue's visibility API, in words.

@dataclass
class Why:
    id: int
    state: str
    position: int | None  # 1 = next in its queue; None when not waiting
    ahead: list[int]  # waiting jobs of its queue before it
    reasons: list[str]

    def text(self) -> str:
        return "\n".join(self.reasons)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def explain(pool: PoolConfig, jobs: list[Job], job_id: int, now: float) -> Why:
    """Where job `job_id` stands and why, in sentences a user can act on."""
    by_id = {j.id: j for j in jobs}
    job = by_id[job_id]
    if job.state not in WAITING:
        reason = {ADMITTED: "admitted: its processes are starting",
                  RUNNING: f"running since {_clock(job.started)}" + (
                      f" (asked to stop: {job.stopping}, SIGKILL at {_clock(job.stop_deadline)})" if job.stopping
                      else "")}.get(job.state, f"{job.state}: not in the queue")
        return Why(job.id, job.state, None, [], [reason])
    if job.queue not in pool.queues:
        return Why(job.id, job.state, None, [], [f"queue {job.queue!r} is no longer in queues.toml: it cannot start "
                                                  f"until the queue is back; queues are {', '.join(pool.queues)}"])
    mine = sorted((j for j in jobs if j.state in WAITING and j.queue == job.queue), key=order_key(pool, now))
    ahead = [j.id for j in mine[:mine.index(job)]]
    reasons = [f"position {len(ahead) + 1} of {len(mine)} waiting in queue {job.queue!r}"]
    if job.backoff_until > now:
        reasons.append(f"backing off after a failure (restart {job.restarts} of {job.retries}) until "
                       f"{_clock(job.backoff_until)}, in {job.backoff_until - now:.0f} s")
    active = [j for j in jobs if j.state in ACTIVE]
    usage = _Usage(pool, active)
    q = pool.queues[job.queue]
    used_q = usage.by_queue.get(q.name, 0)
    line = f"queue {q.name!r} uses {used_q} of its nominal quota of {q.nominal_quota} slots"
    if q.cohort:
        c_used, c_shared = usage.cohort(q)
        lendable = max(0, usage.room(q) - max(0, q.nominal_quota - used_q))
        cap = "" if q.borrowing_limit is None else f", borrowing limit {q.borrowing_limit}"
        line += f"; cohort {q.cohort!r} uses {c_used} of {c_shared} and can lend it {lendable} more{cap}"
    reasons.append(line)
    reasons.append(f"free slots in the pool: {pool.slots - usage.total} of {pool.slots}; the job needs {job.slots}")
    eff = effective_priority(job, pool, now)
    higher = [by_id[i] for i in ahead if by_id[i].backoff_until <= now]
    if higher:
        reasons.append(f"{len(higher)} job(s) ahead of it in the queue: "
                       + ", ".join(f"{j.id} ({j.priority_class})" for j in higher[:5]) + (" ..." if len(higher) > 5 else ""))
    stopping = [j for j in active if j.stopping]
    if stopping:
        doing = {"preempt": "preempted", "cancel": "cancelled", "timeout": "past its max_runtime"}
        reasons.append("waiting for " + ", ".join(f"job {j.id} to stop ({doing.get(j.stopping, j.stopping)}: SIGTERM "
                                                  f"sent, SIGKILL at {_clock(j.stop_deadline)} at the latest)"
                                                  for j in stopping))
    if job.backoff_until <= now and not usage.fits(job):
        victims = find_victims(pool, job, active, now)
        if victims:
            reasons.append("can start after preempting " + ", ".join(f"job {v.id} ({v.priority_class})" for v in victims))
        elif victims is None:
            reasons.append(f"no running job it may preempt frees enough slots (its priority {job.priority_class}, "
                           f"{eff:.0f} with aging)")
    elif job.backoff_until <= now and not higher:
        reasons.append("it fits: it starts at the scheduler's next pass")
    return Why(job.id, job.state, len(ahead) + 1, ahead, reasons)


def replace(job: Job, **changes) -> Job:
    return dataclasses.replace(job, **changes)
