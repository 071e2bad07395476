"""Communication for slow links: what DDP sends each step (bucket size, bf16/fp16 gradients,
PowerSGD), and DiLoCo, which lets replicas train alone for several steps between exchanges.

Each setting is a `parallel.*` field (config.py); docs/ethernet.md says what each trades.
Every object here that keeps state between steps has `state_dict()`/`load_state_dict()` of
plain tensors keyed by parameter name, which the checkpoint stores per rank, so that a
resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from stoker.config import ParallelConfig


def register_ddp_hook(model: DDP, pcfg: ParallelConfig, group: dist.ProcessGroup, names: dict[int, str]):
    """Install parallel.grad_compression on `model`; returns the hook's state object when it
    keeps one that a checkpoint must carry (PowerSGD), else None."""
    c = pcfg.grad_compression
    if c in ("bf16", "fp16"):
        # torch's own bf16 hook refuses anything but NCCL/XCCL; this one works on gloo too.
        model.register_comm_hook(group, _cast_hook(torch.bfloat16 if c == "bf16" else torch.float16))
    elif c == "powersgd":
        psgd = PowerSGD(group, names, pcfg.powersgd_rank, pcfg.powersgd_warmup)
        model.register_comm_hook(None, psgd.hook)
        return psgd
    return None


def _cast_hook(dtype: torch.dtype):
    """Gradients sent in `dtype` (half the bytes of fp32), averaged, and cast back."""
    def hook(group, bucket):  # no annotations: DDP checks them against the classes themselves
        buf = bucket.buffer()
        half = buf.div(group.size()).to(dtype)
        fut = dist.all_reduce(half, group=group, async_op=True).get_future()
        return fut.then(lambda f: buf.copy_(f.value()[0]))

    return hook


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning m's (n, r): what a power iteration step keeps."""
    return torch.linalg.qr(m.float(), mode="reduced").Q.to(m.dtype)


@dataclasses.dataclass
class _Bucket:
    """One DDP bucket in PowerSGD's care during a step."""
    mats: list  # (name, (n, m) gradient view, rank, local copy) of the compressed matrices
    rest: list  # gradients sent whole
    ps: list  # the P factors, (n, r) each
    flat: torch.Tensor | None  # what is in flight: vectors and Ps, then the Qs
    work: object | None  # its all-reduce
    buf: torch.Tensor  # DDP's bucket buffer, the future's result
    fut: torch.futures.Future


