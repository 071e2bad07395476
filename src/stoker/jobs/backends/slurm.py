"""Jobs on Slurm: a JobSpec as an sbatch script, and the job's state, reason, output and
cancellation read back through squeue, scontrol and scancel.

The script asks for `hosts` nodes with one task each; `srun` starts one copy of the command per
node, and a `stoker train` command gets `--nnodes`, `--node-rank` (the node's index) and
`--master` (the first node of the allocation). The job is requeueable and appends to one
output file, so a preemption (a partition with PreemptMode=REQUEUE: SIGTERM, GraceTime, then
requeue) leaves a checkpoint, and the requeued job resumes from it.

Preemption needs the partition's PreemptMode=REQUEUE without GraceTime: the job step gets SIGTERM
at once and KillWait seconds (slurm.conf) to checkpoint before SIGKILL, and the job is requeued.
With GraceTime, a job whose step ends within the grace counts as finished and is not requeued.

queues.toml's `[slurm]` table:

    partition = "batch"                          # default: Slurm's default partition
    partitions = { low = "low", high = "high" }  # per priority class: preemption by PriorityTier
    qos = { high = "urgent" }                    # per priority class
    account = "ml"
    port = 29500                                 # the rendezvous port on the first node
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stoker.config import ConfigError
from stoker.jobs.backends import BackendError, RemoteStatus
from stoker.jobs.policy import CANCELLED, FAILED, PENDING, PREEMPTED, RUNNING, SUCCEEDED
from stoker.jobs.spec import JobSpec, check_keys, check_port
from stoker.launch import with_nproc


@dataclass
class SlurmConfig:
    partition: str = ""
    partitions: dict[str, str] = field(default_factory=dict)
    qos: dict[str, str] = field(default_factory=dict)
    account: str = ""
    port: int = 29500

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "queues.toml: slurm") -> "SlurmConfig":
        check_keys(d, {f.name for f in fields(cls)}, where)
        for key in ("partitions", "qos"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"{where}.{key}: expected a table of priority class = name")
        cfg = cls(**d)
        check_port(cfg.port, f"{where}.port")
        return cfg


def _run(argv: list[str], what: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BackendError(f"slurm: {argv[0]} not found: is Slurm's client installed and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise BackendError(f"slurm: {argv[0]} did not answer in 60 s (is slurmctld up?)") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise BackendError(f"slurm: {what} failed: {msg[-1] if msg else f'exit {r.returncode}'}")
    return r.stdout


def script(spec: JobSpec, job_id: int, cfg: SlurmConfig, output: Path, grace: float) -> str:
    """The sbatch script that runs `spec` (see the module's docstring)."""
    if spec.slots % spec.hosts:
        raise ConfigError(f"slots: {spec.slots} slots do not split evenly over {spec.hosts} hosts")
    per_host = spec.slots // spec.hosts
    lines = ["#!/bin/bash", f"#SBATCH --job-name={shlex.quote(f'stoker-{job_id}-{spec.name}'[:60])}",
             f"#SBATCH --nodes={spec.hosts}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={max(1, round(spec.cpus * per_host))}",
             "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={output}"]
    if spec.gpus:
        lines.append(f"#SBATCH --gres=gpu:{spec.gpus * per_host}")
    if spec.memory:
        lines.append(f"#SBATCH --mem={max(1, spec.memory // spec.hosts // 2**20)}M")
    if spec.max_runtime:
        lines.append(f"#SBATCH --time={max(1, int(-(-spec.max_runtime // 60)))}")
        # SIGTERM to the job's processes `grace` seconds before the time limit: a checkpoint.
        lines.append(f"#SBATCH --signal=TERM@{max(1, int(grace))}")
    partition = cfg.partitions.get(spec.priority, cfg.partition)
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if spec.priority in cfg.qos:
        lines.append(f"#SBATCH --qos={cfg.qos[spec.priority]}")
    if cfg.account:
        lines.append(f"#SBATCH --account={cfg.account}")
    if spec.workdir:
        lines.append(f"#SBATCH --chdir={spec.workdir}")
    lines.append(f"export OMP_NUM_THREADS={max(1, int(spec.cpus))}")  # the job's own env may say otherwise
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())]
    lines += [f"export STOKER_JOB_ID={job_id}",
              'echo "--- job ${STOKER_JOB_ID} attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )): started '
              '$(date "+%F %T") on ${SLURM_JOB_NODELIST}"']
    argv = with_nproc(spec.command, per_host)
    tail = ""
    if argv[0] == "stoker":
        argv = [sys.executable, "-m", "stoker", *argv[1:]]
        if argv[3:4] == ["train"]:
            if spec.hosts > 1:
                lines.append('export MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
                tail = f' --nnodes={spec.hosts} --node-rank="$SLURM_NODEID" --master="$MASTER:{cfg.port}"'
    # One task per node; the node's index is only known inside the task, hence bash -c.
    lines.append("srun --kill-on-bad-exit=1 bash -c " + shlex.quote("exec " + shlex.join(argv) + tail))
    return "\n".join(lines) + "\n"


def submit(spec: JobSpec, job_id: int, cfg: SlurmConfig, job_dir: Path, grace: float) -> str:
    """sbatch the job; Slurm's job id."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "job.sbatch"
    path.write_text(script(spec, job_id, cfg, job_dir / "output.log", grace))
    out = _run(["sbatch", "--parsable", str(path)], "sbatch")
    return out.strip().split(";")[0]


_STATES = {"PENDING": PENDING, "CONFIGURING": RUNNING, "RUNNING": RUNNING, "COMPLETING": RUNNING,
           "SUSPENDED": RUNNING, "STOPPED": RUNNING, "RESIZING": RUNNING, "COMPLETED": SUCCEEDED,
           "CANCELLED": CANCELLED, "FAILED": FAILED, "TIMEOUT": FAILED, "NODE_FAIL": FAILED,
           "OUT_OF_MEMORY": FAILED, "BOOT_FAIL": FAILED, "DEADLINE": FAILED, "PREEMPTED": PREEMPTED,
           "REQUEUED": PREEMPTED, "REQUEUE_FED": PREEMPTED, "REQUEUE_HOLD": PREEMPTED}


def status(slurm_id: str) -> RemoteStatus:
    """The job's state from scontrol (which keeps finished jobs for MinJobAge, 300 s by default)."""
    try:
        text = _run(["scontrol", "show", "job", "-o", slurm_id], f"scontrol show job {slurm_id}")
    except BackendError as e:
        if "Invalid job id" in str(e):
            return accounted(slurm_id)
        raise
    f = dict(re.findall(r"(\w+)=(\S*)", text))
    native = f.get("JobState", "UNKNOWN")
    state = _STATES.get(native, RUNNING)
    restarts = int(f.get("Restarts", "0") or 0)
    if state == PENDING and restarts:
        state = PREEMPTED  # requeued after a preemption, waiting to resume
    code = None
    if state in (SUCCEEDED, FAILED, CANCELLED) and ":" in f.get("ExitCode", ""):
        rc, sig = (int(x) for x in f["ExitCode"].split(":"))
        code = 128 + sig if sig else rc
    return RemoteStatus(state, native, f.get("Reason", ""), code, restarts)


def accounted(slurm_id: str) -> RemoteStatus:
    """How a job that slurmctld has forgotten (MinJobAge after it ended) ended, from sacct when
    the cluster keeps accounting."""
    try:
        text = _run(["sacct", "-n", "-P", "-X", "-j", slurm_id, "-o", "State,ExitCode,Reason"], "sacct")
    except BackendError:
        text = ""
    rows = [r.split("|") for r in text.splitlines() if r.count("|") == 2]
    if not rows:
        return RemoteStatus(FAILED, "UNKNOWN", "Slurm no longer knows this job (ended over MinJobAge ago) and "
                                                "keeps no accounting (sacct)")
    native, exit_code, reason = rows[-1]
    native = native.split()[0]  # "CANCELLED by 1000"
    state = _STATES.get(native, FAILED)
    rc, sig = (int(x) for x in exit_code.split(":")) if ":" in exit_code else (0, 0)
    return RemoteStatus(state, native, reason if reason != "None" else "", 128 + sig if sig else rc)


def why(slurm_id: str) -> list[str]:
    """Slurm's own pending reason, and the job's place among the pending jobs of its partition."""
    st = status(slurm_id)
    if st.native != "PENDING":
        return [f"Slurm state {st.native}" + (f" ({st.reason})" if st.reason not in ("", "None") else "")]
    text = _run(["squeue", "-h", "-t", "PD", "-o", "%i|%P|%Q|%r"], "squeue")
    rows = [r.split("|") for r in text.split("\n") if r.strip()]
    mine = next((r for r in rows if r[0] == slurm_id), None)
    if mine is None:
        return [f"Slurm state {st.native} ({st.reason})"]
    same = sorted((r for r in rows if r[1] == mine[1]), key=lambda r: (-int(r[2]), int(r[0].split("_")[0])))
    pos = [r[0] for r in same].index(slurm_id) + 1
    return [f"Slurm job {slurm_id}: position {pos} of {len(same)} pending in partition {mine[1]}",
            f"Slurm's reason: {mine[3]}"]


def cancel(slurm_id: str) -> None:
    _run(["scancel", slurm_id], f"scancel {slurm_id}")


class Backend:
    """The verbs stoker.jobs.Client calls for a Slurm job (its record's remote_id: Slurm's id)."""

    name = "Slurm"

    def __init__(self, pool):
        self.pool, self.cfg = pool, SlurmConfig.from_dict(pool.slurm)

    def submit(self, spec: JobSpec, job_id: int, job_dir: Path) -> str:
        return submit(spec, job_id, self.cfg, job_dir, spec.grace if spec.grace is not None else self.pool.grace)

    def status(self, remote_id: str, spec: JobSpec) -> RemoteStatus:
        return status(remote_id)

    def why(self, remote_id: str, spec: JobSpec) -> list[str]:
        return why(remote_id)

    def cancel(self, remote_id: str, spec: JobSpec) -> None:
        cancel(remote_id)

    def logs(self, remote_id: str, spec: JobSpec) -> str | None:
        return None  # the sbatch output file is the job's log file: read where it lies
