"""Training across hosts: the launcher's checks, and real multi-host runs on emulated hosts
(network namespaces joined by a bridge) compared with one process."""

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LAYOUT_ATOL, TINY, assert_curves_close, losses, train_here
from stoker.config import ConfigError, ParallelConfig
from stoker.parallel.hosts import EmulatedHosts, parse_rate
from stoker.parallel.mesh import DistInfo, warn_cross_host_shards

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

STEPS = 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_node_with_unreachable_master_fails_in_bounded_time(tmp_path):
    port = _closed_port()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "stoker", "train", *TINY, f"--train.out_dir={tmp_path / 'run'}",
                        "--nnodes", "2", "--node-rank", "1", "--master", f"127.0.0.1:{port}",
                        "--parallel.connect_timeout_s=2"], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 15  # 2 s of retries plus the interpreter's start
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "parallel.connect_timeout_s" in lines[0], lines


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "--master: needed"),
    (["--nnodes", "2", "--node-rank", "2", "--master", "h:1"], "--node-rank: must be in [0, 2)"),
    (["--nnodes", "2", "--master", "10.0.0.1"], "--master: '10.0.0.1' is not HOST:PORT"),
    (["--nnodes", "2", "--master", "h:1", "--parallel.dp_replicate=4"], "does not match --nnodes 2 x --nproc 1 = 2"),
    (["--nnodes", "2", "--master", "h:1", "--parallel.ifname=stk-no-such"], "no network interface 'stk-no-such'"),
])
def test_launch_arguments_are_checked_in_one_line(tmp_path, args, message):
    r = train_here(tmp_path / "data", tmp_path / "run", *args, check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_shard_groups_crossing_hosts_are_warned_about(capsys):
    info = DistInfo(rank=0, world=4, local_rank=0, local_world=2, device=None)
    assert info.hosts == 2 and [info.host_of(r) for r in range(4)] == [0, 0, 1, 1]
    warn_cross_host_shards(ParallelConfig(dp_shard=4), info)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cross hosts" in err and "parallel.dp_shard=2" in err, err
    warn_cross_host_shards(ParallelConfig(dp_replicate=2, dp_shard=2), info)  # HSDP: shards inside a host
    assert capsys.readouterr().err == ""


def test_rate_strings():
    assert parse_rate("100mbit") == 100_000_000 and parse_rate("1Gbit") == 10**9 and parse_rate("2.5kbit") == 2500
    for bad in ("100", "fast", "10mb", "-1mbit", "0gbit"):
        with pytest.raises(ConfigError, match="rate"):
            parse_rate(bad)


def test_hosts_without_root_is_one_line(monkeypatch):
    from stoker.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["hosts", "--hosts", "2", "--", "train"])
    assert code == 2
    assert err.getvalue() == "stoker hosts: needs root to create network namespaces (run as root)\n"


def test_run_directory_must_be_visible_from_every_host(tmp_path, monkeypatch):
    """Rank 0 of two hosts, the collectives played by a stand-in for rank 1 whose storage is
    its own: the same path names another directory there. (Two real processes cost ~15 s of
    imports here; the collectives are torch's, the decisions are what is tested.)"""
    import torch.distributed as dist

    import stoker.parallel.mesh as mesh
    from stoker.runs import check_visible_to_all

    shared, elsewhere = tmp_path / "run", tmp_path / "host1-view"
    shared.mkdir()
    elsewhere.mkdir()
    sent = []
    monkeypatch.setattr(mesh, "from_rank0", lambda v: sent.append(v) or v)

    def gather(results, mine, view=None):  # rank 1 looks for the token in its own view
        results[:] = [mine, (1, "hostB", (view / sent[-1]).exists())]

    info = DistInfo(rank=0, world=2, local_rank=0, local_world=1, device=None)
    monkeypatch.setattr(dist, "all_gather_object", lambda r, m: gather(r, m, shared))
    check_visible_to_all(shared, info)  # rank 1 sees the same directory
    monkeypatch.setattr(dist, "all_gather_object", lambda r, m: gather(r, m, elsewhere))
    with pytest.raises(ConfigError) as e:
        check_visible_to_all(shared, info)
    assert str(e.value) == (f"train.out_dir: {str(shared)!r} is not visible from host(s) hostB (rank 1): "
                            "checkpoints need storage every host sees (a shared file system)")
    assert len(sent) == 2 and list(shared.iterdir()) == []  # a token per check, removed after it
    check_visible_to_all(shared, DistInfo(0, 2, 0, 2, None))  # one host: no check, no collective
    assert len(sent) == 2