class PowerSGD:
    """Rank-r gradient compression with error feedback and warm start (Vogels et al. 2019),
    as a DDP communication hook.

    torch ships one (ddp_comm_hooks.powerSGD_hook), but it keys its error feedback and its
    warm-start matrices by bucket index, and DDP re-forms its buckets after the first step of
    every new process: a resumed run would apply the saved errors to the wrong gradients.
    Here every piece of state is keyed by parameter name, so a checkpoint carries it exactly.
    Per bucket: the vectors and the P factors go in one all-reduce, the Q factors in a
    second, both while backward goes on.
    """

    def __init__(self, group: dist.ProcessGroup, names: dict[int, str], rank: int, warmup: int, seed: int = 0):
        self.group, self.names, self.rank, self.warmup, self.seed = group, names, rank, warmup, seed
        self.iter = 0  # synchronised steps so far: compression starts at `warmup`
        self.err: dict[str, torch.Tensor] = {}  # what compression left out of this rank's gradient
        self.q: dict[str, torch.Tensor] = {}  # last step's right factors, the next power iteration's start
        self._held: list[_Bucket] = []  # this step's buckets so far

    def _compressed(self, g: torch.Tensor) -> int:
        """The rank to compress `g` at, or 0 where the factors would not be much smaller."""
        if g.dim() < 2:
            return 0
        n, m = g.shape[0], g.numel() // g.shape[0]
        r = min(self.rank, n, m)
        return r if (n + m) * r * 2 <= n * m else 0

    def _start_q(self, name: str, m: int, r: int, like: torch.Tensor) -> torch.Tensor:
        # The same start on every rank without communication: seeded by the parameter's name.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(m, r, generator=g).to(like)

    def hook(self, _state, bucket):  # (no annotations: see _cast_hook)
        buf = bucket.buffer()
        if self.iter < self.warmup:
            if bucket.is_last():
                self.iter += 1
            buf.div_(self.group.size())
            return dist.all_reduce(buf, group=self.group, async_op=True).get_future().then(lambda f: f.value()[0])
        # Every all-reduce is issued from this (the backward) thread, in bucket order, so the
        # ranks agree on their order. (torch's hook chains a bucket's second all-reduce onto
        # its first one's completion, on gloo's threads, in whatever order buckets finish:
        # ranks then disagree and the run aborts.) Bucket i's P factors leave at once; at
        # bucket i+1 its Q factors follow, so both hide behind the rest of backward.
        fut = torch.futures.Future()
        try:
            named = [(self.names[id(p)], g) for p, g in zip(bucket.parameters(), bucket.gradients())]
            self._held.append(self._send_p(named, buf, fut))
            if len(self._held) > 1:
                self._send_q(self._held[-2])
            if bucket.is_last():
                self._send_q(self._held[-1])
                for h in self._held:
                    self._finish(h)
                for h in self._held:
                    h.fut.set_result(h.buf)
                self._held = []
                self.iter += 1
        except Exception as e:
            for f in [h.fut for h in self._held if h.fut is not fut] + [fut]:
                f.set_exception(e)
            self._held = []
            raise
        return fut

    @torch.no_grad()
    def _send_p(self, named_grads: list[tuple[str, torch.Tensor]], buf: torch.Tensor, fut) -> _Bucket:
        """Start the first all-reduce of a bucket: its vectors and small matrices whole, and
        the P factors (one power iteration from last step's Q) of the others."""
        mats, rest = [], []  # (name, (n, m) view, rank, local copy), plain gradients
        for name, g in named_grads:
            r = self._compressed(g)
            if not r:
                rest.append(g)
                continue
            m = g.view(g.shape[0], -1)
            if name in self.err:
                m.add_(self.err[name])
            mats.append((name, m, r, m.clone()))
        qs = [_orthonormal(self.q[name]) if name in self.q else self._start_q(name, m.shape[1], r, m)
              for name, m, r, _ in mats]
        ps = [m @ q for (_, m, _, _), q in zip(mats, qs)]  # (n, r)
        flat = torch.cat([g.reshape(-1) for g in rest] + [p.reshape(-1) for p in ps])
        flat[:sum(g.numel() for g in rest)].div_(self.group.size())
        return _Bucket(mats, rest, ps, flat, dist.all_reduce(flat, group=self.group, async_op=True), buf, fut)

    @torch.no_grad()
    def _send_q(self, b: _Bucket) -> None:
        """When a bucket's P factors have arrived: orthonormalise them and start the all-reduce
        of its Q factors."""
        mats, rest, ps, flat = b.mats, b.rest, b.ps, b.flat
        b.work.wait()
        i = 0
        for g in rest:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()
        for (_, m, _, _), p in zip(mats, ps):
            p.copy_(_orthonormal(flat[i:i + p.numel()].view_as(p)))
            i += p.numel()
        b.flat, b.work = None, None
        if mats:
            b.flat = torch.cat([(m.t() @ p).reshape(-1) for (_, m, _, _), p in zip(mats, ps)])  # the Qs
            b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)

    @torch.no_grad()
    def _finish(self, b: _Bucket) -> None:
        """When a bucket's Q factors have arrived: the rank-r estimate of the mean gradient,
        and what it left out of this rank's gradient for next step."""
        mats, ps, flat = b.mats, b.ps, b.flat
        if b.work is None:
            return
        b.work.wait()
        flat.div_(self.group.size())
        i = 0
        for (name, m, r, local), p in zip(mats, ps):
            q = flat[i:i + m.shape[1] * r].view(m.shape[1], r)
            i += q.numel()
            m.copy_(p @ q.t())
            self.err[name] = local - m
            self.q[name] = q.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"err.{k}": v for k, v in self.err.items()} | {f"q.{k}": v for k, v in self.q.items()}
        return sd | {"iter": torch.tensor(self.iter)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.iter = int(sd["iter"])
        self.err = {k[4:]: v.clone() for k, v in sd.items() if k.startswith("err.")}
        self.q = {k[2:]: v.clone() for k, v in sd.items() if k.startswith("q.")}


class DiLoCo:
    """Replicas that agree every few steps instead of every step (Douillard et al. 2023).

    Each replica takes its own optimizer steps (the inner AdamW) on its own data. Every
    `sync_every` (H) steps the replicas average their change since the last agreed weights
    (the anchor), and an outer SGD step with Nesterov momentum moves the anchor by it; the
    replicas restart from the new anchor. With one fragment this is DiLoCo; with several
    (streaming DiLoCo, Douillard et al. 2025) fragment f exchanges at steps H*k + f*H/F, so
    the traffic is spread over the steps, and its all-reduce runs in the background while
    `sync_overlap` more local steps compute; when it lands, the fragment moves to the new
    anchor plus the local progress made meanwhile. H=1, outer lr 1 and no momentum on one
    replica is plain training; on many it averages the replicas after each step.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None, pcfg: ParallelConfig):
        self.group = group
        self.n = group.size() if group is not None else 1
        self.H, self.lr, self.mu = pcfg.sync_every, pcfg.outer_lr, pcfg.outer_momentum
        streaming = pcfg.sync == "streaming"
        self.overlap = pcfg.sync_overlap if streaming else 0
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[pcfg.sync_dtype]
        self.params = dict(model.named_parameters())  # tied weights appear once
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()}
        self.mom: dict[str, torch.Tensor] = {}
        self.fragments = _split(list(self.params), [p.numel() for p in self.params.values()],
                                pcfg.sync_fragments if streaming else 1)
        self.offsets = [f * self.H // len(self.fragments) for f in range(len(self.fragments))]
        # In flight: fragment -> (step to apply at, all-reduce work or None once done, buffer,
        # this rank's weights when the exchange started).
        self.pending: dict[int, tuple[int, object, torch.Tensor, dict[str, torch.Tensor]]] = {}

    def after_step(self, step: int) -> None:
        """Call once after each optimizer step; `step` counts the steps taken so far."""
        for f in sorted(self.pending):
            if self.pending[f][0] == step:
                self._land(f)
        for f, names in enumerate(self.fragments):
            if step % self.H == self.offsets[f] and step > 0:
                self._launch(f, names, step)
                if self.overlap == 0:
                    self._land(f)

    @torch.no_grad()
    def _launch(self, f: int, names: list[str], step: int) -> None:
        local = {k: self.params[k].detach().clone() for k in names}
        # The outer gradient: how far this replica moved away from the anchor.
        delta = torch.cat([(self.anchor[k] - local[k]).reshape(-1) for k in names]).to(self.dtype)
        work = dist.all_reduce(delta, group=self.group, async_op=True) if self.group is not None else None
        self.pending[f] = (step + self.overlap, work, delta, local)

    @torch.no_grad()
    def _land(self, f: int) -> None:
        _, work, delta, local = self.pending.pop(f)
        if work is not None:
            work.wait()
        g_all = delta.float() / self.n
        i = 0
        for k in self.fragments[f]:  # the buffer's order (a loaded `local` comes back sorted by name)
            p, a, at_launch = self.params[k], self.anchor[k], local[k]
            g = g_all[i:i + a.numel()].view_as(a).to(a.dtype)
            i += a.numel()
            if self.mu:
                m = self.mom.setdefault(k, torch.zeros_like(a))
                m.mul_(self.mu).add_(g)
                g = g + self.mu * m  # Nesterov
            a.sub_(g, alpha=self.lr)
            # Keep the local steps taken while the exchange was in flight.
            p.add_(a - at_launch)

    def wait(self) -> None:
        """Let every exchange in flight finish (its result is kept for its step)."""
        for _, work, _, _ in self.pending.values():
            if work is not None:
                work.wait()
        self.pending = {f: (at, None, d, loc) for f, (at, _, d, loc) in self.pending.items()}

    @contextlib.contextmanager
    def averaged(self):
        """The replicas' mean weights in the model for the duration (for evaluation and the
        checkpoint's model entry, which other settings and `stoker export` read)."""
        if self.group is None:
            yield
            return
        keep = {k: p.detach().clone() for k, p in self.params.items()}
        flat = torch.cat([p.detach().reshape(-1) for p in self.params.values()])
        dist.all_reduce(flat, group=self.group)
        flat /= self.n
        i = 0
        with torch.no_grad():
            for p in self.params.values():
                p.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(keep[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        sd = {f"local.{k}": p.detach().clone() for k, p in self.params.items()}  # the model is swapped for the mean while saving
        sd |= {f"anchor.{k}": v for k, v in self.anchor.items()} | {f"mom.{k}": v for k, v in self.mom.items()}
        for f, (at, _, delta, local) in self.pending.items():
            sd[f"pending.{f}.at"] = torch.tensor(at)
            sd[f"pending.{f}.delta"] = delta
            sd |= {f"pending.{f}.local.{k}": v for k, v in local.items()}
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(sd[f"local.{k}"])
            self.anchor[k].copy_(sd[f"anchor.{k}"])
        self.mom = {k[4:]: v.clone() for k, v in sd.items() if k.startswith("mom.")}
        self.pending = {}
        for f in range(len(self.fragments)):
            if f"pending.{f}.at" in sd:
                pre = f"pending.{f}.local."
                local = {k[len(pre):]: v.clone() for k, v in sd.items() if k.startswith(pre)}
                self.pending[f] = (int(sd[f"pending.{f}.at"]), None, sd[f"pending.{f}.delta"].clone(), local)


def _split(names: list[str], sizes: list[int], parts: int) -> list[list[str]]:
    """Consecutive groups of about equal size (fewer if there are fewer tensors)."""
    parts = max(1, min(parts, len(names)))
    total, out, acc = sum(sizes), [[] for _ in range(parts)], 0
    for name, size in zip(names, sizes):
        out[min(parts - 1, acc * parts // total)].append(name)
        acc += size
    return [g for g in out if g]


def optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """This rank's optimizer state as `opt.<param>.<key>` tensors (DiLoCo replicas each keep their own)."""
    out = {}
    for p, st in opt.state.items():
        for key, v in st.items():
            out[f"opt.{names[id(p)]}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str], sd: dict[str, torch.Tensor]) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            pre = f"opt.{names[id(p)]}."
            st = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            if st:
                cur = opt.state[p]
                for key, v in st.items():
                    if key in cur and torch.is_tensor(cur[key]):
                        cur[key].copy_(v)
                    else:
                        cur[key] = v.clone()
