"""Process-group start-up and the DeviceMesh built from the parallel config."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

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

    @property
    def hosts(self) -> int:
        """Hosts taking part: torchrun starts local_world processes on each."""
        return max(1, self.world // max(1, self.local_world))

    def host_of(self, rank: int) -> int:
        """The host holding `rank` (torchrun numbers ranks host by host)."""
        return rank // max(1, self.local_world)


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


def init_distributed(device: str = "auto", pcfg: ParallelConfig | None = None) -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this rank's device. With
    `pcfg`: gloo/NCCL use parallel.ifname, and reaching the others is bounded by
    parallel.connect_timeout_s (a ConfigError, not a hang)."""
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
        _init_process_group(use_cuda, dev, rank, pcfg)
    return DistInfo(rank, world, local_rank, local_world, dev)


def _init_process_group(use_cuda: bool, dev: torch.device, rank: int, pcfg: ParallelConfig | None) -> None:
    backend = "nccl" if use_cuda else "gloo"
    if pcfg is None:
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
        return
    from stoker.launch import check_ifname, socket_env

    check_ifname(pcfg.ifname)
    os.environ.update(socket_env(pcfg.ifname))  # read by gloo and NCCL when the group is made
    # The group's timeout bounds its set-up too: the store connection and gloo's connections
    # to every peer. It would also bound every later collective, and a checkpoint or an eval
    # on one rank can keep the others waiting longer, so it is reset once connected.
    limit = timedelta(seconds=pcfg.connect_timeout_s)
    try:
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None, timeout=limit)
    except (RuntimeError, TimeoutError, OSError) as e:  # torch's DistError family are RuntimeErrors
        raise ConfigError(_connect_failure(e, rank, pcfg)) from None
    try:
        dist.distributed_c10d._set_pg_timeout(dist.distributed_c10d._get_default_timeout(backend))
    except (AttributeError, ValueError, RuntimeError):
        pass  # a torch without it keeps the connect timeout for collectives too


def _connect_failure(e: BaseException, rank: int, pcfg: ParallelConfig) -> str:
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    # The store (at the master) is reached first; gloo's own connections to each peer come after.
    store_errors = tuple(getattr(dist, n) for n in ("DistStoreError", "DistNetworkError") if hasattr(dist, n))
    if isinstance(e, store_errors) or "store" in why.lower():
        return (f"cannot reach the master {where} within {pcfg.connect_timeout_s:g} s (parallel.connect_timeout_s): "
                f"is node 0 started, and the address right? ({why})")
    iface = f"parallel.ifname={pcfg.ifname!r}" if pcfg.ifname else "parallel.ifname (unset: the system's choice)"
    return (f"rank {rank} cannot connect to the other ranks within {pcfg.connect_timeout_s:g} s "
            f"(parallel.connect_timeout_s, master {where}): check {iface} names the interface between the hosts "
            f"({why})")


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
    warn_cross_host_shards(pcfg, info)
    return init_device_mesh(info.device.type, tuple(getattr(pcfg, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)


def warn_cross_host_shards(pcfg: ParallelConfig, info: DistInfo) -> None:
    """One line on rank 0 when a dp_shard x tp group would span hosts: its all-gathers and
    reduce-scatters run every step, so it belongs inside a host and replicas across hosts."""
    inner = pcfg.dp_shard * pcfg.tp
    if info.hosts <= 1 or info.local_world % inner == 0 or not info.is_main:
        return
    fix, shard, dp = "", info.local_world // pcfg.tp, pcfg.dp_replicate * pcfg.dp_shard
    if info.local_world % pcfg.tp == 0:
        rep = f" and parallel.dp_replicate={dp // shard}" if dp % shard == 0 else ""
        how = "replicate across hosts (DDP)" if shard == 1 else "shard inside a host and replicate across hosts (HSDP)"
        fix = f": set parallel.dp_shard={shard} (processes per host / parallel.tp){rep} to {how}"
    print(f"stoker: warning: the parallel.dp_shard x parallel.tp groups ({inner} ranks) cross hosts "
          f"({info.local_world} processes per host, {info.hosts} hosts), so every step's shard traffic goes "
          f"between hosts{fix}", file=sys.stderr, flush=True)


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
