"""The run directory: what marks one as stoker's, and the lock that admits one writer at a time."""

from __future__ import annotations

import fcntl
import json
import math
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


# --- reading a run directory (the dashboard, and anyone who wants a run's summary) -----------

RUN_FILES = ("config.toml", "model.json", "metrics.jsonl", "layout.json", "loss.png", "tokenizer.json")
METRIC_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s")


_PARSED: dict[tuple, dict] = {}  # whole metrics files parsed: (path, inode, size, mtime) -> columns


def _lock_holders() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file a process on this machine holds an flock on."""
    held = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return held
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK":
            try:
                major, minor, ino = parts[5].split(":")
                held.add((int(major, 16), int(minor, 16), int(ino)))
            except ValueError:
                continue
    return held


class RunDir:
    """A run directory read as it is, without validating or changing anything: config, model,
    metrics, layout, checkpoints, adapters, and whether a process trains it now. Reads are
    tolerant: a file being written, torn or missing gives what can be read."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name

    def _json(self, file: str) -> dict | None:
        value = _read_json(self.path / file)
        return value if isinstance(value, dict) else None

    def config(self) -> dict:
        import tomllib

        try:
            return tomllib.loads((self.path / "config.toml").read_text())
        except (OSError, ValueError):
            return {}

    def model(self) -> dict | None:
        return self._json("model.json")

    def layout(self) -> dict | None:
        return self._json("layout.json")

    def metrics(self, offset: int = 0, inode: int | None = None) -> dict:
        """metrics.jsonl from byte `offset` on, as columns: `train` (step and METRIC_KEYS) and
        `val` (step, val_loss). Pass back the `offset` and `inode` returned to get only new lines;
        `reset` is true when the file was rewritten (a resume drops the steps it repeats) and
        everything was read again."""
        path = self.path / "metrics.jsonl"
        if offset == 0 and (st := _stat(path)) is not None and _file_key(path, st) in _PARSED:
            # a whole file read before and unchanged since is not parsed again
            return {**_PARSED[_file_key(path, st)], "reset": inode != st.st_ino}
        train: dict[str, list] = {k: [] for k in ("step", *METRIC_KEYS)}
        val: dict[str, list] = {"step": [], "val_loss": []}
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                reset = inode != st.st_ino or offset > st.st_size
                if reset:
                    offset = 0
                f.seek(offset)
                data = f.read()
        except OSError:
            return {"train": train, "val": val, "offset": 0, "inode": None, "reset": True}
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            if "val_loss" in rec:
                val["step"].append(rec["step"])
                val["val_loss"].append(_finite(rec["val_loss"]))
            elif "loss" in rec:
                for k in train:
                    train[k].append(rec["step"] if k == "step" else _finite(rec.get(k)))
        out = {"train": train, "val": val, "offset": offset + end, "inode": st.st_ino, "reset": reset}
        if offset == 0 and end == len(data):
            if len(_PARSED) >= 32:
                _PARSED.pop(next(iter(_PARSED)))
            _PARSED[_file_key(path, st)] = out
        return out

    def checkpoints(self) -> list[dict]:
        from stoker.train.checkpoint import list_checkpoints

        out = []
        for p in list_checkpoints(self.path):
            try:  # one being rotated away as we look is skipped
                stats = [f.stat() for f in p.iterdir() if f.is_file()]
            except OSError:
                continue
            out.append({"name": p.name, "step": int(p.name.split("_")[-1]), "bytes": sum(st.st_size for st in stats),
                        "time": max((st.st_mtime for st in stats), default=0.0)})
        return out

    def adapters(self) -> list[dict]:
        """The run's own adapter (`adapter/`, what a tuning run writes) and those under
        `adapters/` (what `stoker serve` serves on this run), from their adapter_config.json:
        folder, kind, rank or virtual tokens, tasks, size."""
        from stoker.tune.adapters import CONFIG, TASKS

        root = self.path / "adapters"
        dirs = [self.path / "adapter"] + (sorted(root.iterdir()) if root.is_dir() else [])
        out = []
        for d in dirs:
            cfg = _read_json(d / CONFIG)
            try:
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            except OSError:
                continue
            if not isinstance(cfg, dict):
                continue
            tasks = _read_json(d / TASKS)
            out.append({"name": d.relative_to(self.path).as_posix(), "kind": str(cfg.get("peft_type", "?")),
                        "rank": cfg.get("r"), "virtual_tokens": cfg.get("num_virtual_tokens"),
                        "tasks": [str(t) for t in tasks] if isinstance(tasks, list) else [],
                        "bytes": size})
        return out

    def state(self) -> str:
        """running (a process holds the run's lock), done (the last step logged is the
        configured last), stopped (it ended before), or new (nothing logged)."""
        return self._state(self.config(), self.metrics()["train"]["step"])

    def _state(self, cfg: dict, steps_logged: list[int]) -> str:
        st = _stat(self.path / LOCK)
        if st is not None and (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in _lock_holders():
            return "running"
        if not steps_logged:
            return "new"
        steps = cfg.get("train", {}).get("steps")
        return "done" if isinstance(steps, int) and steps_logged[-1] >= steps else "stopped"

    def summary(self) -> dict:
        """One row of the runs table."""
        cfg, model, layout = self.config(), self.model() or {}, self.layout() or {}
        m = self.metrics()
        train, val = m["train"], m["val"]
        steps = cfg.get("train", {})
        tokens = (train["step"][-1] * steps.get("batch_size", 0) * steps.get("seq_len", 0)) if train["step"] else 0
        updated = max((st.st_mtime for f in RUN_FILES if (st := _stat(self.path / f))), default=None)
        return {
            "name": self.name, "state": self._state(cfg, train["step"]), "updated": updated,
            "model": _describe_model(cfg, model), "params": _count(model),
            "layout": layout.get("layout"), "world": layout.get("world"),
            "method": cfg.get("tune", {}).get("method", "none"),
            "step": train["step"][-1] if train["step"] else 0, "steps": steps.get("steps"), "tokens": tokens,
            "loss": train["loss"][-1] if train["loss"] else None,
            "val_loss": val["val_loss"][-1] if val["val_loss"] else None,
            "mfu": _mean_tail(train["mfu"]), "tokens_per_s": _mean_tail(train["tokens_per_s"]),
            "checkpoints": len(self.checkpoints()), "adapters": len(self.adapters()),
        }


def _file_key(path: Path, st: os.stat_result) -> tuple:
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def _read_json(path: Path):
    """The JSON value in `path`, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _mean_tail(values: list, n: int = 20) -> float | None:
    tail = [v for v in values[-n:] if v is not None]
    return sum(tail) / len(tail) if tail else None


def _describe_model(cfg: dict, model: dict) -> str:
    preset = cfg.get("model", {}).get("preset", "")
    shape = f"{model.get('n_layer')} x {model.get('n_embd')}" if model else ""
    return " ".join(s for s in (preset, f"({shape})" if shape and preset else shape) if s) or "?"


def _count(model: dict) -> int | None:
    """Parameters from model.json's shape, without building the model."""
    if not model:
        return None
    try:
        from stoker.models.gpt import GPTConfig, count_params

        return count_params(GPTConfig(**model))
    except Exception:  # a model.json from another version: the count is optional
        return None


def find_runs(root: str | Path, depth: int = 3) -> list[RunDir]:
    """Run directories under `root` (itself included), `depth` levels down at most, named by
    their path relative to `root`; hidden folders, a run's own subfolders and links to anywhere
    outside `root` are not searched."""
    root = Path(root).resolve()
    found: list[RunDir] = []

    def walk(d: Path, level: int) -> None:
        if is_run_dir(d):
            found.append(RunDir(d, d.relative_to(root).as_posix() if d != root else d.name))
            return
        if level >= depth:
            return
        try:
            children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")
                              and c.resolve().is_relative_to(root))
        except OSError:
            return
        for c in children:
            walk(c, level + 1)

    walk(root, 0)
    return found
