"""The training loop: one process, or N under torchrun with DDP / FSDP2 / HSDP."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from stoker.config import Config, ConfigError
from stoker.data.loader import DataLoader, TokenWindows
from stoker.data.prepare import load_meta, load_split
from stoker.models.gpt import GPT, GPTConfig, count_params, flops_per_token, loss_fn
from stoker.parallel.mesh import DistInfo, build_mesh, dp_rank_world, init_distributed, shutdown
from stoker.parallel.parallelize import parallelize, uses_fsdp
from stoker.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from stoker.train.metrics import MetricsLog, peak_flops, plot_loss
from stoker.train.schedule import lr_at, schedule_state


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    m = cfg.model
    gcfg = GPTConfig.from_preset(
        m.preset, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
        vocab_size=vocab_size, block_size=cfg.train.seq_len, dropout=m.dropout,
    )
    if gcfg.n_embd % gcfg.n_head:
        raise ConfigError(f"model.n_head: {gcfg.n_head} does not divide model.n_embd {gcfg.n_embd}")
    return gcfg


def build_model(gcfg: GPTConfig, seed: int, device: torch.device) -> GPT:
    """Full model, initialised on the CPU from `seed` so every layout starts from the same weights."""
    with torch.device("meta"):
        model = GPT(gcfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(seed=seed)
    return model.to(device)


def build_sharded_model(gcfg: GPTConfig, seed: int, info: DistInfo, mesh, cfg: Config, param_dtype) -> nn.Module:
    """Meta-device model, sharded, then materialised; rank 0 alone builds the initial weights
    and broadcasts them, so no rank but the first ever holds the whole model."""
    with torch.device("meta"):
        model = GPT(gcfg)
    model = parallelize(model, mesh, cfg.parallel, param_dtype)
    model.to_empty(device=info.device)
    full = build_model(gcfg, seed, torch.device("cpu")).state_dict() if info.is_main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        # Matmul weights and embeddings decay; biases and norm gains do not.
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype: the multi-tensor one
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


class StopFlag:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second signal exits at once."""

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
        elif now - self.at > self.SAME_REQUEST_S:
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
    model: nn.Module
    autocast: contextlib.AbstractContextManager
    accum: int


def _micro_batches(x: torch.Tensor, y: torch.Tensor, n: int):
    return zip(x.chunk(n), y.chunk(n))


def _sync_context(ctx: Ctx, last: bool):
    """Skip gradient reduction on all but the last micro-batch of a step."""
    m = ctx.model
    if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
        m.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(m, nn.parallel.DistributedDataParallel) and not last:
        return m.no_sync()
    return contextlib.nullcontext()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate_loss(ctx: Ctx, loader: DataLoader, batches: int) -> float:
    ctx.model.eval()
    total = torch.zeros(1, device=ctx.info.device)
    for i in range(batches):
        x, y = loader.batch(i)
        for xm, ym in _micro_batches(x, y, ctx.accum):
            with ctx.autocast:
                total += loss_fn(ctx.model(xm.to(ctx.info.device)), ym.to(ctx.info.device)).float()
    ctx.model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _all_reduce_sum(total).item() / (batches * ctx.accum * world)


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def train(cfg: Config) -> dict:
    """Train (or resume) per `cfg`; returns a summary. Works for one process or under torchrun."""
    info = init_distributed(cfg.train.device)
    try:
        summary = _train(cfg, info)
    except BaseException:
        # No barrier on the way out: the other ranks may never reach it.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown()
    return summary


