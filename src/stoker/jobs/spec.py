"""What a job asks for (`JobSpec`) and how the pool is shared (`PoolConfig`: queues.toml).

Both come from TOML or Python; every mistake is one `ConfigError` line naming the field and
what would be valid. The queue words are Kueue's: a queue has a nominal quota, may sit in a
cohort whose members lend each other unused quota, and reclaims what it lent when it needs it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.config import ConfigError

# Priority classes every pool has; queues.toml may add more (or change these values).
PRIORITIES = {"low": 0, "normal": 100, "high": 200}
STRATEGIES = ("best_effort_fifo", "strict_fifo")
RECLAIM = ("any", "lower_priority", "never")
WITHIN = ("lower_priority", "never")
BACKENDS = ("local", "slurm", "kubernetes", "ray")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_duration(value: Any, name: str) -> float:
    """Seconds from 90, "90s", "30m", "2h", "1d" (or "1h30m")."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration such as 90, '90s', '30m' or '2h', got {value!r}")
    if isinstance(value, (int, float)):
        s = float(value)
    else:
        parts = re.fullmatch(r"\s*((\d+(\.\d+)?)\s*[smhd]\s*)+", str(value).lower())
        if parts is None:
            raise ConfigError(f"{name}: expected a duration such as 90, '90s', '30m' or '2h', got {value!r}")
        s = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", str(value).lower()))
    if s < 0:
        raise ConfigError(f"{name}: must be >= 0 seconds, got {value!r}")
    return s


def check_keys(d: dict[str, Any], known: set[str], where: str) -> None:
    """ConfigError naming the first key of table `where` that is not in `known`."""
    bad = sorted(set(d) - known)
    if bad:
        raise ConfigError(f"{where}.{bad[0]}: unknown; keys are: {', '.join(sorted(known))}")


