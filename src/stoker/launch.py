"""How processes are started: the torchrun command line for one host or many, and the checks
a host makes before it joins (the master reachable, the network interface present)."""

from __future__ import annotations

import os
import socket
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