def _train(cfg: Config, info: DistInfo) -> dict:
    t = cfg.train
    if info.world > 1 and cfg.parallel.dp == 1:
        # Plain `torchrun --nproc_per_node N -m stoker train`: data parallel over all N (DDP).
        cfg.parallel.dp_replicate = info.world
        cfg.validate()
    mesh = build_mesh(cfg.parallel, info)
    dp_rank, dp_world = dp_rank_world(mesh)
    out = Path(t.out_dir)

    try:
        meta = load_meta(cfg.data.dir)
        train_windows = TokenWindows(load_split(cfg.data.dir, "train"), t.seq_len)
        val_windows = TokenWindows(load_split(cfg.data.dir, "val"), t.seq_len)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.dir: {e}") from None
    gcfg = model_config(cfg, meta["vocab_size"])

    bf16 = t.dtype == "bf16"
    fsdp = mesh is not None and uses_fsdp(cfg.parallel)
    if fsdp:
        model = build_sharded_model(gcfg, t.seed, info, mesh, cfg, torch.bfloat16 if bf16 else None)
        autocast = contextlib.nullcontext()  # FSDP2's mixed-precision policy casts the parameters instead
    else:
        model = parallelize(build_model(gcfg, t.seed, info.device), mesh, cfg.parallel, None)
        autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    optimizer = build_optimizer(model, cfg)

    local_batch = t.batch_size // dp_world
    micro = t.micro_batch_size or local_batch
    ctx = Ctx(info, model, autocast, accum=local_batch // micro)
    loader = DataLoader(train_windows, t.batch_size, t.seed, dp_rank, dp_world)
    val_loader = DataLoader(val_windows, t.batch_size, t.seed, dp_rank, dp_world, shuffle=False)

    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        saved = json.loads((out / "model.json").read_text()) if (out / "model.json").is_file() else asdict(gcfg)
        diff = [f"{k} {saved.get(k)} -> {v}" for k, v in asdict(gcfg).items() if k != "dropout" and saved.get(k) != v]
        if diff:
            raise ConfigError(f"train.out_dir: {out} holds a run of another model shape ({', '.join(diff)}); "
                              "use a new train.out_dir or the run's own model settings")
        state = load_checkpoint(ckpt, model, optimizer)
        try:
            loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise ConfigError(f"train: {e}") from None
        start = state["step"]
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.toml")
        # The run directory carries what inference needs, independent of the data directory.
        (out / "model.json").write_text(json.dumps(asdict(gcfg), indent=1))
        shutil.copyfile(Path(cfg.data.dir) / "tokenizer.json", out / "tokenizer.json")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None) if info.is_main else None

    fpt = flops_per_token(gcfg, t.seq_len)
    # Processes on one CPU share its cores; GPUs each bring their own peak.
    n_peaks = info.world if info.device.type == "cuda" else max(1, info.world // info.local_world)
    # Under torchrun the other ranks share these cores during the probe: use it, do not keep it.
    peak = peak_flops(info.device, t.dtype, cache=info.world == 1) * n_peaks if info.is_main else float("nan")
    tokens_per_step = t.batch_size * t.seq_len

    def checkpoint(step: int) -> None:
        trainer_state = {"loader": loader.state_dict(), "schedule": schedule_state(t), "dtype": t.dtype,
                         "world": info.world}
        save_checkpoint(out, step, model, optimizer, trainer_state, t.keep_last)

    def run_eval(step: int) -> float:
        v = evaluate_loss(ctx, val_loader, t.eval_batches)
        if log:
            log.write({"step": step, "val_loss": v, "val_ppl": math.exp(min(v, 50))})
        return v

    if start >= t.steps and info.is_main:
        print(f"{out} is already at step {start} (train.steps={t.steps}); raise train.steps to train further")
    progress = _Progress(show=info.is_main, bar=t.progress, total=t.steps, start=start)
    stop = StopFlag()
    loss_val = val = float("nan")
    rates: list[float] = []
    t_run = time.perf_counter()
    step = start
    try:
        progress.note(
            f"stoker train: {cfg.model.preset} ({count_params(gcfg) / 1e6:.2f}M params), {info.world} process(es), "
            f"{'FSDP2' if fsdp else 'DDP' if mesh is not None else 'single'}, {t.dtype}, "
            f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {t.steps} steps"
        )
        while step < t.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = loader.batch(step)
            loss_sum = torch.zeros(1, device=info.device)
            for i, (xm, ym) in enumerate(_micro_batches(x, y, ctx.accum)):
                with _sync_context(ctx, last=i == ctx.accum - 1), autocast:
                    loss = loss_fn(model(xm.to(info.device)), ym.to(info.device)) / ctx.accum
                loss.backward()
                loss_sum += loss.detach().float()
            gnorm = _clip(model, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loader.step = step
            # One collective carries both the loss and whether any rank was told to stop.
            red = _all_reduce_sum(torch.cat([loss_sum, torch.tensor([1.0 if stop.set else 0.0], device=info.device)]))
            loss_val = red[0].item() / dp_world
            stopping = red[1].item() > 0
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            if step > start + 1:  # the first step pays one-off set-up costs
                rates.append(tps)
            mfu = tps * fpt / peak
            if log and (step % t.log_every == 0 or step == t.steps):
                log.write({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
                           "mfu": mfu, "step_time_s": dt})
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
    }


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
