"""The layout planner: its memory model against layout.json of real runs, its speed on a 13B
model without allocating it, its one-line errors, and the sense of its choices."""

import contextlib
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest

from conftest import TINY, train_here
from stoker.cli import main
from stoker.config import load_config
from stoker.parallel.plan import (GPUS, Constants, Hardware, ModelSpec, cache_dir, choose, model_state_bytes, plan,
                                  stage_blocks)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", *argv])
    return code, out.getvalue(), err.getvalue()


# --- the model as numbers agrees with the model as built ---------------------------------------


def test_counts_match_the_built_model():
    from stoker.models.gpt import GPTConfig, count_params, flops_per_token

    for name in ("debug", "mini", "gpt3-125m", "gpt3-1.3b"):  # built on the meta device: ~0.2 s each
        gcfg = GPTConfig.from_preset(name)
        spec = ModelSpec.of(gcfg)
        assert spec.params == count_params(gcfg), name
        assert spec.flops_per_token(gcfg.block_size) == flops_per_token(gcfg, gcfg.block_size), name
    gcfg = GPTConfig(n_layer=3, n_embd=48, n_head=4, vocab_size=100, block_size=16, bias=False)
    assert ModelSpec.of(gcfg).params == count_params(gcfg)


def test_pipeline_split_matches_the_trainers():
    import torch

    from stoker.models.gpt import GPT, GPTConfig
    from stoker.parallel.pipeline import split_layers

    for preset, stages in (("debug", 2), ("gpt3-125m", 5), ("mini", 4)):
        gcfg = GPTConfig.from_preset(preset)
        with torch.device("meta"):
            model = GPT(gcfg)
        m = ModelSpec.of(gcfg)
        first = m.vocab_size * m.n_embd + m.block_size * m.n_embd
        last = m.vocab_size * m.n_embd + 2 * m.n_embd
        expect = tuple(len(r) for r in split_layers(model, stages))
        assert stage_blocks(m.n_layer, m.block_params, first, last, stages) == expect, preset


def test_gpu_table_and_cache_agree_with_metrics():
    from stoker.train import metrics

    names = {"h100": "H100", "h200": "H200", "a100": "A100", "a100-40gb": "A100", "l40s": "L40S", "l4": "L4",
             "rtx4090": "RTX 4090"}
    for key, gpu in GPUS.items():
        declared = metrics.GPU_PEAK_TFLOPS[names[key]]
        assert (gpu.bf16_flops, gpu.fp32_flops) == (declared["bf16"] * 1e12, declared["fp32"] * 1e12), key
    assert cache_dir() == metrics.CACHE.parent


# --- (1) predicted model-state bytes against layout.json ---------------------------------------

LAYOUTS = {"single": [], "ddp2": ["--parallel.dp_replicate=2"], "fsdp2": ["--parallel.dp_shard=2"],
           "tp2": ["--parallel.tp=2"]}

# The 2-process layouts train one after another in one pair of processes: a launch per layout
# costs ~15 s of CPU (torch imported by the launcher and each worker), three of them more than
# this test may take. The pair is started with the environment torchrun would give it, and
# train() would end the process group when it returns: here it outlives the three runs.
WORKER = """
import json, sys
import torch.distributed as dist
from stoker.config import load_config
from stoker.train import trainer

trainer.shutdown = dist.barrier
common, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for out, args in runs.items():
    trainer.train(load_config(overrides=common + [f"--train.out_dir={out}"] + args))
dist.destroy_process_group()
"""


