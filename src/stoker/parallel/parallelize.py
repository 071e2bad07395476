"""Apply data parallelism to a model from outside: FSDP2 / HSDP (`fully_shard`) or DDP.

Each strategy is its own small function; `parallelize` picks and orders them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from stoker.config import ParallelConfig


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2 over the dp_shard dim; with dp_replicate > 1 as well, HSDP (replicate x shard).

    Each transformer block is its own unit so that its all-gather can overlap the previous
    block's compute; the root unit holds the embeddings, final norm and (tied) head.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    kw = dict(mesh=dp_mesh, mp_policy=mp)
    blocks = list(model.blocks.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kw)
    fully_shard(model, **kw)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    dp_mesh = mesh["dp_replicate"]
    device_ids = [model.wte.weight.device.index] if model.wte.weight.device.type == "cuda" else None
    # 25 MB buckets let gradient all-reduce of late layers overlap the backward of early ones.
    return DDP(model, device_ids=device_ids, process_group=dp_mesh.get_group(), bucket_cap_mb=25)


def uses_fsdp(pcfg: ParallelConfig) -> bool:
    return pcfg.dp_shard > 1


def parallelize(model: nn.Module, mesh: DeviceMesh | None, pcfg: ParallelConfig, param_dtype: torch.dtype | None) -> nn.Module:
    if mesh is None:
        return model
    if uses_fsdp(pcfg):
        return apply_fsdp(model, mesh, param_dtype)
    return apply_ddp(model, mesh)
