"""The scheduler's decisions on a simulated clock: quota, borrowing, reclaim, priority, the
choice of victims, gang admission, aging, backoff and timeouts. No processes, no sleeping."""

import pytest

from stoker.jobs.policy import (CANCELLED, FAILED, PENDING, PREEMPTED, RUNNING, SUCCEEDED, Job, after_exit, decide,
                                explain, over_runtime, past_grace)
from stoker.jobs.spec import pool_from_dict

T0 = 1_000_000.0  # the simulated clock's start


def lab(a=2, b=2, **queue):
    """Two queues of a cohort `lab`, `a` and `b` slots of nominal quota, every slot in the pool."""
    return pool_from_dict({"slots": a + b, "queues": {"a": {"nominal_quota": a, "cohort": "lab", **queue},
                                                      "b": {"nominal_quota": b, "cohort": "lab", **queue}}})


def running(id, queue="a", priority=100, slots=1, started=T0, **kw):
    return Job(id=id, queue=queue, priority=priority, slots=slots, state=RUNNING, started=started,
               admit_priority=priority, submitted=started, queued_at=started, **kw)


def waiting(id, queue="a", priority=100, slots=1, at=T0, **kw):
    return Job(id=id, queue=queue, priority=priority, slots=slots, submitted=at, queued_at=at, **kw)


def test_quota_without_cohort_and_gang_admission():
    pool = pool_from_dict({"slots": 4, "queues": {"a": {"nominal_quota": 2}, "b": {"nominal_quota": 2}}})
    d = decide(pool, [waiting(1), waiting(2), waiting(3)], T0)
    assert d.admit == [1, 2] and d.preempt == []  # a's quota is 2; b's idle slots are not a's
    # 3 slots asked, 2 free: nothing starts, not even part of it; with 3 free it starts whole.
    pool3 = pool_from_dict({"slots": 3, "queues": {"a": {"nominal_quota": 3}}})
    assert decide(pool3, [running(1), waiting(2, slots=3)], T0).admit == []
    assert decide(pool3, [waiting(2, slots=3)], T0).admit == [2]


def test_borrowing_within_the_cohort_and_its_limit():
    assert decide(lab(), [waiting(i) for i in range(1, 6)], T0).admit == [1, 2, 3, 4]  # b lends both slots
    assert decide(lab(borrowing_limit=1), [waiting(i) for i in range(1, 6)], T0).admit == [1, 2, 3]


def test_lending_limit_caps_what_others_borrow():
    pool = pool_from_dict({"slots": 4, "queues": {"a": {"nominal_quota": 2, "cohort": "lab"},
                                                  "b": {"nominal_quota": 2, "cohort": "lab", "lending_limit": 1}}})
    # a may borrow only 1 of b's 2 idle slots; b keeps the other for itself.
    assert decide(pool, [waiting(i) for i in range(1, 6)], T0).admit == [1, 2, 3]
    jobs = [running(1), running(2), running(3), waiting(9, queue="b"), waiting(10, queue="b")]
    assert decide(pool, jobs, T0).admit == [9]  # b's kept slot; its lent one is in use by a
    assert pool.most_slots("a") == 3 and pool.most_slots("b") == 4
    w = explain(pool, jobs, 10, T0)
    # a holds all 3 shared slots (its own 2 and the 1 b lends); b's kept slot is still its own.
    assert "cohort 'lab' uses 3 of 3 and can lend it 0 more" in w.text() and "it fits" not in w.text()


@pytest.mark.parametrize("reclaim, victims", [("any", [(4, 9)]), ("lower_priority", []), ("never", [])])
def test_reclaim_preempts_the_borrowers_newest_job(reclaim, victims):
    pool = lab(reclaim_within_cohort=reclaim)
    jobs = [running(1, started=T0), running(2, started=T0 + 1), running(3, started=T0 + 2),
            running(4, started=T0 + 3), waiting(9, queue="b", at=T0 + 10)]  # a uses all 4; b wants its own
    d = decide(pool, jobs, T0 + 10)
    # Same priority: only "any" lets b take back its slot; the victim is a's last-started job.
    assert d.preempt == victims and d.admit == []


