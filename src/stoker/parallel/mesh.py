"""Process-group start-up and the DeviceMesh built from the parallel config."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stoker.config import ConfigError, ParallelConfig


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def end_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send `signum` to this process when its parent dies, so that a launcher
    killed with SIGKILL leaves no orphan training on (a worker treats SIGTERM as a stop
    request: finish the step, checkpoint, exit). No-op where prctl is missing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent went before the request took hold
            os.kill(os.getpid(), signum)
    except (OSError, AttributeError):
        pass


def from_rank0(value):
    """Rank 0's `value` on every rank (itself without a process group): where rank 0 alone
    looks at the file system and the others must act on the same answer."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: end with its agent
        end_with_parent()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, local_world, dev)


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(pcfg: ParallelConfig, info: DistInfo) -> DeviceMesh | None:
    """A 4-D (pp, dp_replicate, dp_shard, tp) mesh, tp innermost; None for a single process."""
    if pcfg.world != info.world:
        raise ConfigError(
            f"parallel.pp={pcfg.pp} x parallel.dp_replicate={pcfg.dp_replicate} x parallel.dp_shard={pcfg.dp_shard} "
            f"x parallel.tp={pcfg.tp} = {pcfg.world} does not match the world size {info.world}"
        )
    if info.world == 1:
        return None
    return init_device_mesh(info.device.type, tuple(getattr(pcfg, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)


def dp_rank_world(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This process's index among the data-parallel ranks, and their count."""
    if mesh is None:
        return 0, 1
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return rep.get_local_rank() * shard.size() + shard.get_local_rank(), rep.size() * shard.size()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def shutdown() -> None:
    if dist.is_initialized():
        # Without a barrier first, a fast rank tearing down gloo can abort a slow one.
        dist.barrier()
        dist.destroy_process_group()
