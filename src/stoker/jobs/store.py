"""The job store: one SQLite database in write-ahead-log mode under the jobs home.

Every change of a job's state is one transaction, made only from the state(s) it expects
(`UPDATE ... WHERE state IN ...`), so the scheduler and any number of clients can write at
once without losing or doubling a job, and a crash of either leaves the last committed state.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from stoker.config import ConfigError
from stoker.jobs.policy import ACTIVE, PENDING, WAITING, Job
from stoker.jobs.spec import JobSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, spec TEXT NOT NULL,
    queue TEXT NOT NULL, priority_class TEXT NOT NULL, priority INTEGER NOT NULL, slots INTEGER NOT NULL,
    preemptible INTEGER NOT NULL, max_runtime REAL NOT NULL, retries INTEGER NOT NULL,
    state TEXT NOT NULL, submitted REAL NOT NULL, queued_at REAL NOT NULL, backoff_until REAL NOT NULL DEFAULT 0,
    started REAL NOT NULL DEFAULT 0, admit_priority REAL NOT NULL DEFAULT 0, runtime_used REAL NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0, preemptions INTEGER NOT NULL DEFAULT 0, exit_code INTEGER,
    stopping TEXT NOT NULL DEFAULT '', stop_deadline REAL NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER, pid_start TEXT, attempt INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    finished REAL, updated REAL NOT NULL, seq INTEGER NOT NULL DEFAULT 0, slot_ids TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL DEFAULT 'local', remote_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    job_id INTEGER NOT NULL, time REAL NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL
);
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
"""

# Columns added after the first version of the table (an older store gets them on opening;
# a new one has them from CREATE TABLE).
ADDED_COLUMNS = [("seq", "INTEGER NOT NULL DEFAULT 0"), ("slot_ids", "TEXT NOT NULL DEFAULT ''"),
                 ("backend", "TEXT NOT NULL DEFAULT 'local'"), ("remote_id", "TEXT NOT NULL DEFAULT ''")]

_SCHED = [f.name for f in fields(Job)]


@dataclass
class Event:
    time: float
    state: str
    detail: str


@dataclass
class JobInfo(Job):
    """Everything known about a job: the scheduler's view plus its spec, process and outcome."""

    name: str = ""
    spec: JobSpec | None = None
    preemptions: int = 0
    exit_code: int | None = None
    pid: int | None = None
    pid_start: str | None = None
    attempt: int = 0
    reason: str = ""
    finished: float | None = None
    updated: float = 0.0
    backend: str = "local"  # or the cluster engine it was submitted to
    remote_id: str = ""  # the job's id there
    history: list[Event] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("id", "name", "state", "backend", "remote_id", "queue", "slots", "restarts", "preemptions",
                                           "exit_code", "reason", "submitted", "started", "finished", "attempt",
                                           "pid", "stopping", "backoff_until", "runtime_used")}
        d["priority"] = self.priority_class
        d["priority_value"] = self.priority
        d["command"] = self.spec.command if self.spec else []
        d["history"] = [{"time": e.time, "state": e.state, "detail": e.detail} for e in self.history]
        return d


def default_home() -> Path:
    return Path(os.environ.get("STOKER_JOBS_HOME") or Path.home() / ".stoker" / "jobs")


