"""How processes are started: the torchrun command line for one host or many, and the checks
a host makes before it joins (the master reachable, the network interface present)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stoker.config import ConfigError

SYS_NET = Path("/sys/class/net")


def parse_master(master: str, name: str = "--master") -> tuple[str, int]:
    """(host, port) from HOST:PORT (an IPv6 host in brackets: [::1]:29500)."""
    host, sep, port = master.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: {master!r} is not HOST:PORT (e.g. 10.0.0.1:29500, port 1-65535)")
    return host, int(port)


def torchrun_command(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0, master: str | None = None,
                     connect_timeout_s: float | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m stoker ARGV` for `nproc` processes on this host.
    One host and no master: a standalone rendezvous on a free local port. Otherwise a static
    one at `master` (node 0 serves it): every node names the same master, its own rank and the
    node count, and ranks are numbered node by node (node_rank * nproc + local rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and master is None:
        cmd.append("--standalone")
    else:
        if master is None:
            raise ConfigError("--master: needed with --nnodes > 1 (HOST:PORT of node 0)")
        if not 0 <= node_rank < nnodes:
            raise ConfigError(f"--node-rank: must be in [0, {nnodes}) for --nnodes {nnodes}, got {node_rank}")
        host, port = parse_master(master)
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={host}", f"--master_port={port}"]
        # Node 0 waits for people to start the other machines (torch's 600 s); a joining node
        # has already reached the master, so its own bound can be the connect timeout.
        if node_rank > 0 and connect_timeout_s is not None:
            cmd.append(f"--rdzv_conf=timeout={max(1, round(connect_timeout_s))}")
    return cmd + [f"--nproc_per_node={nproc}", "-m", "stoker", *argv]


def wait_for_master(host: str, port: int, timeout_s: float) -> None:
    """Return once a TCP connection to host:port succeeds; ConfigError after `timeout_s`.
    Node 0 may start after the others, so refusals are retried, not reported."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))):
                return
        except OSError:
            if time.monotonic() + 0.2 >= deadline:
                break
            time.sleep(0.2)
    raise ConfigError(f"cannot reach the master {host}:{port} within {timeout_s:g} s (parallel.connect_timeout_s): "
                      "is node 0 started, and the address right?")


def interfaces() -> list[str]:
    try:
        return sorted(p.name for p in SYS_NET.iterdir())
    except OSError:
        return []


def check_ifname(ifname: str) -> None:
    """ConfigError unless `ifname` is a network interface of this host (its network namespace)."""
    if ifname and not (SYS_NET / ifname).exists():
        raise ConfigError(f"parallel.ifname: no network interface {ifname!r} on this host; "
                          f"it has: {', '.join(interfaces()) or 'none listed'}")


def socket_env(ifname: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that make gloo and NCCL use `ifname`, for those `environ` does not set
    already (a user's own choice, such as several NCCL interfaces, wins)."""
    environ = os.environ if environ is None else environ
    if not ifname:
        return {}
    return {k: ifname for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in environ}


def prepare_host(nnodes: int, node_rank: int, master: str | None, ifname: str = "",
                 connect_timeout_s: float = 60.0) -> dict[str, str]:
    """What a host checks before it starts its processes, each failure one ConfigError: the node
    count and rank, the master's address, the interface; a joining node (rank > 0) also waits
    for the master to answer. Returns the environment for torchrun and its workers."""
    if nnodes < 1:
        raise ConfigError(f"--nnodes: must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank: must be in [0, {nnodes}) for --nnodes {nnodes}, got {node_rank}")
    if nnodes > 1 and master is None:
        raise ConfigError("--master: needed with --nnodes > 1 (HOST:PORT of node 0, the same on every node)")
    check_ifname(ifname)
    if master is not None:
        host, port = parse_master(master)
        if node_rank > 0:
            wait_for_master(host, port, connect_timeout_s)
    return {**os.environ, **socket_env(ifname)}


# Starting and stopping process trees: `stoker train --nproc` (torchrun under this process) and
# the job engine (a job's command under its shim) both go through these.

def spawn(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None, stdout=None,
          end_with_parent: bool = False) -> subprocess.Popen:
    """Start `cmd` in its own session, so that a terminal's Ctrl-C or a signal to our process
    group reaches it only through us. `end_with_parent`: it gets SIGTERM if we die (a launcher's
    children); a job's process must outlive a scheduler that crashes, so it does not."""
    preexec = None
    if end_with_parent:
        from stoker.parallel.mesh import end_with_parent as preexec  # noqa: F811
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                            stdin=subprocess.DEVNULL if stdout else None, start_new_session=True,
                            preexec_fn=preexec)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def kill_tree(pid: int, keep_root: bool = False) -> None:
    """SIGKILL every process below `pid` (and `pid` unless keep_root)."""
    for p in ([] if keep_root else [pid]) + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (with its pid, it names one process for ever), or None
    when there is no such live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    return None if rest[0] in ("Z", "X") else rest[19]


def run_local(nproc: int, argv: list[str], env: dict[str, str] | None = None, **rendezvous) -> int:
    """Run `stoker ARGV` under torchrun with `nproc` processes on this host (one of several with
    `rendezvous`: see torchrun_command), and relay one stop request to the workers."""
    cmd = torchrun_command(nproc, argv, **rendezvous)
    # Killed with SIGKILL, we cannot relay anything: the kernel tells torchrun instead, which
    # stops its workers (and they end with it, see init_distributed).
    proc = spawn(cmd, env=env, end_with_parent=True)
    signals = []

    def relay(signum, frame):
        signals.append(signum)
        if len(signals) > 1:
            os.killpg(proc.pid, signal.SIGKILL)
            return
        # Signal the workers themselves: they checkpoint and exit 0, and torchrun then ends
        # cleanly too. A signal to torchrun would also reach them, but torchrun itself then
        # reports failure whatever the workers did.
        workers = children(proc.pid)
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        if not workers:
            proc.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, relay)
    return proc.wait()


def with_nproc(argv: list[str], nproc: int) -> list[str]:
    """`argv` with `--nproc=N` added where it runs `stoker train` without its own --nproc (a
    cluster job's processes per host)."""
    if argv[:2] == ["stoker", "train"] and not any(a.startswith("--nproc") for a in argv):
        return [*argv, f"--nproc={nproc}"]
    return list(argv)


def job_command(command: list[str], slots: int) -> list[str]:
    """The argv a job runs: `stoker ...` becomes this Python's `-m stoker ...` (no PATH needed),
    and `stoker train` gets `--nproc SLOTS` unless it names its own, which must match."""
    if command[0] != "stoker":
        return list(command)
    argv = list(command[1:])
    if argv[:1] == ["train"]:
        given = [a for a in argv if a == "--nproc" or a.startswith("--nproc=")]
        if not given and slots > 1:
            argv += [f"--nproc={slots}"]
        elif given:
            i = argv.index(given[0])
            value = given[0].split("=", 1)[1] if "=" in given[0] else (argv[i + 1] if i + 1 < len(argv) else "")
            if value != str(slots):
                raise ConfigError(f"command: `stoker train --nproc {value}` in a job of {slots} slot(s); "
                                  f"drop --nproc (the job's slots set it) or make them equal")
    return [sys.executable, "-m", "stoker", *argv]
