"""Parallel-layout config errors, the pipeline's stage split, and the safetensors export."""

import itertools
import subprocess
import sys

import pytest
import torch

from stoker.config import ConfigError, load_config
from stoker.models.gpt import GPT, GPTConfig
from stoker.parallel.pipeline import build_stages, split_layers


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, names",
    [
        # 2 x 2 = 4 ranks asked of a 2-process launch: the message names the four sizes and the count.
        (["--parallel.tp=2", "--parallel.dp_shard=2", "--nproc=2"],
         ["parallel.pp=1", "parallel.dp_replicate=1", "parallel.dp_shard=2", "parallel.tp=2", "--nproc 2"]),
        (["--parallel.tp=3"], ["parallel.tp", "3", "heads 4"]),  # debug preset: 4 heads
        (["--parallel.pp=5"], ["parallel.pp", "4 layers"]),
        (["--parallel.pp_schedule=zigzag"], ["parallel.pp_schedule", "interleaved-1f1b"]),
        (["--parallel.activation_checkpoint=some"], ["parallel.activation_checkpoint", "every-K"]),
        (["--parallel.reshard_after_forward=maybe"], ["parallel.reshard_after_forward", "true, false"]),
    ],
    ids=["world_mismatch", "tp_heads", "pp_layers", "schedule", "ac", "reshard"],
)
def test_layout_config_errors_exit_2(tmp_path, args, names):
    r = run_cli("train", "--model.preset=debug", f"--train.out_dir={tmp_path / 'run'}",
                f"--data.dir={tmp_path / 'nodata'}", *args)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    for n in names:
        assert n in line, line


def test_layout_checks_in_python():
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(overrides={"model.preset": "gpt3-125m", "parallel.tp": 5})  # 12 heads
    with pytest.raises(ConfigError, match="parallel.pp"):
        # 2 ranks x 2 virtual stages = 4 stages > 3 layers
        load_config(overrides={"model.n_layer": 3, "parallel.pp": 2, "parallel.pp_schedule": "interleaved-1f1b"})
    with pytest.raises(ConfigError, match="parallel.pp_microbatches"):
        load_config(overrides={"parallel.pp": 2, "parallel.pp_microbatches": 3, "train.batch_size": 8})
    with pytest.raises(ConfigError, match="reshard_after_forward"):
        load_config(overrides={"parallel.dp_shard": 4, "parallel.reshard_after_forward": "3"})
    cfg = load_config(overrides={"parallel.dp_shard": 4, "parallel.reshard_after_forward": "2"})
    assert cfg.parallel.reshard() == 2 and cfg.parallel.world == 4


def test_toml_accepts_bool_and_int_for_reshard(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[parallel]\ndp_shard = 4\nreshard_after_forward = false\n")
    assert load_config(f).parallel.reshard() is False
    f.write_text("[parallel]\ndp_shard = 4\nreshard_after_forward = 2\n")
    assert load_config(f).parallel.reshard() == 2


def _brute_force_best(costs_first, block, costs_last, n_layer, n_stages):
    """The smallest possible largest stage, over every contiguous split (the reference)."""
    best = None
    for cuts in itertools.combinations(range(1, n_layer), n_stages - 1):
        bounds = [0, *cuts, n_layer]
        stage = [(b - a) * block for a, b in zip(bounds, bounds[1:])]
        stage[0] += costs_first
        stage[-1] += costs_last
        best = max(stage) if best is None else min(best, max(stage))
    return best


@pytest.mark.parametrize("vocab, n_layer, n_stages", [(64, 8, 2), (4096, 8, 2), (4096, 8, 4), (512, 6, 3)])
def test_pipeline_split_is_balanced_by_parameters(vocab, n_layer, n_stages):
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=vocab, block_size=64))
    ranges = split_layers(model, n_stages)
    assert [i for r in ranges for i in r] == list(range(n_layer)) and all(len(r) for r in ranges)
    block = sum(p.numel() for p in model.blocks["0"].parameters())
    first = model.wte.weight.numel() + model.wpe.weight.numel()
    last = model.wte.weight.numel() + sum(p.numel() for p in model.ln_f.parameters())
    got = [len(r) * block + (first if i == 0 else 0) + (last if i == n_stages - 1 else 0) for i, r in enumerate(ranges)]
    assert max(got) == _brute_force_best(first, block, last, n_layer, n_stages)


def test_stage_modules_hold_their_parts_under_the_full_model_names():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_embd=32, n_head=4, vocab_size=64, block_size=16))
    cfg = load_config(overrides={"parallel.pp": 2, "parallel.pp_schedule": "interleaved-1f1b"})
    names = {}
    for rank in range(2):
        for s, m in build_stages(model, cfg.parallel, rank):
            names[s] = {n for n, _ in m.named_parameters()}
    assert sorted(names) == [0, 1, 2, 3]
    full = {n for n, _ in model.named_parameters()}
    assert set().union(*names.values()) == full  # nothing lost, nothing renamed
    assert "wte.weight" in names[0] and "wte.weight" in names[3]  # the tied head's copy
    assert "wpe.weight" in names[0] and not any(n.startswith(("wpe", "ln_f")) for n in names[1] | names[2])


def test_generate_tp_that_does_not_divide_heads_is_refused_before_launch(tmp_path):
    (tmp_path / "model.json").write_text('{"n_layer": 4, "n_embd": 32, "n_head": 4}')
    r = run_cli("generate", str(tmp_path), "--tp", "3")
    assert r.returncode == 2 and "--tp: 3" in r.stderr and "4 heads" in r.stderr and "Traceback" not in r.stderr
