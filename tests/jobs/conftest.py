import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.launch import kill_tree


class Daemon:
    """A scheduler daemon for one jobs home, started and killed by the test."""

    def __init__(self, home: Path):
        self.home = home
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict | None = None) -> "Daemon":
        log = open(self.home / "daemon.log", "ab")
        before = (self.home / "daemon.log").stat().st_size
        self.proc = subprocess.Popen([sys.executable, "-m", "stoker", "jobs", "--home", str(self.home), "daemon",
                                      "--poll", "0.1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        deadline = time.time() + 30
        while b"scheduler started" not in (self.home / "daemon.log").read_bytes()[before:]:
            assert self.proc.poll() is None and time.time() < deadline, (self.home / "daemon.log").read_text()
            time.sleep(0.05)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill9()
        from stoker.jobs.local import DaemonLock

        pid = DaemonLock(self.home).holder()  # one the CLI started on demand
        if pid and pid > 0:
            os.kill(pid, signal.SIGKILL)
        # Every job process of this home (their shims name it on their command line).
        marker = str(self.home).encode()
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != os.getpid():
                try:
                    if b"stoker.jobs.shim" in (p / "cmdline").read_bytes() and marker in (p / "cmdline").read_bytes():
                        kill_tree(int(p.name))
                except OSError:
                    pass


@pytest.fixture
def jobs_home(tmp_path):
    home = tmp_path / "jobs"
    home.mkdir()
    return home


@pytest.fixture
def daemon(jobs_home):
    d = Daemon(jobs_home)
    yield d
    d.cleanup()

