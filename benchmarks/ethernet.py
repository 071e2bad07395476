"""Training across emulated Ethernet hosts: how much of each host's compute the communication
settings keep busy, link rate by link rate.

    python benchmarks/ethernet.py --hosts 2 4    # as root, in the project's virtual environment

For each host count K and link rate, `stoker train --nnodes K` runs once per strategy, one
process per host, each host a network namespace whose link `tc tbf` limits to the rate
(stoker.parallel.hosts.EmulatedHosts; needs root). Strategies:

  ddp        DDP over the K hosts, fp32 gradients (--parallel.dp_replicate=K)
  bf16       DDP, gradients sent as bf16
  powersgd   DDP, PowerSGD rank 4 (its exact warm-up cut to 2 steps, and those steps left out
             of the timing, so that compression is on for the whole measurement)
  diloco     DiLoCo, H=8: the replicas exchange their weights every 8 steps
  streaming  streaming DiLoCo, H=8, 4 fragments, overlap 1
  auto       --parallel.auto=true: the trainer measures the link and runs the planner's choice
             (its window is sized for what the planner is expected to choose; a note says
             when it chose otherwise)

DDP-based runs (ddp, bf16, powersgd, and auto when it picks one of them) time their own
compute-only steps: under train.compute_probe every even step skips the gradient exchange,
and utilisation is the median over pairs of (local step / the exchanging step just before
it). On a shared machine whose speed drifts by 10-20% within minutes (measured here: the
same baseline 4.60 s and 5.41 s twenty minutes apart), only steps taken side by side compare
fairly. Their step time is the mean of the exchanging steps. --unpaired compares them with
the baseline runs instead.

The baseline of a host count is the same per-rank work without any communication: K
independent single-process runs, each with batch = global/K, started together, one per
emulated host and pinned as the hosts are. It runs before each link rate's runs and once at
the end: a shared CPU's speed drifts by several percent within minutes, so each run is
compared with the mean of the two baselines around it. Utilisation = baseline step time / the
strategy's step time, both means over the measured steps (DiLoCo/streaming pay their exchanges on some
steps only, so their windows are whole sync periods: --steps is rounded up to a multiple of
H). Bytes on the wire are each host's interface counters, sampled while the run goes, between
the first and the last measured step (start-up, the initial broadcast and the final
evaluation and checkpoint are left out), summed over the hosts, per step. Beside each run:
the planner's (stoker plan) predicted step time and per-rank model state for the same layout,
method and link rate (hosts x 1 process at this machine's calibrated peak per core, latency
0.1 ms), and the memory layout.json measured.

Prints a table per host count, writes JSON (rewritten after every run, so an interrupted
benchmark keeps what it measured) and a plot of utilisation against bandwidth. Numbers are
ratios within one run of the script: the machine's drift between scripts does not cancel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stoker.config import ConfigError, ParallelConfig
from stoker.parallel.plan import cpu_name

STRATEGIES = ("ddp", "bf16", "powersgd", "diloco", "streaming", "auto")
DEFAULT_STRATEGIES = "ddp,powersgd,streaming,auto"
SYNC_EVERY = 8  # the trainer's default H, which diloco and streaming run with here
FRAGMENTS = 4
POWERSGD_WARMUP = 2  # the least the trainer allows (DDP settles its buckets in the first steps)
LATENCY_S = 1e-4  # the link latency the predictions assume (a switched LAN)
POLL_S = 0.1  # steps of a small model take well under a second
MB = 1e6
_AUTO = re.compile(r"^parallel\.auto:.*$", re.MULTILINE)
_AUTO_LINK = re.compile(r"link ([\d.eE+-]+) Gbit/s, latency ([\d.eE+-]+) us")
_OVERRIDE = re.compile(r"--([\w.]+)=(\S+)")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Prediction:
    """The planner's row for one configuration (None fields: no row matched)."""
    layout: str | None = None
    method: str | None = None
    step_s: float | None = None
    compute_s: float | None = None
    comm_s: float | None = None
    wire_mb_per_step: float | None = None  # summed over the hosts, as measured
    state_bytes: float | None = None  # params + grads + optimizer of the most loaded rank
    overrides: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Baseline:
    hosts: int
    when: str  # before or after the host count's runs
    ok: bool
    step_s: float | None  # mean over hosts of each host's mean measured step
    per_host_step_s: list[float]
    loss: float | None
    wall_s: float
    error: str = ""
    predicted_step_s: float | None = None  # the planner's single process at batch/K
    stderr_tail: dict = field(default_factory=dict)  # host -> the end of its output, when failed