class Store:
    """The job table and its history, at HOME/jobs.db."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home is not None else default_home()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"jobs home {self.home}: cannot create it ({e.strerror or e})") from None
        self.path = self.home / "jobs.db"
        # Autocommit; writes open BEGIN IMMEDIATE themselves, so a writer waits (busy_timeout)
        # instead of failing when another holds the lock.
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout = 60000")
        self.db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a process crash loses nothing committed; only a power cut can
        # lose the last transactions, and never damages the database.
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.executescript(SCHEMA)
        self._upgrade()
        self.db.executescript(INDEXES)

    def _upgrade(self) -> None:
        """A store made by an earlier version gains the columns added since, empty. Under the
        write lock, so that clients opening it at once do not add a column twice."""
        def missing() -> list[tuple[str, str]]:
            have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            return [(c, d) for c, d in ADDED_COLUMNS if c not in have]

        if missing():
            with self._tx() as db:
                for col, decl in missing():
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")

    def close(self) -> None:
        self.db.close()

    def job_dir(self, job_id: int) -> Path:
        return self.home / "jobs" / str(job_id)

    def _tx(self):
        return _Tx(self.db)

    def submit(self, spec: JobSpec, priority: int, now: float | None = None, backend: str = "local") -> int:
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (name, spec, queue, priority_class, priority, slots, preemptible, max_runtime, "
                "retries, state, submitted, queued_at, updated, seq, backend) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (spec.name, json.dumps(spec.to_dict()), spec.queue, spec.priority, priority, spec.slots,
                 int(spec.preemptible), spec.max_runtime, spec.retries, PENDING, now, now, now, _next_seq(db), backend))
            job_id = cur.lastrowid
            db.execute("INSERT INTO events VALUES (?,?,?,?)", (job_id, now, PENDING, "submitted"))
        return job_id

    def update(self, job_id: int, expect: tuple[str, ...], event: str | None = None, now: float | None = None,
               **values) -> bool:
        """Set `values` on the job if its state is one of `expect`; record `event` in its history
        (with the new state). False when the job was in another state (someone else moved it)."""
        now = time.time() if now is None else now
        values["updated"] = now
        marks = ",".join("?" * len(expect))
        with self._tx() as db:
            values["seq"] = _next_seq(db)
            cols = ", ".join(f"{k} = ?" for k in values)
            cur = db.execute(f"UPDATE jobs SET {cols} WHERE id = ? AND state IN ({marks})",
                             (*values.values(), job_id, *expect))
            if cur.rowcount != 1:
                return False
            if event is not None:
                state = values.get("state") or db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
                db.execute("INSERT INTO events VALUES (?,?,?,?)", (job_id, now, state, event))
        return True

    def scheduling_view(self) -> list[Job]:
        """Every job that waits or holds slots, as the scheduler sees it."""
        states = WAITING + ACTIVE
        return self._jobs(self.db.execute(f"SELECT {', '.join(_SCHED)} FROM jobs WHERE backend = 'local' AND state IN "
                                          f"({','.join('?' * len(states))})", states).fetchall())

    def changes(self, since: int) -> tuple[list[Job], int]:
        """The jobs written after change number `since` (any state), and the last change number.
        Writers are serialised and number their changes in commit order, so nothing is missed."""
        rows = self.db.execute(f"SELECT {', '.join(_SCHED)}, seq FROM jobs WHERE seq > ? AND backend = 'local'",
                               (since,)).fetchall()
        return self._jobs([r[:-1] for r in rows]), max((r[-1] for r in rows), default=since)

    @staticmethod
    def _jobs(rows: list[tuple]) -> list[Job]:
        out = [Job(*r) for r in rows]
        for j in out:
            j.preemptible, j.cancel_requested = bool(j.preemptible), bool(j.cancel_requested)
        return out

    def _info(self, row: sqlite3.Row | tuple, cols: list[str]) -> JobInfo:
        d = dict(zip(cols, row))
        d["spec"] = JobSpec.from_dict(json.loads(d["spec"]))
        d["preemptible"] = bool(d["preemptible"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        d.pop("seq")
        d.pop("slot_ids")
        return JobInfo(**d)

    def get(self, job_id: int, history: bool = True) -> JobInfo:
        cur = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
        row = cur.fetchone()
        if row is None:
            raise ConfigError(f"no job {job_id} in {self.path}")
        info = self._info(row, [c[0] for c in cur.description])
        if history:
            info.history = [Event(*e) for e in self.db.execute(
                "SELECT time, state, detail FROM events WHERE job_id = ? ORDER BY rowid", (job_id,))]
        return info

    def list(self, states: tuple[str, ...] | None = None, limit: int | None = None) -> list[JobInfo]:
        q = "SELECT * FROM jobs"
        args: tuple = ()
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
            args = states
        q += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        cur = self.db.execute(q, args)
        cols = [c[0] for c in cur.description]
        return [self._info(r, cols) for r in cur.fetchall()][::-1]

    def held_slots(self) -> set[int]:
        """The slot numbers (GPU indices on a GPU host) held by admitted and running jobs."""
        rows = self.db.execute("SELECT slot_ids FROM jobs WHERE state IN (?,?) AND backend = 'local'", ACTIVE).fetchall()
        return {int(x) for (ids,) in rows for x in ids.split(",") if x}

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """queue -> (slots held, jobs holding slots, jobs waiting)."""
        out: dict[str, list[int]] = {}
        for queue, state, n, slots in self.db.execute(
                "SELECT queue, state, count(*), sum(slots) FROM jobs WHERE state IN (?,?,?,?) AND backend = 'local' "
                "GROUP BY queue, state",
                WAITING + ACTIVE):
            u = out.setdefault(queue, [0, 0, 0])
            if state in ACTIVE:
                u[0] += slots
                u[1] += n
            else:
                u[2] += n
        return {k: tuple(v) for k, v in out.items()}  # type: ignore[misc]


def _next_seq(db: sqlite3.Connection) -> int:
    return db.execute("SELECT coalesce(max(seq), 0) + 1 FROM jobs").fetchone()[0]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