def test_predicted_state_bytes_match_layout_json(small_data, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    common = TINY + [f"--data.dir={small_data}", "--train.steps=1", "--train.eval_batches=1"]
    runs = {str(tmp_path / name): args for name, args in LAYOUTS.items() if args}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, str(worker), json.dumps(common), json.dumps(runs)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        train_here(small_data, tmp_path / "single", "--train.steps=1", "--train.eval_batches=1")  # meanwhile
        for p in procs:
            out = p.communicate(timeout=300)[0]
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
    vocab = json.loads((small_data / "meta.json").read_text())["vocab_size"]
    spec = ModelSpec.from_preset("debug", vocab_size=vocab, block_size=32)  # TINY's seq_len
    for name, args in LAYOUTS.items():
        par = load_config(overrides=args).parallel
        want = model_state_bytes(spec, pp=par.pp, dp_shard=par.dp_shard, tp=par.tp, dp_replicate=par.dp_replicate)
        ranks = json.loads((tmp_path / name / "layout.json").read_text())["per_rank"]
        assert len(ranks) == (2 if args else 1)
        for r in ranks:
            # Exact: the prediction counts the same tensors' local shards that layout.json sums,
            # shaped as parallelize.tp_plan and FSDP2's dim-0 chunks shape them; every dim of
            # this model divides by 2, so no rank holds a ceil-sized chunk bigger than another.
            assert (r["params"], r["grads"], r["optimizer"]) == (want.params, want.grads, want.optimizer), \
                (name, r, want)
    assert model_state_bytes(spec, tp=2).params < model_state_bytes(spec).params


# --- (2) a 13B model on 256 GPUs: quick, nothing allocated -------------------------------------


def test_gpt3_13b_on_32_hosts_of_8_h100_is_arithmetic():
    h100 = GPUS["h100"]
    hw = Hardware(32, 8, h100.bf16_flops, h100.memory_bytes, 200e9 / 8, 3600e9 / 8, 10e-6, 2e-6, "cuda")
    spec = ModelSpec.from_preset("gpt3-13b")
    t = time.perf_counter()
    rows = plan(spec, hw, 512, 2048, "bf16")
    took = time.perf_counter() - t
    assert took < 1.0, took  # measured 0.3 s on this 2-core machine
    tracemalloc.start()  # (it slows allocation several-fold: timed apart)
    plan(dataclasses.replace(spec, n_layer=41), hw, 512, 2048, "bf16")  # not one the caches saw
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20e6, peak  # 13B fp32 weights alone would be 51 GB
    assert rows and [r.rank for r in rows] == list(range(1, len(rows) + 1))
    assert all(r.memory.total <= 0.9 * h100.memory_bytes for r in rows)
    assert {r.overrides["parallel.tp"] for r in rows} <= {1, 2, 4, 8}  # tensor parallel stays in a host
    best = rows[0]
    assert best.step_s > 0 and 0 < best.utilisation <= 1
    assert best.command.startswith("stoker train --model.preset=gpt3-13b")
    # Pure data parallelism cannot hold 13B x 16 bytes of state in 80 GB.
    assert not any(r.layout.startswith("DDP") for r in rows)
    # Its options are ones `stoker train` accepts, for that many processes.
    cfg = load_config(overrides={k: v for k, v in best.overrides.items()} | {"model.preset": "gpt3-13b"})
    assert cfg.parallel.world == 256


def test_cli_answers_for_13b_without_building(monkeypatch):
    code, out, err = _cli("--model.preset=gpt3-13b", "--hosts", "32", "--procs-per-host", "8", "--gpu", "h100",
                          "--inter-gbps", "200", "--intra-gbps", "3600", "--latency-us", "10", "--batch", "512",
                          "--seq-len", "2048", "--top", "3")
    assert code == 0, err
    assert "  1  stoker train --model.preset=gpt3-13b" in out and "  4  " not in out
    assert "--nnodes=32 --node-rank=$NODE_RANK --master=$MASTER:29500 --nproc=8" in out


# --- (3) bad descriptions: one line naming the field, exit 2 -----------------------------------

H100 = ["--gpu", "h100"]


@pytest.mark.parametrize("argv, field", [
    (["--hosts", "2", "--inter-gbps", "-5", *H100], "--inter-gbps"),
    (["--hosts", "2", *H100], "--inter-gbps"),
    (["--gpu", "tpu-v9"], "--gpu"),
    (["--hosts", "0", *H100], "--hosts"),
    (["--procs-per-host", "-1", *H100], "--procs-per-host"),
    (["--latency-us", "nan", *H100], "--latency-us"),
    (["--intra-gbps", "0", *H100], "--intra-gbps"),
    (["--batch", "0", *H100], "--batch"),
    (["--dtype", "fp8", *H100], "--dtype"),
    (["--model.preset=gpt-5", *H100], "model.preset"),
    (["--model.n_head=5", *H100], "model.n_head"),
    (["--model.preset=gpt3-175b", "--gpu", "rtx4090", "--batch", "1"], "memory"),
])
def test_bad_description_is_one_line_naming_the_field(argv, field):
    code, out, err = _cli(*argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stoker: error: {field}"), err
    if field == "--gpu":
        assert all(name in lines[0] for name in GPUS)
    if field == "memory":
        assert "24.0 GB per process" in lines[0]


def test_a_batch_some_layouts_cannot_split_only_skips_them():
    code, out, err = _cli("--model.preset=debug", "--procs-per-host", "2", "--gpu", "l4", "--batch", "3",
                          "--seq-len", "64", "--top", "0")
    assert code == 0, err
    assert "DDP" not in out and "FSDP" not in out  # 3 sequences do not split over 2 replicas
    assert "TP 2" in out and "PP 2" in out


# --- (4) the choices make sense -----------------------------------------------------------------

# A CPU described rather than measured, so that the choice does not depend on this machine.
CPU = Constants(efficiency=0.6, message_overhead_s=100e-6, overlap=0.5, allgather_factor=2.0,
                reduce_scatter_factor=4.0, memory_bw=10e9, runtime_bytes=0.5e9, source="test")


def _choose_mini(gbps: float) -> dict:
    from stoker.models.gpt import GPTConfig

    return choose(GPTConfig.from_preset("mini", block_size=256), n_hosts=2, procs_per_host=1, peak_flops=100e9,
                  memory_bytes=16e9, inter_bw=gbps * 1e9 / 8, intra_bw=2e9, latency_s=100e-6, batch=8,
                  seq_len=256, dtype="fp32", device="cpu", constants=CPU)


def _plain_ddp(c: dict) -> bool:
    return (c["parallel.dp_replicate"] == 2 and c["parallel.grad_compression"] == "none"
            and c["parallel.sync"] == "step")


def test_slow_link_is_not_plain_ddp_and_fast_link_is_exact():
    slow = _choose_mini(0.1)  # 100 Mbit/s between the two hosts: 92 MB of fp32 gradients take 7 s
    assert not _plain_ddp(slow), slow
    fast = _choose_mini(100.0)
    assert fast["parallel.grad_compression"] == "none" and fast["parallel.sync"] == "step", fast
    for c in (slow, fast):  # what the trainer will apply for parallel.auto
        cfg = load_config(overrides=c | {"model.preset": "mini", "train.batch_size": 8, "train.seq_len": 256})
        assert cfg.parallel.world == 2


def test_exact_methods_win_ties_and_diloco_waits_for_low_utilisation():
    spec = ModelSpec.from_preset("mini", block_size=256)
    for gbps in (0.1, 1.0, 100.0):
        hw = Hardware(2, 1, 100e9, 16e9, gbps * 1e9 / 8, 2e9, 100e-6, 0.0, "cpu")
        rows = plan(spec, hw, 8, 256, "fp32", CPU)
        first = rows[0]
        # No exact row is less than 5% slower than an inexact row ranked above it.
        for r in rows[1:]:
            if r.exact and not first.exact:
                assert r.step_s > first.step_s * 1.05 - 1e-12, (first, r)
        sync = [r for r in rows if r.overrides.get("parallel.sync", "step") == "step"]
        if max(r.utilisation for r in sync) >= 0.85:
            assert first.overrides.get("parallel.sync", "step") == "step"


def test_single_process_and_calibration_free_cpu_plan(monkeypatch, tmp_path):
    # No calibration stored: the CPU constants are the defaults and say so.
    monkeypatch.setenv("STOKER_CACHE", str(tmp_path))
    assert "no calibration" in Constants.for_device("cpu").source
    code, out, err = _cli("--model.preset=debug", "--peak-tflops", "0.1", "--memory-gb", "4", "--seq-len", "64",
                          "--json", str(tmp_path / "rows.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["layout"] == "single process" and "--nproc" not in rows[0]["command"]


def test_auto_trains_with_the_planners_choice_for_a_slow_link(small_data, tmp_path):
    """--parallel.auto=true on 2 processes whose link is declared at 1 Mbit/s: the debug model's
    fp32 gradients (0.3 MB a step) would take seconds against milliseconds of compute, so the
    run must not be plain DDP; the config saved with the run is the choice, and it learns."""
    from conftest import losses, run_train

    out = tmp_path / "auto"
    r = run_train(small_data, out, "--train.steps=8", "--parallel.auto=true", "--parallel.link_gbps=0.001", nproc=2)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("parallel.auto:"))
    assert "of " in line and "GFLOP/s" in line  # compute measured on the model's own shapes
    cfg = load_config(out / "config.toml")
    assert not cfg.parallel.auto and cfg.parallel.world == 2
    got = {"parallel.dp_replicate": cfg.parallel.dp_replicate, "parallel.grad_compression": cfg.parallel.grad_compression,
           "parallel.sync": cfg.parallel.sync}
    assert not _plain_ddp(got), got
    curve = losses(out)
    assert sorted(curve) == list(range(1, 9)) and curve[8] < curve[1]


def test_cpu_cost_per_byte_is_charged_to_ddp_methods_and_can_change_the_choice():
    """What a CPU process loses per byte it sends is not hidden by overlap: each DDP-based row's
    step grows by exactly its bytes on the wire x the cost, FSDP rows not at all (gloo blocks,
    so their time already holds it). At 1 Gbit/s, 2.2 ns/byte (what parallel.auto measured on
    2 emulated hosts) makes fp32 DDP's 93 MB a step cost 0.2 s more, PowerSGD's 4 MB almost
    nothing: the first choice moves from exact DDP to PowerSGD."""
    spec = ModelSpec.from_preset("mini", block_size=256)
    hw = Hardware(2, 1, 70e9, 16e9, 1e9 / 8, 2e9, 176e-6, 0.0, "cpu")
    k0 = dataclasses.replace(CPU, efficiency=0.64, overlap=0.22)
    k1 = dataclasses.replace(k0, comm_cpu_s_per_byte=2.2e-9)
    before = {(r.layout, r.method): r for r in plan(spec, hw, 16, 256, "fp32", k0, 8)}
    after = {(r.layout, r.method): r for r in plan(spec, hw, 16, 256, "fp32", k1, 8)}
    assert before.keys() == after.keys()
    for key, r in after.items():
        grown = r.step_s - before[key].step_s
        if key[0].startswith("DDP"):
            assert grown == pytest.approx(r.wire_bytes * 2.2e-9, rel=1e-9), key
        elif key[0].startswith("FSDP"):
            assert grown == 0, key
    first = lambda rows: (rows[0].layout, rows[0].method)
    assert first(plan(spec, hw, 16, 256, "fp32", k0, 8)) == ("DDP 2", "fp32 grads")
    assert first(plan(spec, hw, 16, 256, "fp32", k1, 8)) == ("DDP 2", "PowerSGD r16")