@dataclass
class Run:
    hosts: int
    rate: str
    strategy: str
    args: list[str]
    steps_total: int
    window: list[int]  # first and last measured step (inclusive)
    ok: bool = False
    step_s: float | None = None  # mean over the measured steps
    step_s_min: float | None = None
    step_s_max: float | None = None
    baseline_s: float | None = None
    utilisation: float | None = None
    wire_mb_per_step: float | None = None  # sent by all hosts together
    wire_window: list[int] | None = None  # the steps the byte counts were taken at
    loss: float | None = None
    loss_step: int | None = None  # the step the loss is from (runs differ in length)
    state_bytes: float | None = None  # layout.json: params + grads + optimizer of rank 0
    peak_rss_bytes: float | None = None
    predicted: Prediction | None = None
    pred_over_meas: float | None = None
    auto_choice: dict | None = None  # parallel.auto's overrides, as it printed them
    auto_line: str = ""
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    startup_s: float | None = None  # launch to the first step's metrics line (as sampled)
    tail_s: float | None = None  # the last step's metrics line to the last host's exit
    steps_s: float | None = None  # sum of all steps' step_time_s
    stderr_tail: dict = field(default_factory=dict)  # host -> the end of its output, for a failed run
    baselines: list[int] = field(default_factory=list)  # indices into this host count's baselines around it
    paired: bool = False  # utilisation from the run's own local steps (train.compute_probe)
    local_s: float | None = None  # mean of the measured local (no-exchange) steps
    pair_ratios: list[float] = field(default_factory=list)  # local / synced, pair by pair


# ---------------------------------------------------------------------------------------------
# Machine, data, planner


def ensure_data(path: Path, console) -> Path:
    if (path / "meta.json").is_file():
        return path
    console.print(f"{path} has no prepared data: running `stoker prepare --out {path}` (the stdlib corpus)")
    r = subprocess.run([sys.executable, "-m", "stoker", "prepare", "--out", str(path)])
    if r.returncode != 0 or not (path / "meta.json").is_file():
        raise ConfigError(f"--data-dir: `stoker prepare --out {path}` failed (exit code {r.returncode})")
    return path


def rate_bits(rate: str) -> float | None:
    from stoker.parallel.hosts import parse_rate

    return None if rate == "unlimited" else float(parse_rate(rate, "--rates"))


class Planner:
    """The planner's view of these emulated hosts: K hosts x 1 process, each pinned to one core
    (hosts beyond the cores share them), at the calibrated peak per core."""

    def __init__(self, preset: str, vocab: int, batch: int, seq_len: int, dtype: str):
        import torch

        from stoker.parallel.plan import Constants, ModelSpec, load_calibration
        from stoker.train.metrics import peak_flops

        # The trainer's position table is train.seq_len long: so is the planner's.
        self.spec = ModelSpec.of(ModelSpec.from_preset(preset, vocab_size=vocab), seq_len)
        self.batch, self.seq_len, self.dtype = batch, seq_len, dtype
        cal = load_calibration()
        self.calibrated = cal is not None
        self.machine_peak = cal["peak_flops"][dtype] if cal else peak_flops(torch.device("cpu"), dtype)
        self.loopback_bw = cal["loopback_bw"] if cal else 1e9
        self.memory = cal["memory_bytes"] if cal else float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        self.cpus = os.cpu_count() or 1
        self.usable = len(os.sched_getaffinity(0))
        self.constants = Constants.for_device("cpu", 1)
        # What the trainer's parallel.auto plans with: the whole machine's peak for its one process.
        self.auto_peak = peak_flops(torch.device("cpu"), dtype)

    def peak_per_process(self, hosts: int) -> float:
        return self.machine_peak / self.cpus * min(1.0, self.usable / hosts)

    def link_bw(self, rate: str) -> float:
        """Bytes/s each way: the tbf rate, or for an unlimited veth the calibrated loopback."""
        bits = rate_bits(rate)
        return self.loopback_bw if bits is None else bits / 8

    def rows(self, hosts: int, rate: str, batch: int | None = None, sharing: int | None = None):
        """The planner's rows; `sharing`: the processes on the machine's cores (default `hosts`)."""
        from stoker.parallel.plan import Hardware, plan

        bw = self.link_bw(rate)
        hw = Hardware(hosts, 1, self.peak_per_process(sharing or hosts), self.memory / hosts, bw,
                      max(bw, self.loopback_bw),
                      LATENCY_S if hosts > 1 else 0.0, 0.0, "cpu")
        return plan(self.spec, hw, batch or self.batch, self.seq_len, self.dtype, self.constants)

    def predict(self, hosts: int, rate: str, want: dict, batch: int | None = None,
                sharing: int | None = None) -> Prediction:
        try:
            rows = self.rows(hosts, rate, batch, sharing)
        except ConfigError as e:
            return Prediction(note=f"planner: {e}")
        ignore = {"parallel.sync_overlap", "train.micro_batch_size"}
        defaults = asdict(ParallelConfig())
        for r in rows:
            if all(str(r.overrides.get(k, defaults.get(k.partition(".")[2]))) == str(v)
                   for k, v in want.items() if k not in ignore):
                o = {k: v for k, v in r.overrides.items() if k.startswith("parallel.")}
                note = ""
                if "parallel.sync_overlap" in r.overrides and str(r.overrides["parallel.sync_overlap"]) != \
                        str(want.get("parallel.sync_overlap", r.overrides["parallel.sync_overlap"])):
                    note = (f"the planner would overlap {r.overrides['parallel.sync_overlap']} steps; this run "
                            f"overlaps {want['parallel.sync_overlap']}")
                return Prediction(r.layout, r.method, r.step_s, r.compute_s, r.comm_s,
                                  r.wire_bytes * hosts / MB, r.memory.params + r.memory.grads + r.memory.optimizer,
                                  o, note)
        return Prediction(note="no planner row has these settings")

    def auto_guess(self, hosts: int, rate: str) -> dict:
        """What parallel.auto will probably choose (the trainer measures the link itself): only
        to size the measured window before the run."""
        from stoker.parallel.plan import choose

        bw = self.link_bw(rate)
        try:
            return choose(self.spec, hosts, 1, self.auto_peak, self.memory / hosts, bw, max(bw, 1e9), LATENCY_S,
                          self.batch, self.seq_len, self.dtype, "cpu")
        except ConfigError:
            return {}


