"""Run under torchrun with 2 processes: each tensor-parallel piece of the model (attention,
MLP, block, whole model with loss_parallel) against its unsharded twin, forward and backward,
in float64. Writes the largest absolute errors to the JSON file named on the command line."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel

import torch.nn.functional as F

from stoker.models.gpt import GPT, GPTConfig
from stoker.parallel.parallelize import apply_tp


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grad_errors(ref: torch.nn.Module, par: torch.nn.Module) -> dict[str, float]:
    """Per parameter: the largest error, relative to the module's largest reference gradient
    entry (some gradients are zero in exact arithmetic, e.g. the key bias under softmax)."""
    refs = dict(ref.named_parameters())
    scale = max(p.grad.abs().max() for p in refs.values())
    assert scale > 0
    return {n: ((_full(p.grad) - refs[n].grad).abs().max() / scale).item() for n, p in par.named_parameters()}


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # In float64 like the rest (stoker's own loss_fn computes in fp32 on purpose).
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _seq_shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(2, dim=1)[rank].contiguous()  # (B, T/2, C): sequence parallel's layout


def _gather_seq(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)  # the same weights and data on both ranks
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=16)
    ref_model = GPT(cfg)
    par_model = apply_tp(copy.deepcopy(ref_model), mesh)
    x = torch.randn(2, 16, 32)  # (B, T, C)
    ids, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    result = {}

    ref_block, par_block = ref_model.blocks["0"], par_model.blocks["0"]
    for name, ref, par in [("attn", ref_block.attn, par_block.attn), ("mlp", ref_block.mlp, par_block.mlp),
                           ("block", ref_block, par_block)]:
        ref_model.zero_grad()
        par_model.zero_grad()
        weight = torch.randn(2, 16, 32)  # a loss whose gradient differs per position
        y_ref = ref(x)
        (y_ref * weight).sum().backward()
        y_par = par(_seq_shard(x, rank))  # sequence-split input and output, as between blocks
        (y_par * _seq_shard(weight, rank)).sum().backward()
        result[name] = {"out": (_gather_seq(y_par.detach()) - y_ref.detach()).abs().max().item(),
                        "grads": _grad_errors(ref, par)}

    ref_model.zero_grad()
    par_model.zero_grad()
    loss_ref = _loss(ref_model(ids), targets)
    loss_ref.backward()
    with loss_parallel():  # logits stay split by vocabulary; the loss is computed from the shards
        loss_par = _loss(par_model(ids), targets)
        loss_par.backward()
    result["model"] = {"out": abs(_full(loss_par).item() - loss_ref.item()), "grads": _grad_errors(ref_model, par_model)}

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
