"""Jobs on a Ray cluster through the Ray Jobs API (`ray.job_submission.JobSubmissionClient`).

A job becomes one Ray job whose entrypoint is the job's command, run on one node of the cluster
in the job's working directory. Ray holds it PENDING until a node has the entrypoint's resources
(the job's CPUs, GPUs and memory); stoker's queue, priority and quota do not reorder Ray's jobs
(Ray has neither queues nor preemption for jobs).

Stopping a job (`stoker jobs cancel`) sends SIGTERM to every process of it, so a training job
writes its checkpoint, then SIGKILL after the head's RAY_JOB_STOP_WAIT_TIME_S (3 s unless the
head was started with more: give it the checkpoint time). `stoker jobs resubmit N` sends the
same job again, and a training job resumes from the checkpoint in its working directory.

queues.toml's `[ray]` table:

    address = "http://head:8265"  # the head's dashboard, which serves the Jobs API
                                  # (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else http://127.0.0.1:8265)
    upload_workdir = false        # true: send the working directory to the cluster (runtime_env
                                  # working_dir) instead of assuming the nodes share the filesystem;
                                  # what the job writes there is not kept
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from stoker.config import ConfigError
from stoker.jobs.backends import BackendError, RemoteStatus
from stoker.jobs.policy import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED
from stoker.jobs.spec import JobSpec, check_keys
from stoker.launch import with_nproc


@dataclass
class RayConfig:
    address: str = ""
    upload_workdir: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "queues.toml: ray") -> "RayConfig":
        check_keys(d, {f.name for f in fields(cls)}, where)
        cfg = cls(**d)
        if not isinstance(cfg.address, str):
            raise ConfigError(f"{where}.address: expected the head's address, e.g. \"http://head:8265\"")
        if not isinstance(cfg.upload_workdir, bool):
            raise ConfigError(f"{where}.upload_workdir: expected true or false, got {cfg.upload_workdir!r}")
        return cfg

    @property
    def url(self) -> str:
        return (self.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
                or "http://127.0.0.1:8265")


def entrypoint(spec: JobSpec, cfg: RayConfig) -> str:
    """The shell line Ray runs: the command in the job's directory; `stoker train` gets --nproc."""
    if spec.hosts != 1:
        raise ConfigError(f"hosts: a Ray job runs its command on one node; this one asks for {spec.hosts} hosts "
                          "(run multi-host training on a Slurm or Kubernetes queue)")
    line = shlex.join(with_nproc(spec.command, spec.slots))
    if spec.workdir and not cfg.upload_workdir:
        line = f"cd {shlex.quote(spec.workdir)} && exec {line}"
    return line


def submit_args(spec: JobSpec, job_id: int, cfg: RayConfig) -> dict[str, Any]:
    """JobSubmissionClient.submit_job's arguments for `spec`."""
    env = {"STOKER_JOB_ID": str(job_id), "OMP_NUM_THREADS": str(max(1, int(spec.cpus))), **spec.env}
    runtime_env: dict[str, Any] = {"env_vars": env}
    if cfg.upload_workdir and spec.workdir:
        runtime_env["working_dir"] = spec.workdir
    args: dict[str, Any] = {
        "entrypoint": entrypoint(spec, cfg),
        # unique on the cluster, which other stoker homes share
        "submission_id": f"stoker-{job_id}-{re.sub(r'[^A-Za-z0-9_-]+', '-', spec.name)[:40]}-{secrets.token_hex(3)}",
        "runtime_env": runtime_env,
        "metadata": {"stoker_job": str(job_id), "queue": spec.queue, "priority": spec.priority},
        "entrypoint_num_cpus": spec.cpus * spec.slots}
    if spec.gpus:
        args["entrypoint_num_gpus"] = spec.gpus * spec.slots
    if spec.memory:
        args["entrypoint_memory"] = int(spec.memory)
    return args


def connect(cfg: RayConfig):
    """A JobSubmissionClient for the head, or a one-line error."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise BackendError("ray: Ray's job client is not installed: pip install 'stoker[ray]'") from None
    try:
        return JobSubmissionClient(cfg.url)
    except Exception as e:  # ConnectionError, a refused or malformed address
        raise BackendError(f"ray: cannot reach the Ray head at {cfg.url} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no answer'})") from None


_STATES = {"PENDING": PENDING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED, "STOPPED": CANCELLED}


class Backend:
    """The verbs stoker.jobs.Client calls for a Ray job (its record's remote_id: the submission id)."""

    name = "Ray"

    def __init__(self, pool, client=None):
        self.pool, self.cfg, self._client = pool, RayConfig.from_dict(pool.ray), client

    @property
    def client(self):
        if self._client is None:
            self._client = connect(self.cfg)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # RuntimeError with the head's HTTP answer, or a lost connection
            first = str(e).strip().splitlines()
            raise BackendError(f"ray: {what}: {first[-1] if first else type(e).__name__}") from None

    def submit(self, spec: JobSpec, job_id: int, job_dir: Path) -> str:
        args = submit_args(spec, job_id, self.cfg)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "ray-job.txt").write_text(f"{args['submission_id']}\n{args['entrypoint']}\n")  # for the record
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._call("submit", self.client.submit_job, **args)
            except BackendError as e:
                # A head that has just started answers before its job agent is up.
                if "try again later" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def status(self, remote_id: str, spec: JobSpec) -> RemoteStatus:
        info = self._call(f"job {remote_id}", self.client.get_job_info, remote_id)
        native = str(getattr(info.status, "value", info.status))
        state = _STATES.get(native, RUNNING)
        code = info.driver_exit_code if state in (SUCCEEDED, FAILED) else None
        if state == SUCCEEDED and code is None:
            code = 0
        return RemoteStatus(state, native, (info.message or "").strip().splitlines()[0] if info.message else "",
                            code)

    def why(self, remote_id: str, spec: JobSpec) -> list[str]:
        st = self.status(remote_id, spec)
        lines = [f"Ray job {remote_id}: {st.native}" + (f": {st.reason}" if st.reason else "")]
        if st.state == PENDING:
            asks = [f"{spec.cpus * spec.slots:g} CPU"] + ([f"{spec.gpus * spec.slots} GPU"] if spec.gpus else [])
            if spec.memory:
                asks.append(f"{spec.memory / 2**30:.1f} GiB")
            lines.append(f"its entrypoint needs {', '.join(asks)} free on one node of {self.cfg.url}; "
                         "Ray starts jobs as resources free up (it has no queues or priorities)")
        return lines

    def cancel(self, remote_id: str, spec: JobSpec) -> str | None:
        """Stop the job. Ray cannot withdraw a job still waiting for resources: it runs the
        stop when the job would start. Then the reason to record it as cancelled now."""
        pending = self.status(remote_id, spec).state == PENDING
        self._call(f"stop {remote_id}", self.client.stop_job, remote_id)
        if pending:
            return "cancelled while waiting for Ray's resources (Ray stops it the moment it would start)"
        return None

    def logs(self, remote_id: str, spec: JobSpec) -> str | None:
        return self._call(f"logs of {remote_id}", self.client.get_job_logs, remote_id)