def strategy_overrides(name: str, hosts: int) -> tuple[list[str], dict]:
    """The `stoker train` options of a strategy, and the planner overrides that describe it."""
    base = {"parallel.pp": 1, "parallel.dp_replicate": hosts, "parallel.dp_shard": 1, "parallel.tp": 1,
            "parallel.activation_checkpoint": "none", "parallel.grad_compression": "none", "parallel.sync": "step"}
    args = [f"--parallel.dp_replicate={hosts}"]
    if name == "bf16":
        args.append("--parallel.grad_compression=bf16")
        base["parallel.grad_compression"] = "bf16"
    elif name == "powersgd":
        args += ["--parallel.grad_compression=powersgd", f"--parallel.powersgd_warmup={POWERSGD_WARMUP}"]
        base.update({"parallel.grad_compression": "powersgd", "parallel.powersgd_rank": ParallelConfig().powersgd_rank})
    elif name == "diloco":
        args += ["--parallel.sync=diloco", f"--parallel.sync_every={SYNC_EVERY}"]
        base.update({"parallel.sync": "diloco", "parallel.sync_every": SYNC_EVERY})
    elif name == "streaming":
        args += ["--parallel.sync=streaming", f"--parallel.sync_every={SYNC_EVERY}",
                 f"--parallel.sync_fragments={FRAGMENTS}", "--parallel.sync_overlap=1"]
        base.update({"parallel.sync": "streaming", "parallel.sync_every": SYNC_EVERY,
                     "parallel.sync_fragments": FRAGMENTS, "parallel.sync_overlap": 1})
    elif name == "auto":
        # The planner decides the layout; should it pick PowerSGD, it compresses from step 3.
        args = ["--parallel.auto=true", f"--parallel.powersgd_warmup={POWERSGD_WARMUP}"]
        base = {}
    return args, base


def window_for(settings: dict, warmup: int, steps: int, paired: bool = False) -> tuple[int, int]:
    """(steps left out at the start, steps measured) for these settings: PowerSGD's exact
    warm-up is left out, DiLoCo/streaming are measured over whole periods. Paired (DDP-based
    runs under train.compute_probe): `steps` pairs of an exchanging (odd) step and the local
    (even) step after it; PowerSGD's warm-up counts exchanging steps only."""
    sync = settings.get("parallel.sync", "step")
    if paired and sync == "step":
        skip = 2 * max(warmup, POWERSGD_WARMUP if settings.get("parallel.grad_compression") == "powersgd" else 0)
        return skip, 2 * steps
    skip, measured = warmup, steps
    if settings.get("parallel.grad_compression") == "powersgd":
        skip = max(skip, POWERSGD_WARMUP)
    if sync != "step":
        h = int(settings.get("parallel.sync_every", SYNC_EVERY))
        measured = math.ceil(steps / h) * h
    return skip, measured


