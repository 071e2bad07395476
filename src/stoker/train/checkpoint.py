"""Distributed checkpoints (torch.distributed.checkpoint) that reshard across layouts.

Layout of one checkpoint, `<out_dir>/checkpoints/step_XXXXXXXX/`:
  DCP files        model and optimizer state, keyed by clean module paths (no wrapper
                   prefixes), the optimizer's flattened to one entry per parameter, so a
                   checkpoint written under one layout (N processes, FSDP, TP, pipeline
                   stages) loads under any other
  trainer.json     step, data-loader position, schedule, every rank's RNG states
It is written under `.tmp_step_XXXXXXXX` and renamed when complete, so a crash mid-write
never leaves a directory that looks finished.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

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


def _state_dicts(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> list[tuple[dict, dict]]:
    return [get_state_dict(m, o, options=_OPTS) for m, o in zip(parts, optimizers)]


def save_checkpoint(
    out_dir: str | Path, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
    trainer_state: dict, keep_last: int,
) -> Path:
    """Collective: every rank calls it with its model parts (whole model or pipeline stages)
    and their optimizers. Returns the final directory."""
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
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else None
    if rngs is not None:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if rank == 0:
        state = dict(trainer_state, step=step, rng=rngs)
        (tmp / "trainer.json").write_text(json.dumps(state))
        if final.exists():  # the same step saved again (a re-run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, parts: nn.Module | list[nn.Module],
                    optimizers: list[torch.optim.Optimizer] | None = None) -> dict:
    """Collective: load model (and optimizer) state into already parallelized model parts,
    whatever layout wrote it; restore this rank's RNG state. Returns trainer.json."""
    path = Path(path)
    state = json.loads((path / "trainer.json").read_text())
    if isinstance(parts, nn.Module):
        parts = [parts]
    if optimizers is None:
        for m in parts:
            sd = {"model": m.state_dict()}
            dcp.load(sd, checkpoint_id=str(path))
            m.load_state_dict(sd["model"])
    else:
        per_part = _state_dicts(parts, optimizers)
        sd = {"model": {}, "optim": {}}
        for m, o in per_part:
            sd["model"].update(m)
            sd["optim"].update(o)
        dcp.load(sd, checkpoint_id=str(path))
        # DCP fills tensors in place but replaces plain values (lr, step counts): take each
        # part's entries back from the loaded dict.
        for m, (msd, osd), opt in zip(parts, per_part, optimizers):
            set_state_dict(m, opt, model_state_dict={k: sd["model"][k] for k in msd},
                           optim_state_dict={k: sd["optim"][k] for k in osd}, options=_OPTS)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rngs = state["rng"]
    # On the same process count each rank gets its own state back; after a reshape the
    # extra ranks take rank 0's (dropout masks then differ from the original run's).
    _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state
