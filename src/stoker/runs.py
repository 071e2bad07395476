"""The run directory: what marks one as stoker's, and the lock that admits one writer at a time."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from stoker.config import ConfigError

LOCK = ".lock"
DEMO_MARK = ".stoker-demo"  # `stoker demo` may delete and rebuild a directory holding it
# Files and folders only a stoker run directory holds; a non-empty directory with none of
# them belongs to someone else, and training into it could overwrite their files.
MARKERS = ("config.toml", "model.json", "checkpoints", "metrics.jsonl", LOCK, DEMO_MARK)


def is_run_dir(path: str | Path) -> bool:
    return any((Path(path) / m).exists() for m in MARKERS)


def open_run_dir(out: str | Path) -> IO[str]:
    """Create `out` if needed and lock it for writing; keep the returned file open for as long
    as the run writes (the lock goes with the process, so a crash or kill -9 releases it).
    ConfigError naming the holder if another process writes there, or if `out` is unusable."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if any(out.iterdir()) and not is_run_dir(out):
            raise ConfigError(f"train.out_dir: {str(out)!r} holds files that are not a stoker run; "
                              "choose a new or empty directory")
        f = open(out / LOCK, "a+")
    except OSError as e:
        raise ConfigError(f"train.out_dir: cannot write to {str(out)!r} ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"train.out_dir: {str(out)!r} is being written by another stoker train ({holder}); "
                          "wait for it to finish, stop it, or choose another train.out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f