def test_priority_first_then_fifo():
    pool = pool_from_dict({"slots": 2, "queues": {"a": {"nominal_quota": 2}}})
    jobs = [waiting(1, priority=0, at=T0), waiting(2, priority=100, at=T0 + 2), waiting(3, priority=100, at=T0 + 1)]
    assert decide(pool, jobs, T0 + 3).admit == [3, 2]


def test_preemption_in_a_queue_is_by_lower_priority_only():
    pool = pool_from_dict({"slots": 2, "queues": {"a": {"nominal_quota": 2}}})
    busy = [running(1, priority=0, started=T0), running(2, priority=100, started=T0 + 1)]
    assert decide(pool, busy + [waiting(9, priority=200)], T0 + 5).preempt == [(1, 9)]  # the lowest
    assert decide(pool, busy + [waiting(9, priority=0)], T0 + 5).preempt == []  # equal never preempts
    guarded = [running(1, priority=0, preemptible=False), running(2, priority=100, preemptible=False)]
    assert decide(pool, guarded + [waiting(9, priority=200)], T0 + 5).preempt == []
    never = pool_from_dict({"slots": 2, "queues": {"a": {"nominal_quota": 2, "within_queue": "never"}}})
    assert decide(never, busy + [waiting(9, priority=200)], T0 + 5).preempt == []


def test_victims_are_lowest_newest_and_no_more_than_needed():
    pool = pool_from_dict({"slots": 4, "queues": {"a": {"nominal_quota": 4}}})
    # Needs 2 slots. Same priority: the 1-slot job started last comes first, but alone it is
    # not enough; with the 2-slot job it is more than enough, so it is given back.
    jobs = [running(1, slots=2, started=T0), running(2, slots=1, started=T0 + 5), running(3, priority=150, started=T0),
            waiting(9, priority=200, slots=2, at=T0 + 9)]
    assert decide(pool, jobs, T0 + 9).preempt == [(1, 9)]
    # Mixed classes: both low jobs go before the normal one is touched.
    jobs = [running(1, priority=0, started=T0), running(2, priority=100, started=T0 + 5),
            running(3, priority=0, started=T0 + 1), running(4, priority=100), waiting(9, priority=200, slots=2)]
    assert sorted(decide(pool, jobs, T0 + 9).preempt) == [(1, 9), (3, 9)]


def test_slots_being_freed_are_kept_for_the_job_that_preempted():
    pool = pool_from_dict({"slots": 2, "queues": {"a": {"nominal_quota": 2}}})
    jobs = [running(1, priority=0, stopping="preempt", stop_deadline=T0 + 60), running(2, priority=100),
            waiting(9, priority=200, at=T0), waiting(10, priority=100, at=T0)]
    d = decide(pool, jobs, T0 + 1)
    assert d.preempt == [] and d.admit == []  # no second victim, and job 10 does not take job 1's slot
    jobs[0].state = SUCCEEDED  # job 1 has stopped
    assert decide(pool, jobs, T0 + 2).admit == [9]


def test_strict_fifo_blocks_behind_its_head_best_effort_does_not():
    jobs = [running(1), waiting(2, slots=2, at=T0), waiting(3, slots=1, at=T0 + 1)]
    for strategy, admitted in (("best_effort_fifo", [3]), ("strict_fifo", [])):
        pool = pool_from_dict({"slots": 2, "queues": {"a": {"nominal_quota": 2, "strategy": strategy}}})
        assert decide(pool, jobs, T0 + 2).admit == admitted


def test_aging_orders_a_long_wait_first_but_gives_no_power_to_preempt():
    pool = pool_from_dict({"slots": 1, "queues": {"a": {"nominal_quota": 1}}})  # 50 points per hour
    old_low = waiting(1, priority=0, at=T0)
    # A high job submitted now: after 4 h 1 min the low job has 0 + 50 * 4.02 = 201 points > 200.
    now = T0 + 4 * 3600 + 60
    assert decide(pool, [old_low, waiting(2, priority=200, at=now)], now).admit == [1]
    now = T0 + 3 * 3600
    assert decide(pool, [old_low, waiting(2, priority=200, at=now)], now).admit == [2]  # 150 < 200
    # Aged to 250 points, it still may not preempt a running normal job (class 100 > 0).
    assert decide(pool, [running(5, priority=100), old_low], T0 + 5 * 3600).preempt == []
    # And the points it had when admitted protect it from a fresh high job (200 < 250).
    aged = running(1, priority=0, started=T0 + 5 * 3600)
    aged.admit_priority = 250.0
    assert decide(pool, [aged, waiting(2, priority=200, at=T0 + 5 * 3600)], T0 + 5 * 3600).preempt == []


