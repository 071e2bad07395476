"""Distributed checkpoints (torch.distributed.checkpoint) that reshard across layouts.

Layout of one checkpoint, `<out_dir>/checkpoints/step_XXXXXXXX/`:
  DCP files        model and optimizer state, keyed by clean module paths (no wrapper
                   prefixes), the optimizer's flattened to one entry per parameter, so a
                   checkpoint written under one layout (N processes, FSDP, TP, pipeline
                   stages) loads under any other
  trainer.json     step, data-loader position, schedule, every rank's RNG states
  rank_*.safetensors  state one rank alone holds (DiLoCo replicas, PowerSGD error feedback)
It is written under `.tmp_step_XXXXXXXX` and renamed when complete, so a crash mid-write
never leaves a directory that looks finished.

What loading trusts. A checkpoint directory may come from elsewhere, so reading one never runs
code: DCP's `.metadata` (a pickle) is read by an unpickler that admits only DCP's own metadata
classes, torch dtypes and sizes and plain values; the optimizer's plain values go through
`torch.load(weights_only=True)`, as the tensors do. trainer.json is JSON. Each file's size and
SHA-256 are recorded in trainer.json when saving and checked before loading: a damaged
checkpoint is named in a one-line warning and the previous complete one is used.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from stoker.errors import RunError
from stoker.parallel.mesh import from_rank0

# DCP warns on every single-process save/load that it assumes a single process: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


class CheckpointDamaged(Exception):
    """A checkpoint that cannot be loaded as written; the message names the file."""


# Everything a DCP `.metadata` pickle of torch 2.x refers to. Anything else (os.system,
# builtins.eval, ...) is refused: the file is then not a checkpoint of ours.
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not checkpoint metadata")


def read_metadata(path: str | Path) -> Metadata:
    """DCP's `.metadata` file, read without running code; CheckpointDamaged if it is not one."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            md = _MetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointDamaged(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # any malformed pickle: truncated, garbage, foreign classes
        raise CheckpointDamaged(f"{path}: not DCP metadata ({e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointDamaged(f"{path}: not DCP metadata (holds a {type(md).__name__})")
    return md


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # DCP's own planner unpickles these with weights_only=False. Load them with
        # weights_only=True (plain values: lr, betas, flags) and hand it a re-serialised copy,
        # so nothing from the file is ever unpickled unrestricted.
        obj = torch.load(value, weights_only=True)
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _manifest(ckpt: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file DCP wrote (trainer.json is written after and holds this)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != "trainer.json"}


def verify_checkpoint(ckpt: str | Path) -> dict:
    """trainer.json of a checkpoint whose files are whole and unchanged; CheckpointDamaged otherwise."""
    ckpt = Path(ckpt)
    tj = ckpt / "trainer.json"
    try:
        state = json.loads(tj.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{tj}: unreadable ({e})") from None
    m = STEP_DIR.match(ckpt.name)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("rng"), list)
            and state["rng"] and isinstance(state.get("loader"), dict) and (m is None or int(m[1]) == state["step"])):
        raise CheckpointDamaged(f"{tj}: not a trainer state of step {m[1] if m else '?'} "
                                "(needs integer step, rng list, loader table)")
    files = state.get("files")
    if isinstance(files, dict):
        for name, rec in files.items():
            p = ckpt / name
            if not p.is_file():
                raise CheckpointDamaged(f"{p}: missing")
            if p.stat().st_size != rec.get("bytes"):
                raise CheckpointDamaged(f"{p}: {p.stat().st_size} bytes, {rec.get('bytes')} when written (truncated?)")
            if _sha256(p) != rec.get("sha256"):
                raise CheckpointDamaged(f"{p}: contents changed since written (checksum mismatch)")
    md = read_metadata(ckpt / ".metadata")
    # Checkpoints written before checksums were recorded still get a structural check.
    ends: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = str(getattr(info, "relative_path", ""))
        ends[rel] = max(ends.get(rel, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
    for rel, end in ends.items():
        p = ckpt / rel
        if Path(rel).name != rel or not p.is_file():
            raise CheckpointDamaged(f"{p}: missing")
        if p.stat().st_size < end:
            raise CheckpointDamaged(f"{p}: {p.stat().st_size} bytes, its metadata needs {end} (truncated)")
    return state


def _warn(msg: str) -> None:
    print(f"stoker: warning: {msg}", file=sys.stderr, flush=True)


def find_checkpoint(out_dir: str | Path, set_aside: bool = False,
                    warn: Callable[[str], None] = _warn) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, and its trainer state; damaged newer ones are named
    in a warning (and with set_aside, renamed `damaged_step_*` so that no later save or
    keep_last mistakes them for the newest). Collective under torch.distributed: rank 0
    checks, the others take its answer."""
    found = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        for ckpt in reversed(list_checkpoints(out_dir)):
            try:
                found = (str(ckpt), verify_checkpoint(ckpt))
                break
            except CheckpointDamaged as e:
                note = f"checkpoint {ckpt.name} is damaged: {e}"
                if set_aside:
                    dest = ckpt.with_name("damaged_" + ckpt.name)
                    ckpt.rename(dest)
                    note += f"; moved to {dest.name}"
                warn(note + "; trying the previous one")
    found = from_rank0(found)
    return (Path(found[0]), found[1]) if found is not None else None


def remove_partial_saves(out_dir: str | Path) -> list[Path]:
    """Delete `.tmp_step_*` directories a crash left mid-save (only the run's writer may call it)."""
    root = checkpoint_dir(out_dir)
    gone = [p for p in root.glob(".tmp_step_*") if p.is_dir()] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _rng_state() -> dict:
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict) -> None:
    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# Flattened optimizer state (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`): every entry
# belongs to one parameter, so pipeline stages can each save and load their own subset.
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None) -> list[tuple[dict, dict]]:
    if optimizers is None:  # the weights alone (an imported model)
        return [(get_model_state_dict(m), {}) for m in parts]
    return [get_state_dict(m, o, options=_OPTS) for m, o in zip(parts, optimizers)]


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{rank:05d}.safetensors"


def load_rank_state(ckpt: str | Path, kind: str) -> dict[str, torch.Tensor] | None:
    """This rank's own state of kind `kind` (what a communication method keeps per rank), or
    None where the checkpoint has none for this rank: written under another setting or by
    fewer processes. The file was checked against the manifest with the rest."""
    from safetensors import safe_open

    path = rank_file(Path(ckpt), dist.get_rank() if dist.is_initialized() else 0)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("kind") != kind:
            return None
        return {k: f.get_tensor(k) for k in f.keys()}


def save_checkpoint(
    out_dir: str | Path, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None,
    trainer_state: dict, keep_last: int, rank_state: tuple[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective: every rank calls it with its model parts (whole model or pipeline stages)
    and their optimizers (None: the weights alone), and optionally (kind, tensors) of state
    only this rank holds. Returns the final directory."""
    root = checkpoint_dir(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    _barrier()
    model_sd, optim_sd = {}, {}
    for m, o in _state_dicts(parts, optimizers):
        model_sd.update(m)
        optim_sd.update(o)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as e:
        err = _save_error(e, tmp)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise err from e
    if rank_state is not None:
        from safetensors.torch import save_file

        kind, tensors = rank_state
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(rank_file(tmp, rank)),
                      metadata={"kind": kind})
        except OSError as e:
            raise _save_error(e, tmp) from e
    # Also the point where every rank's own file is complete before rank 0 lists them.
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else None
    if rngs is not None:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if rank == 0:
        try:
            state = dict(trainer_state, step=step, rng=rngs, files=_manifest(tmp))
            with (tmp / "trainer.json").open("w") as f:
                f.write(json.dumps(state))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            err = _save_error(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise err from e
        if final.exists():  # the same step saved again (a re-run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _save_error(e: BaseException, where: Path) -> BaseException:
    """A full disk (or quota) as one line naming the place; anything else unchanged. torch's
    writer can lose the errno ("unexpected pos ..."), so a failure with the disk nearly full
    counts too; called before the partial save is removed."""
    e = _cause(e)
    root = where.parent
    free = shutil.disk_usage(root).free if root.exists() else 0
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e) \
        or free < FULL_DISK_BYTES
    if full:
        return RunError(f"no space left on the device writing checkpoint {root / where.name.removeprefix('.tmp_')} "
                        f"({free / 2**20:.1f} MiB free); free some space or lower train.keep_last, then rerun to "
                        "resume from the last complete checkpoint")
    return e


# Below this much free space, a failed save is taken for a full disk.
FULL_DISK_BYTES = 16 << 20


def _cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _reason(e: BaseException) -> str:
    e = _cause(e)
    lines = [l for l in str(e).splitlines() if l.strip()]
    # torch.load's refusal explains weights_only at length; its last line names the culprit.
    return f"{type(e).__name__}: {lines[-1] if isinstance(e, pickle.UnpicklingError) else lines[0]}" if lines \
        else type(e).__name__


def _dcp_load(sd: dict, path: Path) -> None:
    try:
        dcp.load(sd, storage_reader=_SafeReader(path), planner=_SafePlanner())
    except (Exception, CheckpointException) as e:
        raise RunError(f"checkpoint {path} could not be loaded ({_reason(e)}); "
                       "move it aside to use the previous one") from e


def load_checkpoint(path: str | Path, parts: nn.Module | list[nn.Module],
                    optimizers: list[torch.optim.Optimizer] | None = None, state: dict | None = None,
                    restore_rng: bool = True, skip: Callable[[str], bool] | None = None) -> dict:
    """Collective: load model (and optimizer) state into already parallelized model parts,
    whatever layout wrote it; restore this rank's RNG state (unless `restore_rng` is False:
    a new run started from another's weights). Returns trainer.json (pass `state` when
    find_checkpoint already verified and read it). `skip` (weights only): model keys to leave
    as they are, which the checkpoint need not hold (an adapter's, over its base model)."""
    path = Path(path)
    if state is None:
        try:
            state = verify_checkpoint(path)
        except CheckpointDamaged as e:
            raise RunError(str(e)) from None
    if isinstance(parts, nn.Module):
        parts = [parts]
    if optimizers is None:
        for m in parts:
            sd = {"model": {k: v for k, v in get_model_state_dict(m).items() if not (skip and skip(k))}}
            _dcp_load(sd, path)
            set_model_state_dict(m, sd["model"], options=StateDictOptions(strict=skip is None))
    else:
        per_part = _state_dicts(parts, optimizers)
        sd = {"model": {}, "optim": {}}
        for m, o in per_part:
            sd["model"].update(m)
            sd["optim"].update(o)
        _dcp_load(sd, path)
        # DCP fills tensors in place but replaces plain values (lr, step counts): take each
        # part's entries back from the loaded dict.
        for m, (msd, osd), opt in zip(parts, per_part, optimizers):
            set_state_dict(m, opt, model_state_dict={k: sd["model"][k] for k in msd},
                           optim_state_dict={k: sd["optim"][k] for k in osd}, options=_OPTS)
    if not restore_rng:
        return state
    rank = dist.get_rank() if dist.is_initialized() else 0
    rngs = state["rng"]
    # On the same process count each rank gets its own state back; after a reshape the
    # extra ranks take rank 0's (dropout masks then differ from the original run's).
    _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state
