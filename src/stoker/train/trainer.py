"""The training loop: one process, or N under torchrun with DDP / FSDP2 / HSDP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel as DDP

from stoker.config import Config, ConfigError
from stoker.data.loader import DataLoader, TokenWindows
from stoker.data.prepare import load_meta, load_split
from stoker.data.tokenizer import copy_files as copy_tokenizer
from stoker.models.gpt import (ATTENTION_KERNELS, GPT, IGNORE_INDEX, GPTConfig, count_params, flops_per_token, loss_fn,
                               set_attention)
from stoker.parallel.mesh import (DistInfo, build_mesh, dp_rank_world, from_rank0, init_distributed, local_shard,
                                  shutdown)
from stoker.parallel.comm import DiLoCo, load_optimizer_state, optimizer_state, register_ddp_hook
from stoker.parallel.parallelize import apply_ddp, parallelize, uses_ddp
from stoker.parallel.pipeline import TiedGradSync, build_schedule, build_stages
from stoker.errors import RunError
from stoker.runs import check_visible_to_all, open_run_dir
from stoker.train.checkpoint import (find_checkpoint, load_checkpoint, load_rank_state, remove_partial_saves,
                                     save_checkpoint)
from stoker.train.metrics import MetricsLog, fastest_attention, peak_flops, plot_loss
from stoker.train.schedule import lr_at, schedule_state
from stoker.tune.setup import Tuning, is_adapter_key


def model_config(cfg: Config, vocab_size: int | None) -> GPTConfig:
    """vocab_size: the data's token ids (None: tuning records, tokenized with the base's own tokenizer)."""
    m = cfg.model
    if m.init_from:
        return init_config(cfg, vocab_size)
    try:
        return GPTConfig.from_preset(m.preset, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                                     vocab_size=vocab_size, block_size=cfg.train.seq_len, dropout=m.dropout)
    except ValueError as e:  # a shape that does not hold together: n_head and n_embd, say
        raise ConfigError(f"model: {e}") from None


def init_config(cfg: Config, vocab_size: int | None) -> GPTConfig:
    """The architecture of model.init_from's run, checked against this run's data and layout."""
    src = Path(cfg.model.init_from)
    spec = src / "model.json"
    if not spec.is_file():
        raise ConfigError(f"model.init_from: {src} is not a run directory (no model.json); `stoker import` or "
                          "`stoker train` writes one")
    try:
        gcfg = GPTConfig(**{**json.loads(spec.read_text()), "dropout": cfg.model.dropout})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.init_from: {spec}: {e}") from None
    mine, theirs = Path(cfg.data.dir) / "tokenizer.json", src / "tokenizer.json"
    if vocab_size is not None and (not theirs.is_file() or mine.read_bytes() != theirs.read_bytes()):
        raise ConfigError(f"data.dir: {cfg.data.dir} was not tokenized with {src}'s tokenizer; prepare it with "
                          f"`stoker prepare --tokenizer {src} ...`")
    if vocab_size is not None and vocab_size > gcfg.vocab_size:
        raise ConfigError(f"data.dir: {vocab_size} token ids, more than the model's {gcfg.vocab_size}")
    if cfg.train.seq_len > gcfg.block_size:
        raise ConfigError(f"train.seq_len: {cfg.train.seq_len} is longer than the model's context {gcfg.block_size}")
    tp, pcfg = cfg.parallel.tp, cfg.parallel
    if gcfg.n_head % tp or gcfg.kv_heads % tp:
        raise ConfigError(f"parallel.tp: {tp} does not divide the model's {gcfg.n_head} heads and {gcfg.kv_heads} "
                          "key/value heads")
    if pcfg.n_stages > gcfg.n_layer:
        raise ConfigError(f"parallel.pp: {pcfg.n_stages} pipeline stages for the model's {gcfg.n_layer} layers")
    return gcfg


def build_model(gcfg: GPTConfig, seed: int, device: torch.device) -> GPT:
    """Full model, initialised on the CPU from `seed` so every layout starts from the same weights."""
    with torch.device("meta"):
        model = GPT(gcfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(seed=seed)
    return model.to(device)


def build_parts(gcfg: GPTConfig, cfg: Config, info: DistInfo, mesh,
                adapt: Callable[[nn.Module], None] | None = None) -> tuple[list[nn.Module], list[int]]:
    """This rank's model parts (the whole model, or its pipeline stages) and their stage
    indices, parallelized per cfg.parallel and initialised from train.seed; `adapt` (a tuning
    run's adapter) is applied to the whole model before it is split or wrapped.

    Sharded layouts are built on the meta device, parallelized, then materialised: rank 0
    alone builds the initial weights and broadcasts them, so every layout starts from the
    same weights as one process, and no other rank ever holds the whole model.
    """
    t, pcfg = cfg.train, cfg.parallel
    adapt = adapt or (lambda m: None)

    def built(device: torch.device) -> GPT:
        m = build_model(gcfg, t.seed, device)
        adapt(m)
        return m

    if mesh is None or uses_ddp(pcfg):
        model = parallelize(built(info.device), mesh, pcfg, t.dtype, t.compile)
        if mesh is None or pcfg.sync != "step":  # DiLoCo replicas step alone: no per-step gradient sync
            return [model], [0]
        return [apply_ddp(model, mesh["dp_replicate"], pcfg.bucket_mb)], [0]
    with torch.device("meta"):
        full = GPT(gcfg)
        adapt(full)
    stages = build_stages(full, pcfg, mesh["pp"].get_local_rank()) if pcfg.pp > 1 else [(0, full)]
    parts = []
    init = built(torch.device("cpu")).state_dict() if info.is_main else {}
    for _, m in stages:
        m = parallelize(m, mesh, pcfg, t.dtype, t.compile)
        m.to_empty(device=info.device)
        m.tie_weights()
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(m, init, options=opts)
        parts.append(m)
    return parts, [s for s, _ in stages]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:  # a tuning run's frozen base
            continue
        # Matmul weights and embeddings decay; biases and norm gains do not.
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # an adapter has no biases (and an empty group breaks resume)
    if not groups:
        raise ConfigError("nothing to train: every parameter of the model is frozen")
    try:
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype: the multi-tensor one
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


class StopFlag:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second Ctrl-C (SIGINT) exits at once;
    a repeated SIGTERM does not: schedulers send it more than once (Slurm signals the step, then
    srun passes its own on), and end a job that takes too long with SIGKILL themselves."""

    # torchrun relays the terminal's Ctrl-C to workers that already got it: a repeat this soon
    # after the first is the same request, not a second one.
    SAME_REQUEST_S = 2.0

    def __init__(self):
        self.at: float | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.at is None:
            self.at = now
        elif signum == signal.SIGINT and now - self.at > self.SAME_REQUEST_S:
            # At once: no clean-up that could wait on a collective. A half-written checkpoint
            # keeps its temporary name and is ignored and replaced by the next save.
            os._exit(128 + signum)

    @property
    def set(self) -> bool:
        return self.at is not None

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class Ctx:
    """Per-run pieces the loop's helpers share."""
    info: DistInfo
    parts: list[nn.Module]  # the whole model, or this rank's pipeline stages
    autocast: contextlib.AbstractContextManager
    accum: int  # micro-batches per step without a pipeline
    tp: bool  # logits come split by vocabulary: the loss runs under loss_parallel
    schedule: object | None = None  # the pipeline schedule
    first: bool = True  # holds the first pipeline stage (takes the inputs)
    last: bool = True  # holds the last (computes the loss)
    pp_group: dist.ProcessGroup | None = None
    tied: TiedGradSync | None = None
    norm_skip: frozenset[int] = frozenset()  # ids of parameters whose norm another stage counts
    local: bool = False  # this step exchanges no gradients (train.compute_probe)
    dp_world: int = 1  # data-parallel ranks: each holds 1/dp_world of the batch

    def loss_context(self):
        return loss_parallel() if self.tp else contextlib.nullcontext()


def _micro_batches(x: torch.Tensor, y: torch.Tensor, n: int, tasks: torch.Tensor | None = None):
    """(inputs, targets, model keyword arguments) of each of n micro-batches."""
    kwargs = [{"task": t} for t in tasks.chunk(n)] if tasks is not None else [{}] * n
    return zip(x.chunk(n), y.chunk(n), kwargs)


def _sync_context(model: nn.Module, last: bool):
    """Skip gradient reduction on all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _pipeline_losses(ctx: Ctx, x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
    """One pass of the schedule over the batch; the mean micro-batch loss on the last stage, 0 elsewhere."""
    losses: list[torch.Tensor] = []
    args = (x.to(ctx.info.device),) if ctx.first else ()
    target = y.to(ctx.info.device) if ctx.last else None
    run = ctx.schedule.step if train else ctx.schedule.eval
    with ctx.loss_context(), ctx.autocast:
        run(*args, target=target, losses=losses)
    if not ctx.last:
        return torch.zeros(1, device=ctx.info.device)
    return torch.stack([_full(l.detach()).float() for l in losses]).mean().reshape(1)


def forward_backward(ctx: Ctx, x: torch.Tensor, y: torch.Tensor, n_targets: int | None = None,
                     tasks: torch.Tensor | None = None) -> torch.Tensor:
    """Gradients of the mean loss over this rank's share of the batch; returns that loss
    where this rank computes it (every rank without a pipeline, the last stage with one).
    n_targets: the targets that count in the whole global batch, when some do not (tuning
    records): each micro-batch's mean is then weighted by its share of them, so that the
    gradient is that of the mean over every counted token, whatever the layout. tasks: each
    row's task (a multitask prompt)."""
    if ctx.schedule is not None:
        loss_sum = _pipeline_losses(ctx, x, y, train=True)
        if ctx.tied is not None:
            ctx.tied()
        return loss_sum
    model = ctx.parts[0]
    loss_sum = torch.zeros(1, device=ctx.info.device)
    for i, (xm, ym, kw) in enumerate(_micro_batches(x, y, ctx.accum, tasks)):
        weight = 1 / ctx.accum if n_targets is None else int((ym != IGNORE_INDEX).sum()) * ctx.dp_world / max(n_targets, 1)
        with _sync_context(model, last=i == ctx.accum - 1 and not ctx.local), ctx.loss_context():
            with ctx.autocast:
                loss = model(xm.to(ctx.info.device), ym.to(ctx.info.device), **kw) * weight
            loss.backward()
        loss_sum += _full(loss.detach()).float()
    return loss_sum


@torch.no_grad()
def evaluate_loss(ctx: Ctx, loader: DataLoader, batches: int, n_loss_ranks: int, multitask: bool = False) -> float:
    for m in ctx.parts:
        m.eval()
    total = torch.zeros(1, device=ctx.info.device)
    for i in range(batches):
        x, y = loader.batch(i)
        if ctx.schedule is not None:
            total += _pipeline_losses(ctx, x, y, train=False)
            continue
        tasks = loader.tasks(i) if multitask else None
        for xm, ym, kw in _micro_batches(x, y, ctx.accum, tasks):
            with ctx.autocast, ctx.loss_context():
                total += _full(ctx.parts[0](xm.to(ctx.info.device), ym.to(ctx.info.device), **kw)).float() / ctx.accum
    for m in ctx.parts:
        m.train()
    return _all_reduce_sum(total).item() / (batches * n_loss_ranks)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (the loss under loss_parallel is a replicated one)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _clip(ctx: Ctx, max_norm: float) -> float:
    """Global gradient norm over every rank's parameters (each counted once), and clipping to it."""
    params = [p for m in ctx.parts for p in m.parameters() if p.grad is not None]
    counted = [p.grad for p in params if id(p) not in ctx.norm_skip]
    norm = _full(torch.nn.utils.get_total_norm(counted, norm_type=2.0))  # DTensor grads: reduced over their mesh
    if ctx.pp_group is not None:  # each stage holds a disjoint part of the model
        sq = norm.reshape(1) ** 2
        dist.all_reduce(sq, group=ctx.pp_group)
        norm = sq.sqrt()[0]
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def state_bytes(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards)."""
    def nbytes(t: torch.Tensor) -> int:
        t = local_shard(t)
        return t.numel() * t.element_size()

    params = {id(p): p for m in parts for p in m.parameters()}.values()
    out = {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params if p.grad is not None)}
    out["optimizer"] = sum(nbytes(v) for o in optimizers for st in o.state.values() for v in st.values()
                           if torch.is_tensor(v) and v.dim() > 0)
    return out


def train(cfg: Config) -> dict:
    """Train (or resume) per `cfg`; returns a summary. Works for one process or under torchrun."""
    info = init_distributed(cfg.train.device, cfg.parallel)
    held: list = []  # the run directory's lock, released however the run ends
    try:
        summary = _train(cfg, info, held)
    except BaseException:
        # No barrier on the way out: the other ranks may never reach it.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    finally:
        for f in held:
            if f is not None:
                f.close()
    shutdown()
    return summary


def _train(cfg: Config, info: DistInfo, held: list) -> dict:
    t, pcfg = cfg.train, cfg.parallel
    if info.world > 1 and pcfg.world == 1:
        # Plain `torchrun --nproc_per_node N -m stoker train`: data parallel over all N (DDP).
        pcfg.dp_replicate = info.world
        cfg.validate()
    out = Path(t.out_dir)
    tuning = Tuning(cfg) if cfg.tune.method != "none" else None
    multitask = cfg.tune.method == "multitask-prompt"
    if tuning is not None:
        train_windows, val_windows = tuning.train_rows, tuning.val_rows
        gcfg = model_config(cfg, None)
        tuning.check(gcfg.block_size)
    else:
        try:
            meta = load_meta(cfg.data.dir)
            train_windows = TokenWindows(load_split(cfg.data.dir, "train"), t.seq_len)
            val_windows = TokenWindows(load_split(cfg.data.dir, "val"), t.seq_len)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.dir: {e}") from None
        gcfg = model_config(cfg, meta["vocab_size"])
    if pcfg.auto:
        auto_layout(cfg, gcfg, info)
    mesh = build_mesh(pcfg, info)
    dp_rank, dp_world = dp_rank_world(mesh)

    parts, stage_ids = build_parts(gcfg, cfg, info, mesh, tuning.apply if tuning else None)
    optimizers = [build_optimizer(m, cfg) for m in parts]
    names = {id(p): n for n, p in _unwrap(parts[0]).named_parameters()}
    replicas = mesh["dp_replicate"].get_group() if mesh is not None and uses_ddp(pcfg) else None
    psgd = register_ddp_hook(parts[0], pcfg, replicas, names) if isinstance(parts[0], DDP) else None
    fsdp = mesh is not None and not uses_ddp(pcfg) and pcfg.dp > 1
    # FSDP2's mixed-precision policy casts the parameters; elsewhere bf16 is autocast.
    bf16_autocast = t.dtype == "bf16" and not fsdp
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext()

    split = cfg.batch_split()
    if split.note and info.is_main:
        print(split.note, flush=True)
    ctx = Ctx(info, parts, autocast, accum=split.count, tp=pcfg.tp > 1)
    ctx.dp_world = dp_world
    if pcfg.pp > 1:
        pp_mesh = mesh["pp"]
        ctx.schedule = build_schedule(parts, stage_ids, pcfg, pp_mesh, info.device, loss_fn, split.count)
        ctx.first, ctx.last = 0 in stage_ids, pcfg.n_stages - 1 in stage_ids
        ctx.pp_group = pp_mesh.get_group()
        ctx.tied = TiedGradSync(parts, pp_mesh, info.device) if gcfg.tie_embeddings else None
        # The last stage's copy of the tied embedding is counted once, on the first stage.
        ctx.norm_skip = frozenset(id(m.wte.weight) for m, s in zip(parts, stage_ids) if s != 0 and m.wte is not None)
    loader = DataLoader(train_windows, t.batch_size, t.seed, dp_rank, dp_world)
    val_loader = DataLoader(val_windows, t.batch_size, t.seed, dp_rank, dp_world, shuffle=False)
    # Ranks whose loss enters the mean: one per (dp, tp) pair, each tp rank holding the same loss.
    n_loss_ranks = dp_world * pcfg.tp

    held.append(_lock_run_dir(out, info))
    check_visible_to_all(out, info)  # every host must see the checkpoints rank 0 writes
    start = 0
    found = find_checkpoint(out, set_aside=True)
    if found is not None:
        ckpt, state = found
        saved = asdict(gcfg)
        if (out / "model.json").is_file():
            try:  # through GPTConfig: a model.json written before an option existed has its default
                saved = asdict(GPTConfig(**json.loads((out / "model.json").read_text())))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"train.out_dir: {out / 'model.json'} is not a model description ({e})") from None
        diff = [f"{k} {saved.get(k)} -> {v}" for k, v in asdict(gcfg).items() if k != "dropout" and saved.get(k) != v]
        if diff:
            raise ConfigError(f"train.out_dir: {out} holds a run of another model shape ({', '.join(diff)}); "
                              "use a new train.out_dir or the run's own model settings")
        _check_schedule(state.get("schedule"), t)
        try:
            loader.load_state_dict(state["loader"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"train: {e}") from None
        load_checkpoint(ckpt, parts, optimizers, state=state)
        start = state["step"]
    elif cfg.model.init_from:
        init = find_checkpoint(cfg.model.init_from)
        if init is None:
            raise ConfigError(f"model.init_from: {cfg.model.init_from} holds no complete checkpoint")
        # The weights (an adapter's own start as built); the optimizer starts anew.
        load_checkpoint(init[0], parts, state=init[1], restore_rng=False, skip=is_adapter_key if tuning else None)
        if info.is_main:
            print(f"starting from the weights of {init[0]}", flush=True)
    kernel = choose_attention(cfg, gcfg, info, split.micro, state.get("attention") if found is not None else None)
    for m in parts:
        set_attention(m, kernel)
    # DiLoCo takes its anchor from the weights as loaded; its own and PowerSGD's per-rank state
    # come back only from a checkpoint written with the same setting and process count.
    syncer = DiLoCo(_unwrap(parts[0]), replicas, pcfg) if pcfg.sync != "step" else None
    comm_kind = f"{pcfg.sync}:{info.world}:{len(syncer.fragments)}" if syncer else \
        f"powersgd:{info.world}" if psgd else None
    if found is not None and comm_kind and (rs := load_rank_state(ckpt, comm_kind)) is not None:
        if syncer:
            syncer.load_state_dict(rs)
            load_optimizer_state(optimizers[0], names, rs)
        else:
            psgd.load_state_dict(rs)
    if info.is_main:
        cfg.save(out / "config.toml")
        # The run directory carries what inference needs, independent of the data directory.
        (out / "model.json").write_text(json.dumps(asdict(gcfg), indent=1))
        copy_tokenizer(cfg.model.init_from if tuning else cfg.data.dir, out)  # and an imported model's eos and chat template
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if found is not None else None) if info.is_main else None

    fpt = flops_per_token(gcfg, t.seq_len)
    if tuning is not None and cfg.tune.method in ("lora", "prompt"):
        fpt *= 2 / 3  # a frozen base's weight gradients (a third of the matmul FLOPs) are never computed
    # Processes on one CPU share its cores; GPUs each bring their own peak.
    n_peaks = info.world if info.device.type == "cuda" else max(1, info.world // info.local_world)
    # Under torchrun the other ranks share these cores during the probe: use it, do not keep it.
    peak = peak_flops(info.device, t.dtype, cache=info.world == 1) * n_peaks if info.is_main else float("nan")
    tokens_per_step = t.batch_size * t.seq_len

    def checkpoint(step: int) -> None:
        # Never let a non-finite model replace good checkpoints (keep_last would delete them).
        bad = torch.tensor([float(not all(bool(torch.isfinite(local_shard(p)).all()) for m in parts
                                          for p in m.parameters()))], device=info.device)
        if _all_reduce_sum(bad).item():
            raise RunError(f"step {step}: the model holds NaN or inf values; not saving it "
                           f"(the checkpoints in {out / 'checkpoints'} are kept)")
        trainer_state = {"loader": loader.state_dict(), "schedule": schedule_state(t), "dtype": t.dtype, "attention": kernel,
                         "world": info.world, "parallel": asdict(pcfg),
                         **({"tasks": tuning.tasks} if tuning is not None and tuning.tasks else {})}
        own = None
        if syncer:
            own = (comm_kind, syncer.state_dict() | optimizer_state(optimizers[0], names))
        elif psgd:
            own = (comm_kind, psgd.state_dict())
        # DiLoCo: the model entry holds the replicas' mean, which every other setting can load.
        with syncer.averaged() if syncer else contextlib.nullcontext():
            save_checkpoint(out, step, parts, optimizers, trainer_state, t.keep_last, rank_state=own)
            if tuning is not None:
                tuning.save(_unwrap(parts[0]), out, info.is_main)

    def run_eval(step: int) -> float:
        with syncer.averaged() if syncer else contextlib.nullcontext():
            v = evaluate_loss(ctx, val_loader, t.eval_batches, n_loss_ranks, multitask)
        if log:
            log.write({"step": step, "val_loss": v, "val_ppl": math.exp(min(v, 50))})
        return v

    if start >= t.steps and info.is_main:
        print(f"{out} is already at step {start} (train.steps={t.steps}); raise train.steps to train further")
    progress = _Progress(show=info.is_main, bar=t.progress, total=t.steps, start=start)
    stop = StopFlag()
    loss_val = val = float("nan")
    rates: list[float] = []
    skipped = 0  # non-finite steps in a row
    memory: dict | None = None
    t_run = time.perf_counter()
    step = start
    layout = pcfg.describe() + f" ({pcfg.pp_schedule})" * (pcfg.pp > 1) if mesh is not None else "single process"
    layout += comm_description(pcfg)
    try:
        progress.note(
            f"stoker train: {cfg.model.preset} ({count_params(gcfg) / 1e6:.2f}M params), {info.world} process(es), "
            f"{layout}, {t.dtype}, "
            f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {t.steps} steps"
        )
        probe = t.compute_probe and isinstance(parts[0], DDP)
        if t.compute_probe and not probe:
            progress.note("train.compute_probe: this layout has no DDP gradient exchange to skip; every step is normal")
        while step < t.steps:
            t0 = time.perf_counter()
            ctx.local = probe and step % 2 == 1
            lr = lr_at(step, t)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr
            x, y = loader.batch(step)
            loss_sum = forward_backward(ctx, x, y, loader.target_count(step), loader.tasks(step) if multitask else None)
            gnorm = _clip(ctx, t.grad_clip)  # the global norm: every rank takes the same branch
            if syncer and replicas is not None:  # replicas clip alone; they skip or stop together
                sq = torch.tensor([gnorm ** 2], device=info.device)
                gnorm = math.sqrt(_all_reduce_sum(sq).item() / info.world)
            if math.isfinite(gnorm):
                skipped = 0
                for opt in optimizers:
                    opt.step()
            else:
                skipped += 1
                if t.on_nonfinite == "stop" or skipped >= MAX_SKIPPED:
                    raise RunError(
                        f"step {step + 1}: the gradient norm is {gnorm}" + (f" for {skipped} steps in a row" if skipped > 1 else "")
                        + f"; training stopped without saving (the checkpoints in {out / 'checkpoints'} are kept). "
                        "Lower train.lr or raise train.warmup_steps and resume, or set train.on_nonfinite=skip")
                progress.note(f"step {step + 1}: gradient norm {gnorm}; step skipped (train.on_nonfinite=skip)")
            if memory is None:  # gradients and optimizer state exist now
                memory = _gather_memory(parts, optimizers, info.device)
                if info.is_main:
                    (out / "layout.json").write_text(json.dumps(
                        {"layout": layout, "world": info.world, "parallel": asdict(pcfg), "per_rank": memory}, indent=1))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            if syncer:
                syncer.after_step(step)
            loader.step = step
            # One collective carries both the loss and whether any rank was told to stop.
            red = _all_reduce_sum(torch.cat([loss_sum, torch.tensor([1.0 if stop.set else 0.0], device=info.device)]))
            loss_val = red[0].item() / n_loss_ranks
            stopping = red[1].item() > 0
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            if step > start + 1:  # the first step pays one-off set-up costs
                rates.append(tps)
            mfu = tps * fpt / peak
            if log and (step % t.log_every == 0 or step == t.steps or skipped):
                log.write({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
                           "mfu": mfu, "step_time_s": dt, **({"skipped": True} if skipped else {}),
                           **({"local": True} if ctx.local else {})})
            progress.update(step, loss_val, tps, mfu)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                val = run_eval(step)
                progress.note(f"step {step}: train loss {loss_val:.4f}  val loss {val:.4f}  {tps:,.0f} tok/s  MFU {mfu:.1%}")
            if stopping or (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
                checkpoint(step)
            if stopping:
                progress.note(f"stop requested: checkpoint written at step {step}; rerun the same command to resume")
                break
    finally:
        stop.restore()
        progress.close()
    elapsed = time.perf_counter() - t_run
    if info.is_main and step > start:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    mean_tps = sum(rates) / len(rates) if rates else float("nan")
    return {
        "steps": step, "start_step": start, "stopped_early": step < t.steps,
        "tokens": step * tokens_per_step, "train_loss": loss_val, "val_loss": val,
        "tokens_per_s": mean_tps, "mfu": mean_tps * fpt / peak, "seconds": elapsed,
        "params": count_params(gcfg), "out_dir": str(out),
        "trainable_params": sum(p.numel() for m in parts for p in m.parameters() if p.requires_grad), "layout": layout, "memory_per_rank": memory,
    }


# train.on_nonfinite=skip: this many non-finite steps in a row is divergence, not a bad batch.
MAX_SKIPPED = 5


def measure_link(info: DistInfo, nbytes: int = 4 << 20) -> tuple[float, float]:
    """Collective: (bytes/s each way, one-way latency in s) between the ranks, from timed
    all-reduces: a ring moves 2 (n-1)/n of the tensor through every rank's link."""
    small, big = torch.zeros(1, device=info.device), torch.zeros(nbytes // 4, device=info.device)
    times = {}
    for name, x in (("small", small), ("big", big)):
        dist.all_reduce(x)  # connections made, caches warm
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times[name] = time.perf_counter() - t0
    n = info.world
    latency = times["small"] / (2 * (n - 1))
    bw = 2 * (n - 1) / n * nbytes / max(times["big"] - times["small"], 1e-6)
    return from_rank0(bw), from_rank0(latency)


def choose_attention(cfg: Config, gcfg: GPTConfig, info: DistInfo, rows: int, saved: str | None) -> str:
    """train.attention, or with auto: the kernel a resumed run used (the same arithmetic as
    before the stop), else the faster one on this run's per-rank shape, timed by rank 0."""
    t, tp = cfg.train, cfg.parallel.tp
    if t.attention != "auto":
        return t.attention
    if saved in ATTENTION_KERNELS:
        return saved
    kernel = None
    if info.is_main:
        kernel, times = fastest_attention(rows, gcfg.n_head // tp, gcfg.kv_heads // tp, t.seq_len, gcfg.head_dim,
                                          t.dtype, info.device)
        if times:
            print("attention: " + kernel + " (" + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
                  + " per layer, forward and backward)", flush=True)
    return from_rank0(kernel)


def _agreed(value: float, op, device) -> float:
    """`value` reduced over the ranks with `op` (MIN/MAX), or itself in a single process."""
    if not dist.is_initialized():
        return value
    box = torch.tensor([value], device=device)
    dist.all_reduce(box, op=op)
    return float(box)


def measure_comm_cpu(info: DistInfo, bw: float) -> float:
    """Collective (CPU processes): seconds of compute lost per byte a rank sends. A matmul
    loop of about 0.4 s runs alone, then again while an all-reduce small enough to finish
    within it crosses the link; what the loop lost, per byte sent, median of 3, slowest rank."""
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    a @ a
    n = max(1, round(0.4 / max(time.perf_counter() - t0, 1e-6)))
    nbytes = int(min(64 << 20, max(1 << 20, bw * 0.2)))
    buf = torch.zeros(nbytes // 4)
    sent = 2 * (info.world - 1) / info.world * nbytes

    def loop() -> float:
        t = time.perf_counter()
        for _ in range(n):
            a @ a
        return time.perf_counter() - t

    costs = []
    for _ in range(3):
        dist.barrier()
        alone = loop()
        dist.barrier()
        work = dist.all_reduce(buf, async_op=True)
        both = loop()
        work.wait()
        costs.append(max(0.0, both - alone) / sent)
    return _agreed(sorted(costs)[1], dist.ReduceOp.MAX, "cpu")


def measure_efficiency(gcfg: GPTConfig, info: DistInfo, rows: int, seq_len: int, dtype: str, peak: float) -> float:
    """Collective: achieved / peak FLOP/s of a training step of this model's own shapes, from a
    one-block copy (embeddings, one block, head, loss; a few seconds) run by every rank at once,
    as they will share cores; the slowest rank's. The planner scales it to the whole model: its
    efficiency constant differs between model sizes (measured on one core: 0.64 for preset
    tiny, 0.89 for mini), so a figure from another model misjudges compute against the link."""
    one = dataclasses.replace(gcfg, n_layer=1, dropout=0.0)
    with torch.device(info.device):
        model = GPT(one)
    idx = torch.randint(0, one.vocab_size, (rows, seq_len), device=info.device)
    cast = torch.autocast(info.device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step() -> float:
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        t0 = time.perf_counter()
        with cast:
            loss = model(idx, idx)
        loss.backward()
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        return time.perf_counter() - t0

    step()  # kernels chosen, memory allocated
    best = _agreed(min(step() for _ in range(3)), dist.ReduceOp.MAX, info.device)
    return flops_per_token(one, seq_len) * rows * seq_len / (best * peak)


def auto_layout(cfg: Config, gcfg: GPTConfig, info: DistInfo) -> None:
    """parallel.auto: set cfg.parallel (and the micro-batch) to `stoker plan`'s first choice for
    these processes, hosts and links, the same on every rank."""
    from stoker.parallel.plan import Constants, choose

    t, pcfg = cfg.train, cfg.parallel
    if info.world > 1:
        bw, latency = measure_link(info)
    else:
        bw, latency = 1e12, 0.0
    if pcfg.link_gbps:
        bw = pcfg.link_gbps * 1e9 / 8
    if info.device.type == "cuda":
        peak = peak_flops(info.device, t.dtype)
    else:
        # Each process's own share of the CPU, measured by all at once with their threads and
        # pinning (processes that share cores slow each other as their steps will); the slowest.
        from stoker.train.metrics import measure_matmul_flops

        peak = _agreed(measure_matmul_flops(torch.bfloat16 if t.dtype == "bf16" else torch.float32, seconds=0.5),
                       dist.ReduceOp.MIN, "cpu")
    rows = max(1, min(t.micro_batch_size or t.batch_size // max(1, info.world), 4))
    constants = Constants.for_device(info.device.type, info.local_world)
    constants.efficiency = measure_efficiency(gcfg, info, rows, t.seq_len, t.dtype, peak)
    constants.source += f"; efficiency {constants.efficiency:.0%} measured on this model's shapes"
    if info.world > 1 and info.device.type == "cpu":
        constants.comm_cpu_s_per_byte = measure_comm_cpu(info, bw)
    choice = None
    if info.is_main:
        if info.device.type == "cuda":
            memory = torch.cuda.get_device_properties(info.device).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / info.local_world
        choice = choose(gcfg, info.hosts, info.local_world, peak, memory, inter_bw=bw,
                        intra_bw=bw if info.hosts == 1 else max(bw, 1e9), latency_s=latency, batch=t.batch_size,
                        seq_len=t.seq_len, dtype=t.dtype, device=info.device.type, micro_batch_size=t.micro_batch_size,
                        constants=constants)
        print(f"parallel.auto: {info.hosts} host(s) x {info.local_world} process(es), link {bw * 8 / 1e9:.3g} Gbit/s, "
              f"latency {latency * 1e6:.0f} us, compute at {constants.efficiency:.0%} of {peak / 1e9:.3g} GFLOP/s, "
              f"{constants.comm_cpu_s_per_byte * 1e9:.2g} ns of compute lost per byte sent -> " + " ".join(f"--{k}={v}" for k, v in choice.items()), flush=True)
    for key, value in from_rank0(choice).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    pcfg.auto = False  # chosen: the config saved with the run says what ran
    cfg.validate()


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, DDP) else m


def comm_description(pcfg) -> str:
    """What the replicas send, for the run's first line and layout.json."""
    if pcfg.sync != "step":
        frag = f", {pcfg.sync_fragments} fragments, overlap {pcfg.sync_overlap}" if pcfg.sync == "streaming" else ""
        return (f", {pcfg.sync} every {pcfg.sync_every} steps{frag} (outer lr {pcfg.outer_lr}, "
                f"momentum {pcfg.outer_momentum}, {pcfg.sync_dtype})")
    if pcfg.grad_compression == "powersgd":
        return f", PowerSGD rank {pcfg.powersgd_rank}"
    return f", {pcfg.grad_compression} gradients" if pcfg.grad_compression != "none" else ""


def _lock_run_dir(out: Path, info: DistInfo):
    """Rank 0 creates and locks the run directory and clears a crash's partial saves; every
    rank raises the same ConfigError when it cannot. Returns the lock (a file to keep open;
    None on other ranks)."""
    lock, err = None, None
    if info.is_main:
        try:
            lock = open_run_dir(out)
            for p in remove_partial_saves(out):
                print(f"stoker: removed {p}, a checkpoint left half-written by an earlier crash", flush=True)
        except ConfigError as e:
            err = str(e)
    if (err := from_rank0(err)) is not None:
        raise ConfigError(err)
    return lock


def _check_schedule(saved: dict | None, t) -> None:
    """A resumed run continues the checkpoint's learning-rate schedule unless told otherwise."""
    mine = schedule_state(t)
    if not isinstance(saved, dict) or t.allow_schedule_change:
        return
    diff = [f"{k} {saved.get(k)} -> {v}" for k, v in mine.items() if saved.get(k) != v]
    if diff:
        keep = f" (set train.decay_steps={saved['decay_steps']} to keep it)" if "decay_steps" in saved else ""
        raise ConfigError(f"train: resuming would change the checkpoint's learning-rate schedule ({', '.join(diff)}){keep}; "
                          "set train.allow_schedule_change=true to change it on purpose")


def _gather_memory(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], device: torch.device) -> list[dict]:
    """Every rank's model-state bytes (and peak resident memory), in rank order."""
    import resource

    mine = state_bytes(parts, optimizers)
    mine["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        mine["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


class _Progress:
    """A rich progress bar on rank 0 with loss, tokens/s and MFU; plain lines when disabled."""

    def __init__(self, show: bool, bar: bool, total: int, start: int):
        self.show = show
        self.bar = None
        if show and bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, stats="")
            self.bar.start()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.show:
            print(text, flush=True)

    def update(self, step: int, loss: float, tps: float, mfu: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=f"loss {loss:.4f}  {tps:,.0f} tok/s  MFU {mfu:.1%}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
