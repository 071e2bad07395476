"""A one-node Ray cluster for the tests: `ray start --head --block` in a session of its own,
stopped by signalling that session (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, cpus: int = 2, stop_wait_s: int = 60):
        self.cpus, self.stop_wait_s = cpus, stop_wait_s
        # Ray's sockets live under its temp dir: a short path keeps them under the 107-byte limit.
        self.tmp = Path(tempfile.mkdtemp(prefix="sray-", dir="/tmp"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "RayHead":
        bin_dir = str(Path(sys.executable).parent)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   # No token authentication: a head here turned it on by itself ("Token
                   # authentication is enabled for this Ray cluster") and refused the tests' clients.
                   RAY_AUTH_MODE="disabled",
                   # the grace Ray gives a stopped job between SIGTERM and SIGKILL: time to checkpoint
                   RAY_JOB_STOP_WAIT_TIME_S=str(self.stop_wait_s))
        ray = shutil.which("ray", path=env["PATH"])
        self.log = open(self.tmp / "head.log", "wb")
        self.proc = subprocess.Popen(
            [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
             # every port of its own: another Ray on this machine holds the defaults
             *(f"--{name}-port={free_port()}" for name in ("dashboard-agent-listen", "dashboard-agent-grpc",
                                                           "runtime-env-agent", "metrics-export", "ray-client-server",
                                                           "node-manager", "object-manager")),
             f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", f"--num-cpus={self.cpus}",
             "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={self.tmp}", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.tmp)
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, (self.tmp / "head.log").read_text()[-3000:]
            try:
                client = JobSubmissionClient(self.address)
                job = client.submit_job(entrypoint="true")  # refused until the job agent is up
                while not client.get_job_status(job).is_terminal():
                    time.sleep(0.2)
                return self
            except Exception:
                if time.time() > deadline:
                    raise AssertionError(f"Ray head not up in {timeout} s:\n"
                                         + (self.tmp / "head.log").read_text()[-3000:])
                time.sleep(0.5)

    def pids(self) -> list[int]:
        """Every process whose command line names this head's temp dir or ports: its daemons and workers."""
        marks = [str(self.tmp).encode(), f"{self.port}".encode()]
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != os.getpid():
                try:
                    cmd = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(m in cmd for m in marks) and (b"ray" in cmd or b"gcs_server" in cmd or b"raylet" in cmd):
                    out.append(int(p.name))
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: the head stops its own processes
            try:  # it takes ~19 s to do so gracefully; a test cluster is killed after 3
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