def check_port(port: Any, where: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: expected 1-65535, got {port!r}")


def parse_memory(value: Any, name: str = "memory") -> int:
    """Bytes from 1073741824, "512MiB", "8G", "8GiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if m is None or isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size such as '512MiB' or '8GiB', got {value!r}")
    return int(float(m.group(1)) * _BYTES[m.group(2)])


@dataclass
class JobSpec:
    """One job: a command and what it needs. `slots` processes are admitted together or not at all."""

    command: list[str]
    name: str = ""
    queue: str = "default"
    priority: str = "normal"
    slots: int = 1  # processes; the unit of quota (a GPU, or a CPU core where there is none)
    hosts: int = 1
    cpus: float = 1.0  # CPU cores per slot
    memory: int = 0  # bytes for the whole job (0: not stated)
    gpus: int = 0  # GPUs per slot
    max_runtime: float = 0.0  # seconds of running, summed over attempts (0: no limit)
    retries: int = 3  # restarts after a failure, with exponential backoff
    preemptible: bool = True
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""  # default: where it was submitted from
    grace: float | None = None  # seconds between SIGTERM and SIGKILL (None: the pool's)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.command, str) or not isinstance(self.command, (list, tuple)) or not self.command \
                or not all(isinstance(a, str) for a in self.command):
            raise ConfigError(f"command: expected a non-empty list of strings, e.g. ['stoker', 'train', "
                              f"'--train.steps=100'], got {self.command!r}")
        self.command = list(self.command)
        if isinstance(self.workdir, os.PathLike):
            self.workdir = os.fspath(self.workdir)
        for key in ("name", "queue", "priority", "workdir"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key}: expected a string, got {getattr(self, key)!r}")
        if not self.queue:
            raise ConfigError("queue: must not be empty")
        for key, low in (("slots", 1), ("hosts", 1), ("gpus", 0), ("retries", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{key}: expected an integer >= {low}, got {v!r}")
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, (int, float)) or self.cpus <= 0:
            raise ConfigError(f"cpus: expected a number > 0 (cores per slot), got {self.cpus!r}")
        self.cpus = float(self.cpus)
        self.memory = parse_memory(self.memory, "memory")
        self.max_runtime = parse_duration(self.max_runtime, "max_runtime")
        if self.grace is not None:
            self.grace = parse_duration(self.grace, "grace")
        if not isinstance(self.preemptible, bool):
            raise ConfigError(f"preemptible: expected true or false, got {self.preemptible!r}")
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                     and not isinstance(v, bool) for k, v in self.env.items()):
            raise ConfigError(f"env: expected a table of NAME = 'value', got {self.env!r}")
        self.env = {k: str(v) for k, v in self.env.items()}
        if not self.name:
            self.name = Path(self.command[0]).name + (f"-{self.command[1]}" if self.command[0] == "stoker"
                                                      and len(self.command) > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "job spec") -> "JobSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}; fields are: {', '.join(sorted(known))}")
        if "command" not in d:
            raise ConfigError(f"{where}: needs command = [...], e.g. command = ['stoker', 'train', 'run.toml']")
        return cls(**d)


def load_spec(path: str | Path) -> JobSpec:
    """A JobSpec from a TOML file; its workdir defaults to the file's directory."""
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    d.setdefault("workdir", str(path.resolve().parent))
    try:
        return JobSpec.from_dict(d, str(path))
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass
class QueueConfig:
    """A queue (Kueue: a ClusterQueue). `nominal_quota` slots are its own; in a `cohort` it may
    borrow what the others do not use, up to `borrowing_limit` (None: no limit), and lends at
    most `lending_limit` of its own (None: all it does not use)."""

    name: str
    nominal_quota: int
    cohort: str = ""
    borrowing_limit: int | None = None
    lending_limit: int | None = None  # how much of its quota others may borrow (None: all of it)
    strategy: str = "best_effort_fifo"  # strict_fifo: a head that cannot start blocks the rest
    reclaim_within_cohort: str = "any"  # preempt others' borrowed jobs when taking back quota
    within_queue: str = "lower_priority"  # preempt this queue's lower-priority jobs
    backend: str = "local"  # where its jobs run: local, slurm, kubernetes or ray
    workload: str = "job"  # on Kubernetes: an Indexed Job and a Service, or a JobSet

    @property
    def lendable(self) -> int:
        return self.nominal_quota if self.lending_limit is None else min(self.lending_limit, self.nominal_quota)

    @property
    def kept(self) -> int:
        """The part of its quota no other queue can borrow."""
        return self.nominal_quota - self.lendable


@dataclass
class PoolConfig:
    """The pool: its slots, queues, priority classes and timing rules (queues.toml)."""

    slots: int
    queues: dict[str, QueueConfig]
    priorities: dict[str, int] = field(default_factory=lambda: dict(PRIORITIES))
    grace: float = 60.0  # SIGTERM -> SIGKILL: time to write a checkpoint
    retry_pause: float = 90.0  # first pause after a failure; doubles after each
    aging_per_hour: float = 50.0  # priority points a waiting job gains per hour
    gpus: int = 0  # GPUs on this host (slots are GPUs when there are any)
    cores: int = 1
    memory: int = 0  # bytes on this host (0: unknown)
    kubernetes: dict[str, Any] = field(default_factory=dict)  # [kubernetes]: see backends/kubernetes.py
    slurm: dict[str, Any] = field(default_factory=dict)  # [slurm]: see backends/slurm.py
    ray: dict[str, Any] = field(default_factory=dict)  # [ray]: see backends/ray.py

    def cohort_members(self, q: QueueConfig) -> list[QueueConfig]:
        return [o for o in self.queues.values() if q.cohort and o.cohort == q.cohort] or [q]

    def most_slots(self, queue: str) -> int:
        """The most slots a job in `queue` could ever hold: its quota plus all it may borrow."""
        q = self.queues[queue]
        cohort = q.nominal_quota + sum(o.lendable for o in self.cohort_members(q) if o is not q)
        ceiling = cohort if q.borrowing_limit is None else min(cohort, q.nominal_quota + q.borrowing_limit)
        return min(ceiling, self.slots)

    def check(self, spec: JobSpec, backend: str = "local") -> None:
        """ConfigError unless this pool could ever run `spec` (on this host, for the local backend)."""
        if spec.queue not in self.queues:
            raise ConfigError(f"queue: no queue {spec.queue!r}; queues are: {', '.join(self.queues)}")
        if spec.priority not in self.priorities:
            raise ConfigError(f"priority: no class {spec.priority!r}; classes are: "
                              + ", ".join(f"{k} ({v})" for k, v in sorted(self.priorities.items(), key=lambda kv: kv[1])))
        if backend != "local":
            return  # the cluster decides what it can hold
        if spec.hosts != 1:
            raise ConfigError(f"hosts: the local engine has 1 host, the job asks for {spec.hosts} "
                              "(submit it to a cluster backend)")
        most = self.most_slots(spec.queue)
        if spec.slots > most:
            raise ConfigError(f"slots: the job asks for {spec.slots} but queue {spec.queue!r} can never hold more "
                              f"than {most} (its quota and what its cohort can lend, of {self.slots} in the pool)")
        if spec.gpus > 1:
            raise ConfigError(f"gpus: the local engine gives each slot one GPU (a slot is a GPU here); got "
                              f"{spec.gpus} per slot: ask for more slots instead")
        if spec.gpus and spec.gpus * spec.slots > self.gpus:
            raise ConfigError(f"gpus: the job asks for {spec.gpus * spec.slots} GPUs ({spec.gpus} per slot); "
                              f"this host has {self.gpus}")
        if spec.cpus * spec.slots > self.cores:
            raise ConfigError(f"cpus: the job asks for {spec.cpus * spec.slots:g} cores ({spec.cpus:g} per slot); "
                              f"this host has {self.cores}")
        if self.memory and spec.memory > self.memory:
            raise ConfigError(f"memory: the job asks for {spec.memory / 2**30:.1f} GiB; this host has "
                              f"{self.memory / 2**30:.1f} GiB")


def host_resources() -> tuple[int, int, int]:
    """(GPUs, CPU cores usable by this process, memory bytes) of this host, without importing torch."""
    gpus = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    else:
        try:
            gpus = len([p for p in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", p)])
        except OSError:
            gpus = 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return gpus, cores, memory


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def pool_from_dict(d: dict[str, Any], where: str = "queues.toml") -> PoolConfig:
    """A PoolConfig from queues.toml's content (an empty dict: one queue `default` of every slot)."""
    gpus, cores, memory = host_resources()
    top = {"slots", "scheduler", "priorities", "queues", "kubernetes", "slurm", "ray"}
    unknown = sorted(set(d) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; keys are: {', '.join(sorted(top))}")
    slots = d.get("slots", gpus or cores)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ConfigError(f"{where}: slots: expected an integer >= 1, got {slots!r}")
    pool = PoolConfig(slots=slots, queues={}, gpus=gpus, cores=max(cores, slots) if not gpus else cores,
                      memory=memory)
    if "kubernetes" in d:
        from stoker.jobs.backends.kubernetes import KubeConfig

        KubeConfig.from_dict(d["kubernetes"], f"{where}: kubernetes")  # its mistakes show up now
        pool.kubernetes = dict(d["kubernetes"])
    if "slurm" in d:
        from stoker.jobs.backends.slurm import SlurmConfig

        SlurmConfig.from_dict(d["slurm"], f"{where}: slurm")
        pool.slurm = dict(d["slurm"])
    if "ray" in d:
        from stoker.jobs.backends.ray import RayConfig

        RayConfig.from_dict(d["ray"], f"{where}: ray")
        pool.ray = dict(d["ray"])
    sched = dict(d.get("scheduler", {}))
    check_keys(sched, {"aging_per_hour", "grace", "retry_pause"}, f"{where}: scheduler")
    for key in ("grace", "retry_pause"):
        if key in sched:
            setattr(pool, key, parse_duration(sched.pop(key), f"{where}: scheduler.{key}"))
    if "aging_per_hour" in sched:
        v = sched.pop("aging_per_hour")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{where}: scheduler.aging_per_hour: expected a number >= 0, got {v!r}")
        pool.aging_per_hour = float(v)
    for name, value in d.get("priorities", {}).items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: priorities.{name}: expected an integer (higher runs first), got {value!r}")
        pool.priorities[name] = value
    queues = d.get("queues", {"default": {"nominal_quota": slots}})
    if not isinstance(queues, dict) or not queues:
        raise ConfigError(f"{where}: [queues.NAME] tables expected, e.g. [queues.team-a] nominal_quota = 1")
    known = {f.name for f in dataclasses.fields(QueueConfig)} - {"name"}
    for name, q in queues.items():
        w = f"{where}: queues.{name}"
        if not isinstance(q, dict):
            raise ConfigError(f"{w}: expected a table with nominal_quota = N")
        check_keys(q, known, w)
        quota = q.get("nominal_quota")
        if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
            raise ConfigError(f"{w}.nominal_quota: expected an integer >= 0 (slots), got {quota!r}")
        limit = q.get("borrowing_limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"{w}.borrowing_limit: expected an integer >= 0, got {limit!r}")
        lend = q.get("lending_limit")
        if lend is not None and (isinstance(lend, bool) or not isinstance(lend, int) or not 0 <= lend <= quota):
            raise ConfigError(f"{w}.lending_limit: expected an integer from 0 to nominal_quota ({quota}), got {lend!r}")
        cohort = q.get("cohort", "")
        if not isinstance(cohort, str):
            raise ConfigError(f"{w}.cohort: expected a name, got {cohort!r}")
        pool.queues[name] = QueueConfig(
            name=name, nominal_quota=quota, cohort=cohort, borrowing_limit=limit, lending_limit=lend,
            strategy=_choice(q.get("strategy", "best_effort_fifo"), STRATEGIES, f"{w}.strategy"),
            reclaim_within_cohort=_choice(q.get("reclaim_within_cohort", "any"), RECLAIM, f"{w}.reclaim_within_cohort"),
            within_queue=_choice(q.get("within_queue", "lower_priority"), WITHIN, f"{w}.within_queue"),
            backend=_choice(q.get("backend", "local"), BACKENDS, f"{w}.backend"),
            workload=_choice(q.get("workload", "job"), ("job", "jobset"), f"{w}.workload"))
    total = sum(q.nominal_quota for q in pool.queues.values() if q.backend == "local")  # a cluster has its own
    if total > pool.slots:
        raise ConfigError(f"{where}: the queues' nominal quotas add up to {total} slots; the pool has {pool.slots} "
                          "(set slots = N to say otherwise)")
    return pool


def load_pool(path: str | Path | None) -> PoolConfig:
    """The pool described by queues.toml at `path`; with no file, the default pool."""
    if path is None or not Path(path).exists():
        return pool_from_dict({})
    try:
        d = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return pool_from_dict(d, str(path))
