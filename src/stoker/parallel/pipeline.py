"""Pipeline parallelism with torch.distributed.pipelining: the model cut into stages by layer.

Stage s runs on pp rank s % pp (one stage per rank, or several interleaved). The first stage
owns the embeddings, the last the final norm and the head. Where the head is tied to the token
embedding (GPT-2), the last stage keeps its own copy of `wte` under the same name: checkpoints
then hold one `wte.weight` whatever the layout, and `TiedGradSync` sums the two copies'
gradients so that they stay equal, as the single tensor of the unsplit model would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from stoker.config import ParallelConfig
from stoker.parallel.mesh import local_shard
from stoker.parallel.plan import balanced_split
from stoker.models.gpt import GPT


def _param_count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def split_layers(model: GPT, n_stages: int) -> list[range]:
    """Contiguous block ranges, one per stage, that minimise the largest stage's parameter
    count; the first stage also carries the embeddings, the last the head (its weight is
    tied, but its matmul, gradient and optimizer state are the last stage's own)."""
    blocks = [_param_count(b) for b in model.blocks.values()]
    n = len(blocks)
    if n_stages > n:
        raise ValueError(f"{n_stages} pipeline stages for {n} layers: every stage needs a layer")
    first = _param_count(model.wte) + _param_count(model.wpe)
    last = _param_count(model.wte if model.cfg.tie_embeddings else model.lm_head) + _param_count(model.ln_f)
    return balanced_split(blocks, first, last, n_stages)


def stage_module(model: GPT, layers: range, first: bool, last: bool) -> GPT:
    """A copy of the (meta-device) model holding only what stage `layers` runs."""
    stage = copy.deepcopy(model)
    for name in list(stage.blocks):
        if int(name) not in layers:
            del stage.blocks[name]
    if not first:
        stage.wpe = None
        if not (last and model.cfg.tie_embeddings):
            stage.wte = None  # the forward pass takes hidden states (floats) there
    if not last:
        stage.ln_f = None
        stage.lm_head = None
    return stage


def local_stage_ids(pcfg: ParallelConfig, pp_rank: int) -> list[int]:
    return list(range(pp_rank, pcfg.n_stages, pcfg.pp))


def build_stages(model: GPT, pcfg: ParallelConfig, pp_rank: int) -> list[tuple[int, GPT]]:
    """(stage index, stage module) for each stage this pp rank runs."""
    layers = split_layers(model, pcfg.n_stages)
    return [(s, stage_module(model, layers[s], s == 0, s == pcfg.n_stages - 1)) for s in local_stage_ids(pcfg, pp_rank)]


def build_schedule(parts: list[nn.Module], stage_ids: list[int], pcfg: ParallelConfig, pp_mesh: DeviceMesh,
                   device: torch.device, loss_fn: Callable, n_microbatches: int):
    """The pipeline schedule over this rank's stage modules (already parallelized and
    materialized), cutting each batch into `n_microbatches` (see `Config.batch_split`).
    `step(x)` on the first stage, `step(target=y, losses=[])` on the last."""
    group = pp_mesh.get_group()
    stages = [PipelineStage(m, s, pcfg.n_stages, device, group=group) for m, s in zip(parts, stage_ids)]
    # scale_grads: each micro-batch's loss is a mean; dividing by their count makes the
    # accumulated gradient that of the whole batch's mean, as without a pipeline.
    kw = dict(n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
    if pcfg.pp_schedule == "interleaved-1f1b":
        return ScheduleInterleaved1F1B(stages, **kw)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[pcfg.pp_schedule]
    return cls(stages[0], **kw)


class TiedGradSync:
    """Sums the gradients of the first stage's `wte` and the last stage's tied copy over the
    pp group; ranks holding neither add zeros of the same (dp/tp-sharded) local shape."""

    def __init__(self, parts: list[nn.Module], pp_mesh: DeviceMesh, device: torch.device):
        self.group = pp_mesh.get_group()
        owners = [m for m in parts if getattr(m, "wte", None) is not None]
        self.weight = owners[0].wte.weight if owners else None
        shape = [None]
        if pp_mesh.get_local_rank() == 0:  # holds the first stage, hence wte
            shape = [tuple(local_shard(self.weight).shape)]
        dist.broadcast_object_list(shape, group=self.group, group_src=0)
        self.zeros = None if owners else torch.zeros(shape[0], device=device)

    def __call__(self) -> None:
        if self.weight is None:
            buf = self.zeros
        else:
            w = self.weight
            if hasattr(w, "placements") and w.grad.placements != w.placements:
                # Under tensor parallel the embedding's gradient can come out replicated while
                # the head's is split by vocabulary: bring both to the parameter's layout.
                w.grad = w.grad.redistribute(w.device_mesh, w.placements)
            buf = local_shard(w.grad)
        dist.all_reduce(buf, group=self.group)