# ---------------------------------------------------------------------------------------------
# Running


class Sampler(threading.Thread):
    """Samples each host's sent bytes and rank 0's last logged step every POLL_S seconds."""

    def __init__(self, hosts, metrics: Path):
        super().__init__(daemon=True)
        self.hosts, self.metrics = hosts, metrics
        self.samples: list[tuple[float, int, list[int]]] = []  # (time, last step, sent per host)
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def last_step(self) -> int:
        try:
            text = self.metrics.read_text()
        except OSError:
            return 0
        step = 0
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if "step_time_s" in rec:
                step = max(step, int(rec["step"]))
        return step

    def run(self) -> None:
        while not self.done.is_set():
            step = self.last_step()
            try:
                sent = [self.hosts.link_bytes(i)[0] for i in range(self.hosts.n_hosts)]
            except OSError:
                break
            self.samples.append((time.monotonic() - self.t0, step, sent))
            self.done.wait(POLL_S)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)

    def first_at(self, step: int):
        return next((s for s in self.samples if s[1] >= step), None)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "step_time_s" in rec:
            out.append(rec)
    return out


def failure(result, n: int = 2000) -> tuple[str, dict]:
    """Why a run failed, and the end of the output of the hosts that failed on their own (all
    of them when a timeout stopped them)."""
    why = f"timed out after {result.seconds:.0f} s" if result.timed_out else f"exit code {result.worst}"
    hosts = [h for h in result.hosts if not h.stopped and h.returncode != 0] or result.hosts
    return why, {str(h.host): {"returncode": h.returncode, "stderr": h.stderr[-n:], "stdout": h.stdout[-n:]}
                 for h in hosts}


def common_args(a: argparse.Namespace, data: Path) -> list[str]:
    return [f"--model.preset={a.preset}", f"--data.dir={data}", f"--train.seq_len={a.seq_len}",
            f"--train.dtype={a.dtype}", "--train.eval_every=0", "--train.eval_batches=1", "--train.ckpt_every=0",
            "--train.progress=false", "--train.log_every=1"]


