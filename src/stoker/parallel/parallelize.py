"""Apply parallelism to a model from outside, each strategy its own small function, in the
order that composes: tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 /
HSDP (or DDP, for pure data parallelism, applied once the weights exist).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from stoker.config import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tp_plan(sequence_parallel: bool = True) -> dict[str, ParallelStyle]:
    """Module path -> DTensor style. Attention and MLP are Megatron pairs (column-split then
    row-split: one collective each); the embedding and the tied head are split by vocabulary.

    With sequence parallel (training), activations between the pairs stay split along the
    sequence, so the norms run on 1/tp of the tokens and the row-split outputs are
    reduce-scattered instead of all-reduced; the head's logits stay split by vocabulary for
    `loss_parallel`. Without it (generation, where the length grows one token at a time),
    activations are replicated and the head returns whole logits.
    """
    if not sequence_parallel:
        return {
            "wte": RowwiseParallel(input_layouts=Replicate()),
            "wpe": RowwiseParallel(input_layouts=Replicate()),
            "blocks.*.attn.q_proj": ColwiseParallel(),
            "blocks.*.attn.k_proj": ColwiseParallel(),
            "blocks.*.attn.v_proj": ColwiseParallel(),
            "blocks.*.attn.o_proj": RowwiseParallel(),
            "blocks.*.mlp.gate": ColwiseParallel(),
            "blocks.*.mlp.fc": ColwiseParallel(),
            "blocks.*.mlp.proj": RowwiseParallel(),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
        }
    gather_seq = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),  # (B, T/tp, C)
        "wpe": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),  # (T/tp, C)
        "blocks.*.ln_1": SequenceParallel(),
        "blocks.*.attn": gather_seq,
        "blocks.*.attn.q_proj": ColwiseParallel(),
        "blocks.*.attn.k_proj": ColwiseParallel(),
        "blocks.*.attn.v_proj": ColwiseParallel(),
        "blocks.*.attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "blocks.*.ln_2": SequenceParallel(),
        "blocks.*.mlp": gather_seq,
        "blocks.*.mlp.gate": ColwiseParallel(),
        "blocks.*.mlp.fc": ColwiseParallel(),
        "blocks.*.mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> nn.Module:
    """Tensor parallel over `tp_mesh`. A pipeline stage holds only some of the top-level
    modules, and a model only some of the plan's (wpe: learned positions; mlp.gate: SwiGLU):
    the plan's entries for absent ones are left out. Grouped-query attention splits the key
    and value heads as it splits the query heads, so tp must divide n_kv_head."""
    block = next(iter(model.blocks.values()))

    def present(key: str) -> bool:
        obj = block if key.startswith("blocks.") else model
        for part in key.removeprefix("blocks.*.").split("."):
            obj = getattr(obj, part, None)
        return obj is not None

    parallelize_module(model, tp_mesh, {k: v for k, v in tp_plan(sequence_parallel).items() if present(k)})
    # Each module got its own distributed copy of a tied weight; both are split by
    # vocabulary rows (Shard(0)), so one can stand for both again.
    model.tie_weights()
    return model


def apply_ac(model: nn.Module, every: int) -> nn.Module:
    """Recompute every `every`-th block's activations in backward instead of keeping them.
    The wrapper's name prefix never reaches checkpoints: DCP's state-dict helpers strip it."""
    for name, block in list(model.blocks.items()):
        if int(name) % every == 0:
            model.blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile block by block: identical blocks share one compiled graph, and FSDP keeps
    its per-block hooks outside the graphs."""
    for name, block in list(model.blocks.items()):
        model.blocks[name] = torch.compile(block, fullgraph=True)
    return model


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, pcfg: ParallelConfig, train_dtype: str) -> nn.Module:
    """FSDP2 over the dp_shard dim, or HSDP over (dp_replicate, dp_shard).

    Each block is its own unit so that its all-gather overlaps the previous block's compute;
    the root unit holds the embeddings, final norm and (tied) head.
    """
    param_dtype = DTYPES[train_dtype if pcfg.param_dtype == "auto" else pcfg.param_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[pcfg.reduce_dtype])
    reshard = pcfg.reshard()
    blocks = list(model.blocks.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard if i < len(blocks) - 1 else False)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    if pcfg.fsdp_prefetch > 1:
        # FSDP2 prefetches one unit ahead by itself; deeper prefetch trades memory (more
        # gathered blocks at once) for more time to hide each all-gather on a slow network.
        k = pcfg.fsdp_prefetch
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + k])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - k) : i][::-1])
    return model


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, bucket_mb: float = 25) -> nn.Module:
    device_ids = [model.wte.weight.device.index] if model.wte.weight.device.type == "cuda" else None
    # Buckets let the all-reduce of late layers' gradients overlap the backward of early ones.
    return DDP(model, device_ids=device_ids, process_group=dp_mesh.get_group(), bucket_cap_mb=bucket_mb)


def uses_ddp(pcfg: ParallelConfig) -> bool:
    """Pure data parallelism by replicas: DDP. Any sharding or model parallelism takes FSDP2,
    which also replicates (HSDP with dp_shard=1) where dp_replicate > 1."""
    return pcfg.dp_replicate > 1 and pcfg.dp_shard == 1 and pcfg.tp == 1 and pcfg.pp == 1


def data_parallel_mesh(mesh: DeviceMesh, pcfg: ParallelConfig) -> DeviceMesh | None:
    if pcfg.dp == 1:
        return None
    if pcfg.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def parallelize(model: nn.Module, mesh: DeviceMesh | None, pcfg: ParallelConfig, train_dtype: str,
                compile: bool = False) -> nn.Module:
    """Everything but DDP, on a meta-device model (or pipeline stage): TP -> AC -> compile -> FSDP."""
    if mesh is not None and pcfg.tp > 1:
        apply_tp(model, mesh["tp"])
    if pcfg.ac_every():
        apply_ac(model, pcfg.ac_every())
    if compile:
        apply_compile(model)
    if mesh is not None and not uses_ddp(pcfg) and pcfg.dp > 1:
        apply_fsdp(model, data_parallel_mesh(mesh, pcfg), pcfg, train_dtype)
    return model
