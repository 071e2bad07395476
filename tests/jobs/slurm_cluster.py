"""A one-node Slurm cluster on this machine for the tests: munge, slurmctld and slurmd from
Debian's slurm-wlm, configured under a temporary directory, with two partitions (`low`, and
`high` at a higher PriorityTier that preempts it with PreemptMode=REQUEUE; a preempted step has
KillWait, 60 s, to checkpoint before SIGKILL)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def why_not() -> str | None:
    """None when a cluster can be started here, else the one-line reason."""
    if os.geteuid() != 0:
        return "the Slurm tests need root to install slurm-wlm and start munged, slurmctld and slurmd"
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        r = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge",
                           shell=True, capture_output=True, text=True)
        if r.returncode != 0 or shutil.which("slurmctld") is None:
            return f"cannot install slurm-wlm and munge with apt-get: {(r.stderr or r.stdout).strip()[-200:]}"
    return None


def _munge() -> None:
    if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> "SlurmCluster":
        _munge()
        for d in ("etc", "state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host, r = socket.gethostname().split(".")[0], self.root
        cpus = len(os.sched_getaffinity(0))
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 2048
        self.conf.write_text(f"""ClusterName=stokertest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
AuthInfo=cred_expire=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
KillWait=60
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=low Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2
""")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                           env=self.env).stdout:
            if time.time() > deadline:
                raise RuntimeError("slurmd did not register: " + (self.root / "slurmctld.log").read_text()[-2000:])
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for name in ("slurmd.pid", "slurmctld.pid"):
            try:
                os.kill(int((self.root / name).read_text()), 15)
            except (OSError, ValueError):
                pass