def _leftovers(prefix: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    names += [line.split(":")[1].strip().split("@")[0]
              for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()]
    names += [p.name for p in Path("/etc/netns").glob("*")] if Path("/etc/netns").exists() else []
    return [n for n in names if n.startswith(prefix)]


@needs_root
def test_links_are_rate_limited_and_everything_is_removed():
    recv = ("import socket\ns=socket.socket();s.bind(('0.0.0.0',5555));s.listen();c,_=s.accept()\n"
            "while c.recv(1<<16): pass\n")
    send = ("import socket,time\nfor _ in range(200):\n try: s=socket.create_connection(('10.77.0.1',5555));break\n"
            " except OSError: time.sleep(0.02)\nt=time.monotonic();s.sendall(b'x'*5_000_000)\n"
            "s.shutdown(socket.SHUT_WR);s.recv(1);print(time.monotonic()-t)\n")
    with EmulatedHosts(2, "100mbit") as hosts:
        prefix = hosts.prefix
        assert len(_leftovers(prefix)) >= 5  # 2 namespaces, the bridge, 2 bridge ports
        r = hosts.run_each([[sys.executable, "-c", recv], [sys.executable, "-c", send]], timeout=60)
    assert r.returncodes == [0, 0], [h.stderr for h in r.hosts]
    # 5 MB at 100 Mbit/s is 0.4 s: tbf can only make it slower (headers, TCP), never faster.
    assert float(r.hosts[1].stdout) >= 0.35, r.hosts[1].stdout
    assert r.hosts[1].tx_bytes >= 5_000_000 and r.hosts[0].rx_bytes >= 5_000_000
    assert _leftovers(prefix) == []


@needs_root
def test_a_crashed_host_stops_the_others_and_is_cleaned_up():
    with pytest.raises(RuntimeError, match="after the run"):
        with EmulatedHosts(2, pin=False) as hosts:
            prefix = hosts.prefix
            t0 = time.monotonic()
            r = hosts.run_each([["sleep", "600"], ["sh", "-c", "exit 3"]], timeout=120, grace_s=1)
            assert time.monotonic() - t0 < 30
            assert r.returncodes[1] == 3 and r.returncodes[0] != 0 and r.worst == 3
            raise RuntimeError("after the run")  # an error in the caller's code: still cleaned up
    assert _leftovers(prefix) == []


@needs_root
def test_clean_removes_what_a_killed_run_left_and_nothing_of_a_live_one(tmp_path):
    """SIGKILL leaves no chance to clean up: `stoker hosts --clean` removes what is named after
    a process that is gone, and leaves a run in progress alone."""
    made = tmp_path / "prefix"
    script = ("import sys, time\nfrom stoker.parallel.hosts import EmulatedHosts\n"
              "h = EmulatedHosts(2, '100mbit'); h.start()\n"
              f"open({str(made)!r}, 'w').write(h.prefix)\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if made.exists() and made.read_text():
                break
            time.sleep(0.05)
        dead = made.read_text()
        p.kill()
        p.wait()
        with EmulatedHosts(2) as live:
            assert len(_leftovers(dead)) >= 5
            r = subprocess.run([sys.executable, "-m", "stoker", "hosts", "--clean"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert f"namespace {dead}h0" in r.stdout and live.prefix not in r.stdout, r.stdout
            assert _leftovers(dead) == []
            assert len(_leftovers(live.prefix)) >= 5  # untouched: its process runs
    finally:
        p.kill()
        subprocess.run([sys.executable, "-m", "stoker", "hosts", "--clean"], capture_output=True)


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "single"
    train_here(small_data, out, f"--train.steps={STEPS}")
    return out


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (1, ["--parallel.dp_replicate=2"]),  # DDP: one replica per host
    (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),  # HSDP: shard inside a host, replicate across
], ids=["ddp_2hosts_x1", "hsdp_2hosts_x2"])
def test_layout_across_emulated_hosts_matches_one_process(small_data, tmp_path, reference, nproc, layout):
    out = tmp_path / "run"
    # Unpinned: on 2 cores shared with other work, a host held to one busy core only runs slower.
    with EmulatedHosts(2, pin=False) as hosts:
        prefix = hosts.prefix
        r = hosts.run(["train", *TINY, f"--data.dir={small_data}", f"--train.out_dir={out}",
                       f"--train.steps={STEPS}", *layout], nproc_per_host=nproc, timeout=240)
    assert r.returncodes == [0, 0], [h.stderr[-3000:] for h in r.hosts]
    # The gradients went over the emulated links, both ways, not through a shortcut.
    assert all(h.tx_bytes > 100_000 and h.rx_bytes > 100_000 for h in r.hosts), r.hosts
    # fp32 on both sides: the layouts' tolerance (conftest.LAYOUT_ATOL: only summation order
    # differs, ~1e-7 relative per operation, far below one step's loss change).
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert_curves_close(losses(out), losses(reference), range(1, STEPS + 1), LAYOUT_ATOL)
    assert _leftovers(prefix) == []