def test_retries_back_off_exponentially_then_fail():
    pool = pool_from_dict({})  # retry_pause 90 s, 3 retries (AppWrapper's defaults)
    job = running(1, retries=3)
    pauses = []
    for restarts in range(3):
        job.restarts = restarts
        out = after_exit(job, 1, pool, T0)
        assert out.state == PENDING and out.restarts == restarts + 1
        pauses.append(out.backoff_until - T0)
    assert pauses == [90, 180, 360]  # doubling from 90 s
    job.restarts = 3
    assert after_exit(job, 1, pool, T0).state == FAILED
    # Waiting out its backoff: not admitted before backoff_until, admitted at it.
    backing = waiting(2, queue="default", backoff_until=T0 + 90)
    assert decide(pool, [backing], T0 + 89.9).admit == [] and decide(pool, [backing], T0 + 90).admit == [2]


@pytest.mark.parametrize("stopping, code, state", [
    ("", 0, SUCCEEDED), ("preempt", 0, PREEMPTED), ("preempt", 137, PREEMPTED), ("cancel", 0, CANCELLED),
    ("timeout", 0, FAILED), ("", None, PENDING)])
def test_what_an_exit_means(stopping, code, state):
    out = after_exit(running(1, stopping=stopping), code, pool_from_dict({}), T0, preemptions=2)
    assert out.state == state
    assert out.preemptions == (3 if stopping == "preempt" else 2)


def test_timeouts_and_grace():
    jobs = [running(1, started=T0, max_runtime=60, runtime_used=30), running(2, started=T0, max_runtime=0),
            running(3, stopping="cancel", stop_deadline=T0 + 10)]
    assert over_runtime(jobs, T0 + 29.9) == [] and [j.id for j in over_runtime(jobs, T0 + 30)] == [1]
    assert past_grace(jobs, T0 + 9.9) == [] and [j.id for j in past_grace(jobs, T0 + 10)] == [3]


def test_explain_names_position_quota_backoff_and_the_plan():
    pool = lab(a=1, b=1)
    jobs = [running(1, queue="a", priority=0, started=T0), running(2, queue="a", priority=0, started=T0 + 1),
            waiting(3, queue="b", at=T0 + 2), waiting(4, queue="b", at=T0 + 3, backoff_until=T0 + 100)]
    w = explain(pool, jobs, 3, T0 + 5)
    assert (w.position, w.ahead) == (1, [])
    assert "queue 'b' uses 0 of its nominal quota of 1 slots; cohort 'lab' uses 2 of 2" in w.text()
    assert "free slots in the pool: 0 of 2" in w.text()
    assert "can start after preempting job 2 (normal)" in w.text() or "preempting job 2" in w.text()
    w4 = explain(pool, jobs, 4, T0 + 5)
    assert w4.position == 2 and w4.ahead == [3] and "backing off" in w4.text() and "in 95 s" in w4.text()


def test_ten_thousand_pending_over_twenty_queues():
    queues = {f"q{i:02d}": {"nominal_quota": 2, "cohort": f"c{i // 5}"} for i in range(20)}
    pool = pool_from_dict({"slots": 40, "queues": queues})
    jobs = [waiting(i, queue=f"q{i % 20:02d}", priority=(0, 100, 200)[i % 3], at=T0 + i) for i in range(10_000)]
    d = decide(pool, jobs, T0 + 10_000)
    # 40 slots of 1-slot jobs: the 40 oldest high ones (id % 3 == 2), two per queue by rotation.
    assert len(d.admit) == 40 and all(i % 3 == 2 for i in d.admit)
    assert sorted(d.admit) == sorted(i for i in range(10_000) if i % 3 == 2)[:40]
