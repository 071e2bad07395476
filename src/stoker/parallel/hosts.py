"""Emulated hosts on one machine: K network namespaces joined by a bridge, each behind a veth
link whose egress `tc tbf` limits to an Ethernet-like rate, each running its own `stoker
train --nnodes K --node-rank i`. Multi-host code paths (static rendezvous, gloo over a named
interface, bytes on the wire, slow links) then run for real without a cluster. Needs root.

Everything made here carries a name starting with this object's prefix (`stk<pid><letter>`)
and is recorded when made; clean-up removes exactly what was recorded, whatever ends the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stoker.config import ConfigError

RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_RATE = re.compile(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", re.IGNORECASE)
MAX_HOSTS = 254  # one /24 for the addresses; interface names stay within 15 characters
MASTER_PORT = 29500  # free in a fresh namespace, whatever the machine runs
TBF_LATENCY = "100ms"  # queue a sender may fill before drops: deep enough for TCP to keep the rate
NETNS_ETC = Path("/etc/netns")  # ip netns exec's per-namespace /etc files
_instances = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def parse_rate(rate: str, name: str = "rate") -> int:
    """Bits per second from '100mbit', '1gbit', '500kbit' (tc's units: 1 mbit = 10^6 bit/s)."""
    m = _RATE.fullmatch(rate.strip()) if isinstance(rate, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{name}: {rate!r} is not a link rate; write a number and kbit, mbit or gbit "
                          "(e.g. 100mbit, 1gbit)")
    return int(float(m.group(1)) * RATE_UNITS[m.group(2).lower()])


@dataclass
class HostRun:
    """One host's command: its exit code (negative: killed by that signal), output, and the bytes
    its link carried while the command ran (sent: host -> bridge, received: bridge -> host)."""
    host: int
    returncode: int
    stdout: str
    stderr: str
    tx_bytes: int
    rx_bytes: int
    stopped: bool = False  # ended by us (timeout, Ctrl-C, another host's failure), not on its own


@dataclass
class HostsResult:
    hosts: list[HostRun]
    seconds: float  # wall time from the first start to the last exit
    timed_out: bool = False

    @property
    def returncodes(self) -> list[int]:
        return [h.returncode for h in self.hosts]

    @property
    def worst(self) -> int:
        """The exit code to report for all of them: 0 if all succeeded, else the largest (a
        death by signal N counts as 128 + N, as a shell reports it) among the hosts that ended
        on their own, which say what went wrong; the ones stopped for it only echo it."""
        own = [h.returncode for h in self.hosts if not h.stopped] or self.returncodes
        fails = [c if c >= 0 else 128 - c for c in own if c != 0]
        return max(fails, default=0 if all(c == 0 for c in self.returncodes) else 1)

    @property
    def ok(self) -> bool:
        return self.worst == 0 and not self.timed_out


@dataclass
class _Proc:
    host: int
    popen: subprocess.Popen
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    stopped: bool = False


def _end_with_parent() -> None:
    # Runs in the child between fork and exec: no imports, no locks, only the system call.
    # PR_SET_PDEATHSIG survives exec (ip netns exec and taskset both exec), so a host's
    # command ends with us even when we are killed with SIGKILL and cannot clean up.
    _libc.prctl(1, signal.SIGTERM)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _term_as_interrupt(signum, frame):
    raise KeyboardInterrupt


_STALE = re.compile(r"^stk(\d+)[a-z](?:br|b\d+|h\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale() -> list[str]:
    """Remove what emulated hosts left behind when their process was killed outright (SIGKILL,
    a crash of the machine's own tools): namespaces, bridges and links named `stk<pid>...`,
    their /etc/netns files and iptables rules, only where process <pid> no longer runs, so a
    run in progress is never touched. Returns what was removed. Needs root."""
    if os.geteuid() != 0:
        raise ConfigError("needs root to remove network namespaces (run as root)")

    def stale(name: str) -> bool:
        m = _STALE.match(name)
        return bool(m) and not _alive(int(m.group(1)))

    removed = []
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    links = [ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ln.count(":") >= 2]
    for name in sorted(n for n in links if stale(n)):
        if subprocess.run(["ip", "link", "del", name], capture_output=True).returncode == 0:
            removed.append(f"link {name}")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in sorted(ln.split()[0] for ln in out.splitlines() if ln.split() and stale(ln.split()[0])):
        if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
            removed.append(f"namespace {name}")
        d = NETNS_ETC / name
        if (d / "hosts").is_file():
            (d / "hosts").unlink()
        with contextlib.suppress(OSError):
            d.rmdir()
    if shutil.which("iptables"):
        out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
        for ln in out.splitlines():
            words = ln.split()
            if words[:1] == ["-A"] and "-i" in words and stale(words[words.index("-i") + 1]):
                if subprocess.run(["iptables", "-D", *words[1:]], capture_output=True).returncode == 0:
                    removed.append(f"iptables rule {' '.join(words[1:])}")
    return removed


class EmulatedHosts:
    """K emulated hosts (a context manager): host i is network namespace `namespace(i)` with
    interface `ifname(i)` at `addr(i)` (10.77.0.(i+1)/24), its link limited to `rate` each way
    (None: unlimited), its commands pinned to its own cores unless `pin` is False."""

    subnet = "10.77.0"

    def __init__(self, n_hosts: int, rate: str | None = None, pin: bool = True):
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ConfigError(f"hosts: must be 1 .. {MAX_HOSTS}, got {n_hosts}")
        self.n_hosts = n_hosts
        self.rate_bits = parse_rate(rate) if rate is not None else None
        self.pin = pin
        self.prefix = f"stk{os.getpid()}{'abcdefghijklmnopqrstuvwxyz'[next(_instances) % 26]}"
        self.bridge = f"{self.prefix}br"
        self._made: list[tuple[str, ...]] = []  # what to undo, in the order it was made
        self._procs: list[_Proc] = []
        self._cpus = sorted(os.sched_getaffinity(0))

    # -- names ---------------------------------------------------------------------------------

    def namespace(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def ifname(self, i: int) -> str:
        """The interface inside host i (what parallel.ifname names there)."""
        return f"{self.prefix}h{i}"

    def _bridge_port(self, i: int) -> str:
        return f"{self.prefix}b{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def cores(self, i: int, nproc: int = 1) -> list[int]:
        """The CPUs host i runs on: `nproc` of them, hosts side by side, wrapping around."""
        return sorted({self._cpus[(i * nproc + j) % len(self._cpus)] for j in range(nproc)})

    # -- set-up and clean-up ---------------------------------------------------------------------

    def __enter__(self) -> EmulatedHosts:
        # A SIGTERM to this process unwinds like Ctrl-C, through close(): a killed benchmark
        # must not leave namespaces behind. (Only the main thread may set handlers.)
        self._old_term = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self._old_term = signal.signal(signal.SIGTERM, _term_as_interrupt)
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ConfigError("needs root to create network namespaces (run as root)")
        for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("taskset", "util-linux")):
            if shutil.which(tool) is None:
                raise ConfigError(f"needs `{tool}` ({package}) on the PATH")
        try:
            self._build()
            self._check_links()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self._sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        self._sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.n_hosts):
            ns, inner, port = self.namespace(i), self.ifname(i), self._bridge_port(i)
            self._sh("ip", "netns", "add", ns)
            self._made.append(("netns", ns))
            self._sh("ip", "link", "add", inner, "type", "veth", "peer", "name", port)
            self._made.append(("link", port))  # deleting either end deletes the pair
            self._sh("ip", "link", "set", inner, "netns", ns)
            self._sh("ip", "link", "set", port, "master", self.bridge)
            self._sh("ip", "link", "set", port, "up")
            self._sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", inner)
            self._sh("ip", "-n", ns, "link", "set", inner, "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")  # torchrun's own local traffic
            self._hosts_file(i)
            if self.rate_bits is not None:
                # Egress on both ends: the host side limits what it sends, the bridge side what
                # it receives, so each direction of the link has the rate, as on a full-duplex NIC.
                self._sh("tc", "-n", ns, "qdisc", "add", "dev", inner, "root", *self._tbf())
                self._sh("tc", "qdisc", "add", "dev", port, "root", *self._tbf())

    def _hosts_file(self, i: int) -> None:
        """/etc/netns/<namespace>/hosts, which `ip netns exec` mounts over /etc/hosts there: the
        hosts' names for their addresses, so that a peer's address has a name to show (c10d
        looks one up for every connection and warns when there is none). Cosmetic: skipped
        where /etc cannot be written."""
        top, d = NETNS_ETC, NETNS_ETC / self.namespace(i)
        # IPv4 and its IPv6-mapped form: c10d listens on both and sees peers in either.
        names = "".join(f"{mapped}{self.addr(j)} {self.namespace(j)}\n"
                        for j in range(self.n_hosts) for mapped in ("", "::ffff:"))
        try:
            if not top.exists():
                top.mkdir(parents=True)
                self._made.append(("dir", str(top)))
            d.mkdir()
            self._made.append(("dir", str(d)))
            (d / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            self._made.append(("file", str(d / "hosts")))
        except OSError:
            pass

    def _tbf(self) -> list[str]:
        # The bucket must hold the largest packet tbf sees: veth hands it 64 KiB segmentation-
        # offload packets. More than that (4 ms of traffic at high rates) keeps a timer tick's
        # late wake-up from costing rate.
        burst = max(64 * 1024 + 1514, int(self.rate_bits / 8 * 0.004))
        return ["tbf", "rate", f"{self.rate_bits}bit", "burst", str(burst), "latency", TBF_LATENCY]

    def _check_links(self) -> None:
        """Every host reaches host 0. With br_netfilter loaded, bridged packets go through
        iptables' FORWARD chain, which a firewall (Docker's, for one) may drop: then a rule of
        our own lets this bridge's traffic through, removed again at clean-up."""
        if self.n_hosts == 1 or self._probe():
            return
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        filtered = nf.exists() and nf.read_text().strip() == "1"
        if filtered and shutil.which("iptables"):
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            self._sh("iptables", "-I", *rule)
            self._made.append(("iptables", *rule))
            if self._probe():
                return
        if filtered:
            raise ConfigError("the emulated hosts cannot reach each other: br_netfilter sends bridged packets "
                              "through iptables (net.bridge.bridge-nf-call-iptables=1) and they are dropped there; "
                              "run `sysctl -w net.bridge.bridge-nf-call-iptables=0` or accept bridged traffic in "
                              "the FORWARD chain")
        raise ConfigError(f"the emulated hosts cannot reach each other over bridge {self.bridge} "
                          "(a TCP connection from each host to host 0 failed)")

    def _probe(self, timeout_s: float = 5.0) -> bool:
        listen = ("import socket,sys\n"
                  f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                  f"s.bind(('{self.addr(0)}',{MASTER_PORT}));s.listen(64);s.settimeout({timeout_s})\n"
                  "print('ready',flush=True)\n"
                  f"for _ in range({self.n_hosts - 1}): s.accept()[0].close()\n")
        connect = ("import socket,time\n"
                   f"end=time.monotonic()+{timeout_s}\n"
                   "while True:\n"
                   f" try: socket.create_connection(('{self.addr(0)}',{MASTER_PORT}),timeout=1).close(); break\n"
                   " except OSError:\n"
                   "  if time.monotonic()>end: raise\n"
                   "  time.sleep(0.05)\n")
        server = subprocess.Popen(["ip", "netns", "exec", self.namespace(0), sys.executable, "-c", listen],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        clients: list[subprocess.Popen] = []
        try:
            server.stdout.readline()  # listening (or dead: then the connections fail)
            clients = [subprocess.Popen(["ip", "netns", "exec", self.namespace(i), sys.executable, "-c", connect],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for i in range(1, self.n_hosts)]
            ok = all(c.wait(timeout=timeout_s + 5) == 0 for c in clients)
            return ok and server.wait(timeout=timeout_s + 5) == 0
        finally:
            for p in [server, *clients]:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def close(self) -> None:
        """Stop whatever still runs and remove what was made (last made, first removed).
        Safe to call again; a failure to remove one thing does not stop the others."""
        for p in self._procs:
            _kill_tree(p.popen.pid)
            p.popen.wait()
        self._procs = []
        left = []
        while self._made:
            kind, *what = self._made.pop()
            if kind in ("file", "dir"):
                try:
                    Path(what[0]).unlink() if kind == "file" else Path(what[0]).rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno == errno.ENOTEMPTY and Path(what[0]) == NETNS_ETC:
                        continue  # another run's namespaces use it now: leave it
                    left.append(f"{what[0]}: {e.strerror}")
                continue
            cmd = {"link": ["ip", "link", "del", *what], "netns": ["ip", "netns", "del", *what],
                   "iptables": ["iptables", "-D", *what]}[kind]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 and "Cannot find" not in r.stderr and "No such" not in r.stderr:
                left.append(f"{' '.join(cmd)}: {r.stderr.strip()}")
        if left:
            print(f"stoker hosts: warning: could not remove: {'; '.join(left)}", file=sys.stderr)

    def _sh(self, *cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[0]
            raise ConfigError(f"`{' '.join(cmd)}` failed: {why}")

    # -- running commands ------------------------------------------------------------------------

    def _wrap(self, i: int, argv: list[str], nproc: int = 1) -> list[str]:
        pin = ["taskset", "-c", ",".join(map(str, self.cores(i, nproc)))] if self.pin else []
        return ["ip", "netns", "exec", self.namespace(i), *pin, *argv]

    @staticmethod
    def _env() -> dict[str, str]:
        # One thread per process, as on the cores it is pinned to; output line by line so that
        # echoed lines from different hosts interleave whole.
        return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def exec(self, i: int, argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run `argv` in host i (pinned like its stoker processes) and wait for it."""
        self._check_host(i)
        return subprocess.run(self._wrap(i, argv), capture_output=True, text=True, timeout=timeout,
                              env=self._env(), preexec_fn=_end_with_parent)

    def _check_host(self, i: int) -> None:
        if not self._made:
            raise RuntimeError("EmulatedHosts: use it as a context manager (or call start()) first")
        if not 0 <= i < self.n_hosts:
            raise IndexError(f"host {i} of {self.n_hosts}")

    def link_bytes(self, i: int) -> tuple[int, int]:
        """(sent, received) bytes of host i's link so far. Read on the bridge side, in this
        namespace: what the bridge receives the host sent."""
        stats = Path("/sys/class/net") / self._bridge_port(i) / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def run_each(self, argvs: list[list[str]], timeout: float = 600, echo: bool = False, nproc: int = 1,
                 grace_s: float = 10.0) -> HostsResult:
        """Run argvs[i] in host i, all at once, and wait for all of them (at most `timeout` s).
        When one fails, the others get `grace_s` to end on their own (they usually notice a lost
        peer), then are stopped. `echo`: copy their output here as it comes, each line
        prefixed with its host."""
        if len(argvs) != self.n_hosts:
            raise ValueError(f"run_each: {len(argvs)} commands for {self.n_hosts} hosts")
        self._check_host(0)
        before = [self.link_bytes(i) for i in range(self.n_hosts)]
        t0 = time.monotonic()
        for i, argv in enumerate(argvs):
            popen = subprocess.Popen(self._wrap(i, argv, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=self._env(), start_new_session=True, preexec_fn=_end_with_parent)
            self._procs.append(_Proc(i, popen))
        # Readers start after every fork: a fork while other threads run could copy a held lock.
        readers = [threading.Thread(target=self._read, args=(p, s, echo), daemon=True)
                   for p in self._procs for s in ("out", "err")]
        for r in readers:
            r.start()
        timed_out = self._wait(t0 + timeout, grace_s)
        for r in readers:
            r.join(timeout=5)
        seconds = time.monotonic() - t0
        after = [self.link_bytes(i) for i in range(self.n_hosts)]
        runs = [HostRun(p.host, p.popen.returncode, "".join(p.out), "".join(p.err),
                        after[p.host][0] - before[p.host][0], after[p.host][1] - before[p.host][1], p.stopped)
                for p in self._procs]
        self._procs = []
        return HostsResult(runs, seconds, timed_out)

    def _read(self, p: _Proc, stream: str, echo: bool) -> None:
        src = p.popen.stdout if stream == "out" else p.popen.stderr
        dst, sink = (p.out, sys.stdout) if stream == "out" else (p.err, sys.stderr)
        for raw in iter(src.readline, b""):
            line = raw.decode(errors="replace")
            dst.append(line)
            if echo:
                sink.write(f"[h{p.host}] {line}" if line.endswith("\n") else f"[h{p.host}] {line}\n")
                sink.flush()

    def _wait(self, deadline: float, grace_s: float) -> bool:
        """Wait for every process; True if the deadline stopped them. Ctrl-C (KeyboardInterrupt)
        asks each host's stoker to stop as SIGTERM does (checkpoint, exit), then re-raises."""
        failed_at = None
        try:
            while any(p.popen.poll() is None for p in self._procs):
                now = time.monotonic()
                if now > deadline:
                    self._stop_all()
                    return True
                if failed_at is None and any(p.popen.poll() not in (None, 0) for p in self._procs):
                    failed_at = now
                if failed_at is not None and now - failed_at > grace_s:
                    self._stop_all()
                    break
                time.sleep(0.05)
        except KeyboardInterrupt:
            self._stop_all(patience=30)
            raise
        return False

    def _stop_all(self, patience: float = 5.0) -> None:
        for p in self._procs:
            p.stopped = p.popen.poll() is None
        running = [p.popen for p in self._procs if p.stopped]
        for p in running:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + patience
        try:
            while time.monotonic() < end and any(p.poll() is None for p in running):
                time.sleep(0.05)
        finally:
            for p in running:
                if p.poll() is None:
                    _kill_tree(p.pid)
                p.wait()

    def stoker_argv(self, i: int, train_args: list[str], nproc_per_host: int = 1) -> list[str]:
        """The `stoker train` command host i runs: its rank among the hosts, host 0 as master,
        its own interface for gloo/NCCL."""
        return [sys.executable, "-m", "stoker", "train", "--nnodes", str(self.n_hosts), "--node-rank", str(i),
                "--master", f"{self.addr(0)}:{MASTER_PORT}", "--nproc", str(nproc_per_host),
                f"--parallel.ifname={self.ifname(i)}", *train_args]

    def run(self, stoker_args: list[str], nproc_per_host: int = 1, timeout: float = 600,
            echo: bool = False) -> HostsResult:
        """`stoker train ARGS` across the hosts (stoker_args = ["train", ARGS...]): host i runs it
        as node i of n_hosts with `nproc_per_host` processes."""
        if stoker_args[:1] != ["train"]:
            raise ConfigError("stoker_args: runs `stoker train`: give ['train', ARGS...]")
        taken = [a for a in stoker_args[1:] if a.split("=")[0] in ("--nnodes", "--node-rank", "--master", "--nproc")]
        if taken:
            raise ConfigError(f"stoker_args: {taken[0].split('=')[0]} is set for each host here "
                              "(the processes per host: nproc_per_host)")
        if nproc_per_host < 1:
            raise ConfigError(f"nproc_per_host: must be >= 1, got {nproc_per_host}")
        argvs = [self.stoker_argv(i, stoker_args[1:], nproc_per_host) for i in range(self.n_hosts)]
        return self.run_each(argvs, timeout=timeout, echo=echo, nproc=nproc_per_host)
