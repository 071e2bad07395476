"""The run directory: what marks one as stoker's, and the lock that admits one writer at a time."""

from __future__ import annotations

import fcntl
import os
import socket
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING

from stoker.config import ConfigError

if TYPE_CHECKING:
    from stoker.parallel.mesh import DistInfo

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


VISIBLE_PREFIX = ".stoker-visible-"


def check_visible_to_all(out: Path, info: DistInfo) -> None:
    """Collective, on every rank once the run directory exists: with more than one host, rank 0
    writes a token file in `out` and every rank reads it back. A host that cannot see it would
    save its checkpoint shards where no other host finds them, so every rank raises the same
    ConfigError naming the hosts that cannot. One host: nothing to check, no collective."""
    if info.hosts <= 1:
        return
    import torch.distributed as dist

    from stoker.parallel.mesh import from_rank0

    token = None
    if info.is_main:
        token = f"{VISIBLE_PREFIX}{uuid.uuid4().hex}"
        try:
            (Path(out) / token).write_text(token)
        except OSError:
            token = None  # rank 0 sees its own directory; other checks report a failure to write there
    token = from_rank0(token)  # also the barrier: the file exists before anyone looks
    seen = token is not None and _sees(Path(out) / token, token)
    results: list = [None] * info.world
    dist.all_gather_object(results, (info.rank, socket.gethostname(), seen))
    if info.is_main and token is not None:
        (Path(out) / token).unlink(missing_ok=True)
    blind: dict[str, int] = {}
    for rank, host, ok in results:
        if not ok:
            blind.setdefault(host, rank)
    if blind:
        where = ", ".join(f"{h} (rank {r})" for h, r in blind.items())
        raise ConfigError(f"train.out_dir: {str(out)!r} is not visible from host(s) {where}: "
                          "checkpoints need storage every host sees (a shared file system)")


def _sees(path: Path, token: str, tries: int = 5) -> bool:
    # A network file system may show another host's new file a moment late.
    for i in range(tries):
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if i + 1 < tries:
            time.sleep(0.2)
    return False