def run_baseline(a, hosts: int, when: str, data: Path, work: Path, planner: Planner) -> Baseline:
    """K independent single-process runs at batch/K, one per emulated host, all at once."""
    from stoker.parallel.hosts import EmulatedHosts

    total = a.warmup + a.steps + 1
    dirs = [work / f"k{hosts}-baseline-{when.replace(' ', '-')}-h{i}" for i in range(hosts)]
    argv = [sys.executable, "-m", "stoker", "train", *common_args(a, data), f"--train.batch_size={a.batch // hosts}",
            f"--train.steps={total}"]
    t0 = time.monotonic()
    try:
        with EmulatedHosts(hosts, rate=None, pin=not a.no_pin) as eh:
            res = eh.run_each([argv + [f"--train.out_dir={d}"] for d in dirs], timeout=a.timeout)
    except ConfigError as e:
        return Baseline(hosts, when, False, None, [], None, time.monotonic() - t0, str(e))
    wall = time.monotonic() - t0
    if not res.ok:
        why, tail = failure(res)
        return Baseline(hosts, when, False, None, [], None, wall, why, stderr_tail=tail)
    means, loss = [], None
    for d in dirs:
        recs = [r for r in read_metrics(d / "metrics.jsonl") if a.warmup < r["step"] <= a.warmup + a.steps]
        if not recs:
            return Baseline(hosts, when, False, None, [], None, wall, f"{d}: no measured steps in metrics.jsonl")
        means.append(sum(r["step_time_s"] for r in recs) / len(recs))
        loss = read_metrics(d / "metrics.jsonl")[-1]["loss"]
    single = {"parallel.dp_replicate": 1, "parallel.dp_shard": 1, "parallel.tp": 1, "parallel.pp": 1,
              "parallel.activation_checkpoint": "none"}
    pred = planner.predict(1, "unlimited", single, batch=a.batch // hosts, sharing=hosts)
    return Baseline(hosts, when, True, sum(means) / len(means), means, loss, wall, predicted_step_s=pred.step_s)


def run_one(a, hosts: int, rate: str, strategy: str, eh, planner: Planner, data: Path, work: Path) -> Run:
    args, settings = strategy_overrides(strategy, hosts)
    guess = planner.auto_guess(hosts, rate) if strategy == "auto" else settings
    paired = not a.unpaired and strategy in ("ddp", "bf16", "powersgd", "auto")
    if paired:
        args = [*args, "--train.compute_probe=true"]
    if paired and strategy == "auto" and guess.get("parallel.sync", "step") == "step":
        # Whichever of DDP, bf16 or PowerSGD auto picks, its window starts after PowerSGD's
        # warm-up (the guess here cannot know the per-byte CPU cost auto measures).
        guess = {**guess, "parallel.grad_compression": "powersgd"}
    skip, measured = window_for(guess, a.warmup, a.steps, paired)
    total = skip + measured + 1  # one step after the window: the end-of-run traffic stays out of it
    out = work / f"k{hosts}-{rate}-{strategy}"
    shutil.rmtree(out, ignore_errors=True)
    run = Run(hosts, rate, strategy, args, total, [skip + 1, skip + measured])
    train = ["train", *common_args(a, data), f"--train.batch_size={a.batch}", f"--train.steps={total}",
             f"--train.out_dir={out}", *args]
    sampler = Sampler(eh, out / "metrics.jsonl")
    t0 = time.monotonic()
    sampler.start()
    try:
        res = eh.run(train, timeout=a.timeout)
    finally:
        sampler.stop()
    run.wall_s = time.monotonic() - t0
    stdout0 = next((h.stdout for h in res.hosts if h.host == 0), "")
    if m := _AUTO.search(stdout0):
        run.auto_line = m.group(0)
        run.auto_choice = {k: v for k, v in _OVERRIDE.findall(m.group(0).split("->", 1)[-1])}
        settings = {k: v for k, v in run.auto_choice.items() if k.startswith("parallel.")}
        need_skip, need_measured = window_for(settings, a.warmup, a.steps, paired)
        if need_skip > skip or need_measured != measured:
            run.notes.append(f"the measured window (steps {skip + 1}..{skip + measured}) was sized for "
                             f"{guess.get('parallel.sync', 'step')}/{guess.get('parallel.grad_compression', 'none')}; "
                             "auto chose otherwise")
    recs = read_metrics(out / "metrics.jsonl")
    if not res.ok:
        why, run.stderr_tail = failure(res)
        run.notes.append(why)
        return run
    window = [r for r in recs if skip < r["step"] <= skip + measured]
    if len(window) < measured:
        run.notes.append(f"metrics.jsonl has {len(window)} of the {measured} measured steps")
        if not window:
            run.stderr_tail = failure(res)[1]
            return run
    run.ok = True
    local = {r["step"]: r["step_time_s"] for r in window if r.get("local")}
    if local:  # pairs: an exchanging step and the local step after it, one after the other
        synced = [r for r in window if not r.get("local")]
        run.paired, run.local_s = True, sum(local.values()) / len(local)
        run.pair_ratios = [local[r["step"] + 1] / r["step_time_s"] for r in synced if r["step"] + 1 in local]
        window = synced
    times = [r["step_time_s"] for r in window]
    run.step_s, run.step_s_min, run.step_s_max = sum(times) / len(times), min(times), max(times)
    run.steps_s = sum(r["step_time_s"] for r in recs)
    run.loss, run.loss_step = recs[-1]["loss"], recs[-1]["step"]
    first, last = sampler.first_at(1), sampler.first_at(total)
    run.startup_s = first[0] if first else None
    run.tail_s = run.wall_s - last[0] if last else None
    s0, s1 = sampler.first_at(skip), sampler.first_at(skip + measured)
    if s0 and s1 and s1[1] > s0[1]:
        n_steps = s1[1] - s0[1]
        if run.paired:  # local steps send only the loss: count the exchanging steps
            n_steps = sum(1 for st in range(s0[1] + 1, s1[1] + 1) if st % 2 == 1)
        run.wire_mb_per_step = sum(b - a_ for a_, b in zip(s0[2], s1[2])) / max(1, n_steps) / MB
        run.wire_window = [s0[1], s1[1]]
        if s1[1] >= total:
            run.notes.append("the byte count's last sample came after the last step: it may hold the final "
                             "evaluation's traffic")
    else:
        run.notes.append("steps too fast for the byte sampler: no bytes per step")
    try:
        layout = json.loads((out / "layout.json").read_text())
        r0 = layout["per_rank"][0]
        run.state_bytes = r0["params"] + r0["grads"] + r0["optimizer"]
        run.peak_rss_bytes = r0.get("peak_rss")
    except (OSError, ValueError, KeyError, IndexError):
        run.notes.append("no layout.json")
    return run


def predict_run(run: Run, planner: Planner) -> None:
    if run.strategy == "auto":
        if run.auto_choice is None:
            return
        want = {k: v for k, v in run.auto_choice.items() if k.startswith("parallel.")}
    else:
        want = strategy_overrides(run.strategy, run.hosts)[1]
    run.predicted = planner.predict(run.hosts, run.rate, want)
    if run.predicted.step_s and run.step_s:
        run.pred_over_meas = run.predicted.step_s / run.step_s


# ---------------------------------------------------------------------------------------------
# Output


def label(run: Run) -> str:
    """The strategy; for auto, what it chose (as it ran, not as the prediction matched it)."""
    c = run.auto_choice
    if run.strategy != "auto" or not c:
        return run.strategy
    sync, comp = c.get("parallel.sync", "step"), c.get("parallel.grad_compression", "none")
    if sync == "streaming":
        return (f"auto: streaming H={c.get('parallel.sync_every')} F={c.get('parallel.sync_fragments')} "
                f"o={c.get('parallel.sync_overlap')}")
    if sync == "diloco":
        return f"auto: diloco H={c.get('parallel.sync_every')}"
    sizes = {n: c.get(f"parallel.{n}", "1") for n in ("pp", "dp_replicate", "dp_shard", "tp")}
    if str(sizes["dp_replicate"]) == str(run.hosts) and all(str(sizes[n]) == "1" for n in ("pp", "dp_shard", "tp")):
        return f"auto: ddp, {comp} grads" if comp != "powersgd" else "auto: powersgd"
    return "auto: " + " x ".join(f"{n} {v}" for n, v in sizes.items() if str(v) != "1")


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def print_tables(console, runs: list[Run], baselines: list[Baseline], a, planner: Planner) -> None:
    from rich.table import Table

    for k in a.hosts:
        mine = [r for r in runs if r.hosts == k]
        if not mine:
            continue
        bases = [b for b in baselines if b.hosts == k]
        desc = ", ".join(f"{b.when} {fmt(b.step_s, '.3f')} s" if b.ok else f"{b.when} failed ({b.error})"
                         for b in bases)
        pred = next((b.predicted_step_s for b in bases if b.predicted_step_s), None)
        desc += f" (predicted {fmt(pred, '.3f')} s)"
        t = Table(title=f"{k} hosts x 1 process, {a.preset}, batch {a.batch} x {a.seq_len}, {a.dtype}; "
                        f"compute-only baseline: {desc}")
        for col in ("strategy", "rate", "step s", "compute-only s", "util", "MB/step", "pred MB/step", "loss",
                    "pred step s", "pred/meas", "state MB (pred)"):
            t.add_column(col, justify="left" if col in ("strategy", "rate") else "right")
        for r in mine:
            if not r.ok:
                t.add_row(label(r), r.rate, "[red]failed[/red]", fmt(r.baseline_s, ".3f"), "", "", "", "", "", "",
                          "; ".join(r.notes))
                continue
            p = r.predicted or Prediction()
            state = (f"{fmt(r.state_bytes and r.state_bytes / MB, '.0f')} "
                     f"({fmt(p.state_bytes and p.state_bytes / MB, '.0f')})")
            t.add_row(label(r), r.rate, fmt(r.step_s, ".3f"), fmt(r.baseline_s, ".3f"),
                      fmt(r.utilisation and 100 * r.utilisation, ".0f") + "%" * (r.utilisation is not None),
                      fmt(r.wire_mb_per_step, ",.1f"), fmt(p.wire_mb_per_step, ",.1f"),
                      f"{fmt(r.loss, '.3f')} @{r.loss_step}", fmt(p.step_s, ".3f"),
                      fmt(r.pred_over_meas, ".2f"), state)
        console.print(t)
    notes = [f"{label(r)} @ {r.rate}, {r.hosts} hosts: {n}" for r in runs for n in r.notes]
    notes += [f"{r.strategy} @ {r.rate}, {r.hosts} hosts: planner: {r.predicted.note}" for r in runs
              if r.predicted and r.predicted.note]
    window = f"after {a.warmup} warm-up step(s)"
    if {"powersgd", "auto"} & set(a.strategies):
        window += (f"; PowerSGD after its {POWERSGD_WARMUP} exact warm-up steps (--parallel.powersgd_warmup="
                   f"{POWERSGD_WARMUP}), so that compression is on throughout")
    if {"diloco", "streaming", "auto"} & set(a.strategies):
        window += f"; DiLoCo/streaming over whole periods: {a.steps} steps rounded up to a multiple of H"
    console.print(
        f"step s: mean step time over the measured steps ({window}). "
        "util: compute-only / step. loss: the last step's, @ that step. MB/step: bytes all hosts sent per step "
        "(10^6 B, IP and TCP headers included). "
        f"pred: stoker's planner for the same settings (peak {planner.peak_per_process(max(a.hosts)) / 1e9:.1f} "
        f"GFLOP/s per process at {max(a.hosts)} hosts, link latency {LATENCY_S * 1e3:g} ms, unlimited = "
        f"{planner.loopback_bw * 8 / 1e9:.2f} Gbit/s loopback; {planner.constants.source}). state MB: params + "
        "grads + AdamW of rank 0, layout.json (planner).", highlight=False)
    for n in notes:
        console.print(f"  note: {n}", highlight=False)


def plot(runs: list[Run], a, planner: Planner, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    xs = {r: planner.link_bw(r) * 8 / 1e6 for r in a.rates}  # Mbit/s; unlimited at the loopback's
    fig, axes = plt.subplots(1, len(a.hosts), figsize=(6 * len(a.hosts), 4.2), squeeze=False)
    for ax, k in zip(axes[0], a.hosts):
        for s in a.strategies:
            pts = sorted((xs[r.rate], 100 * r.utilisation) for r in runs
                         if r.hosts == k and r.strategy == s and r.ok and r.utilisation is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ticks = sorted(xs.values())
        ax.set_xticks(ticks)
        ax.set_xticklabels(["unlimited" if r == "unlimited" else r for r in sorted(xs, key=xs.get)])
        ax.minorticks_off()
        ax.set_xlabel("link rate per host (unlimited: veth at loopback speed)")
        ax.set_ylabel("utilisation: compute-only / step time, %")
        top = max([110.0] + [100 * r.utilisation + 10 for r in runs if r.hosts == k and r.utilisation])
        ax.set_ylim(0, top)
        ax.set_title(f"{k} hosts, {a.preset}, batch {a.batch} x {a.seq_len}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, a, planner: Planner, runs: list[Run], baselines: list[Baseline], started: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    doc = {
        "benchmark": "ethernet", "started": started, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": planner.usable,
                    "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
                    "peak_flops_machine": planner.machine_peak, "calibrated": planner.calibrated,
                    "loopback_bw": planner.loopback_bw, "constants": asdict(planner.constants)},
        "settings": {"preset": a.preset, "params": planner.spec.params, "batch": a.batch, "seq_len": a.seq_len,
                     "dtype": a.dtype, "steps": a.steps, "warmup": a.warmup, "hosts": a.hosts, "rates": a.rates,
                     "strategies": a.strategies, "pinned": not a.no_pin, "sync_every": SYNC_EVERY,
                     "powersgd_warmup": POWERSGD_WARMUP, "predicted_latency_s": LATENCY_S,
                     "peak_flops_per_process": {k: planner.peak_per_process(k) for k in a.hosts}},
        "baselines": [asdict(b) for b in baselines],
        "runs": [asdict(r) for r in runs],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2], help="emulated host counts, e.g. 2 4 (default 2)")
    p.add_argument("--rates", default="unlimited,1gbit,250mbit,100mbit",
                   help="link rates per host, comma-separated: unlimited or NUMBER{kbit,mbit,gbit} "
                        "(default unlimited,1gbit,250mbit,100mbit)")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help=f"comma-separated, of {', '.join(STRATEGIES)} (default {DEFAULT_STRATEGIES})")
    p.add_argument("--preset", default="mini", help="model preset (default mini)")
    p.add_argument("--batch", type=int, default=16,
                   help="global batch in sequences, divided by each host count (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=6,
                   help="measured steps per run (default 6; paired runs: 6 pairs; DiLoCo/streaming: rounded up to "
                        "whole periods of H=8)")
    p.add_argument("--warmup", type=int, default=1, help="steps before the measured ones, left out (default 1)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="train.dtype (default fp32)")
    p.add_argument("--data-dir", default="data/stdlib", help="prepared data (made with `stoker prepare` if missing)")
    p.add_argument("--out", default="benchmarks/results/ethernet.json", help="JSON results")
    p.add_argument("--plot", default="docs/ethernet.png", help="utilisation against link rate (PNG)")
    p.add_argument("--unpaired", action="store_true",
                   help="DDP-based runs too against the compute-only baseline runs, not their own local steps")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds one run may take before it is stopped (default 1800)")
    p.add_argument("--no-pin", action="store_true", help="do not pin each host to its own core(s)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (their path is printed)")
    a = p.parse_args(argv)
    a.rates = [r.strip().lower() for r in a.rates.split(",") if r.strip()]
    a.strategies = [s.strip().lower() for s in a.strategies.split(",") if s.strip()]
    bad = [s for s in a.strategies if s not in STRATEGIES]
    if bad:
        p.error(f"--strategies: {bad[0]!r} is not one of {', '.join(STRATEGIES)}")
    for r in a.rates:
        if r != "unlimited":
            try:
                rate_bits(r)
            except ConfigError as e:
                p.error(str(e))
    for k in a.hosts:
        if k < 2:
            p.error(f"--hosts: {k}: at least 2 hosts (one host sends nothing over Ethernet)")
        if a.batch % k:
            p.error(f"--batch: {a.batch} does not split over {k} hosts")
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup: must be >= 1 (the first step pays one-off set-up costs)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("ethernet.py: needs root (it makes network namespaces and tc links); run it as root", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file keeps whole table rows
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        data = ensure_data(Path(a.data_dir), console)
        vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
        planner = Planner(a.preset, vocab, a.batch, a.seq_len, a.dtype)
    except ConfigError as e:
        print(f"ethernet.py: {e}", file=sys.stderr)
        return 2
    from stoker.parallel.hosts import EmulatedHosts

    work = Path(tempfile.mkdtemp(prefix="stoker-ethernet-"))
    out, plot_path = Path(a.out), Path(a.plot)
    runs: list[Run] = []
    baselines: list[Baseline] = []
    n_total = len(a.hosts) * (len(a.rates) * (len(a.strategies) + 1) + 1)
    done = 0
    t_start = time.monotonic()

    def progress(what: str) -> None:
        nonlocal done
        done += 1
        console.print(f"[{done}/{n_total}, {time.monotonic() - t_start:,.0f} s] {what}", highlight=False)

    def baseline_of(r: Run) -> float | None:
        mine = [b for b in baselines if b.hosts == r.hosts]
        ok = [mine[i].step_s for i in r.baselines if i < len(mine) and mine[i].ok]
        return sum(ok) / len(ok) if ok else None

    def refresh(k: int) -> None:
        for r in runs:
            if r.hosts == k and r.ok and r.paired and r.pair_ratios:
                r.baseline_s, r.utilisation = r.local_s, statistics.median(r.pair_ratios)
            elif r.hosts == k and r.ok and (base := baseline_of(r)):
                r.baseline_s, r.utilisation = base, base / r.step_s

    def new_baseline(k: int, when: str) -> None:
        b = run_baseline(a, k, when, data, work, planner)
        baselines.append(b)
        refresh(k)
        progress(f"{k} hosts, compute-only baseline {when}: " + (f"{b.step_s:.3f} s/step" if b.ok else f"failed: {b.error}"))

    interrupted = False
    try:
        for k in a.hosts:
            for j, rate in enumerate(a.rates):
                new_baseline(k, f"before {rate}")
                try:
                    with EmulatedHosts(k, rate=None if rate == "unlimited" else rate, pin=not a.no_pin) as eh:
                        for s in a.strategies:
                            r = run_one(a, k, rate, s, eh, planner, data, work)
                            r.baselines = [j, j + 1]
                            predict_run(r, planner)
                            runs.append(r)
                            refresh(k)
                            write_json(out, a, planner, runs, baselines, started)
                            progress(f"{k} hosts, {rate}, {label(r)}: " + (
                                f"{r.step_s:.3f} s/step, util {fmt(r.utilisation and 100 * r.utilisation, '.0f')}%, "
                                f"{fmt(r.wire_mb_per_step, ',.1f')} MB/step, wall {r.wall_s:.0f} s"
                                if r.ok else "[red]failed[/red]: " + "; ".join(r.notes)))
                except ConfigError as e:  # the hosts could not be made: every run at this rate fails
                    for s in a.strategies:
                        if not any(r.hosts == k and r.rate == rate and r.strategy == s for r in runs):
                            runs.append(Run(k, rate, s, [], 0, [0, 0], notes=[f"emulated hosts: {e}"]))
                            progress(f"{k} hosts, {rate}, {s}: failed: {e}")
            new_baseline(k, "at the end")
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: the results so far follow (the emulated hosts are removed)")
    write_json(out, a, planner, runs, baselines, started)
    print_tables(console, runs, baselines, a, planner)
    if any(r.ok for r in runs):
        plot(runs, a, planner, plot_path)
        console.print(f"wrote {out} and {plot_path}", highlight=False)
    else:
        console.print(f"wrote {out}", highlight=False)
    if a.keep:
        console.print(f"run directories kept in {work}", highlight=False)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 130 if interrupted else (0 if all(r.ok for r in runs) else 1)


if __name__ == "__main__":
    sys.exit(main())
