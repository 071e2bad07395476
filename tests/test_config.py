import dataclasses
import subprocess
import sys

import pytest
from conftest import losses, run_train

from stoker.cli import main
from stoker.config import Config, ConfigError, load_config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "override, names",
    [
        ("--train.foo=1", ["train.foo", "valid"]),  # unknown field
        ("--bogus.steps=1", ["bogus.steps"]),  # unknown section
        ("--train.steps=abc", ["train.steps", "int"]),  # wrong type
        ("--train.dtype=fp16", ["train.dtype", "bf16"]),  # bad value, lists the valid ones
        ("--model.preset=huge", ["model.preset", "gpt3-175b"]),
        ("--train.batch_size=0", ["train.batch_size", ">= 1"]),
    ],
)
@pytest.mark.parametrize("command", ["train", "config"])
def test_cli_config_errors_exit_2_with_one_line(command, override, names, tmp_path):
    r = run_cli(command, override, f"--train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in names:
        assert n in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was started


def test_toml_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 'ten'\n")
    r = run_cli("train", str(bad))
    assert r.returncode == 2 and "train.steps" in r.stderr
    bad.write_text("[train\n")
    r = run_cli("train", str(bad))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = run_cli("train", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr


def test_missing_data_dir_is_a_user_error(tmp_path):
    r = run_cli("train", f"--data.dir={tmp_path / 'nodata'}", f"--train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    assert "data.dir" in r.stderr and "nodata" in r.stderr and "Traceback" not in r.stderr


def test_toml_then_overrides_and_round_trip(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\npreset = "tiny"\n[train]\nsteps = 7\nlr = 1\n')
    cfg = load_config(f, ["--train.steps=9", "train.seed=3"])
    assert (cfg.model.preset, cfg.train.steps, cfg.train.seed) == ("tiny", 9, 3)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    cfg.save(tmp_path / "out.toml")
    assert load_config(tmp_path / "out.toml") == cfg


def test_batch_must_divide_over_data_parallel():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(overrides={"train.batch_size": 6, "parallel.dp_shard": 4})


def test_batch_that_the_launched_processes_cannot_split_fails_before_launch(tmp_path):
    # With no parallel sizes set, --nproc 4 means 4 DDP replicas: 6 sequences do not split.
    r = run_cli("train", "--train.batch_size=6", "--nproc=4", f"--train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "train.batch_size" in r.stderr and "Traceback" not in r.stderr


def _fields():
    return [(sec.name, f) for sec in dataclasses.fields(Config) for f in dataclasses.fields(sec.default_factory)]


def _shown(v) -> str:
    """A default as the help shows it: its TOML spelling, or (unset)."""
    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if isinstance(v, str) else repr(v)


def test_train_help_lists_every_key_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for sec, f in _fields():
        key = f"{sec}.{f.name}"
        assert f.metadata.get("help", "").strip(), f"{key} has no help text"
        line = next((l for l in lines if l.split(" = ")[0].strip() == key), None)
        assert line is not None, f"{key} missing from stoker train --help"
        assert line.split(" = ", 1)[1].startswith(_shown(f.default) + " "), line
        assert f.metadata["help"].split()[0] in line  # the meaning starts on the key's own line


def test_config_command_prints_toml_that_loads_back_equal(tmp_path, capsys):
    src = tmp_path / "c.toml"
    src.write_text('[model]\npreset = "tiny"\nn_layer = 3\n[parallel]\nreshard_after_forward = false\n')
    overrides = ["--train.lr=3e-4", "--train.micro_batch_size", "3", "--parallel.dp_shard=2", "--train.compile=true"]
    assert main(["config", str(src), *overrides]) == 0
    out = tmp_path / "resolved.toml"
    out.write_text(capsys.readouterr().out)
    expected = load_config(src, ["--train.lr=3e-4", "--train.micro_batch_size=3", "--parallel.dp_shard=2",
                                 "--train.compile=true"])
    assert expected != Config().validate()  # the file and overrides did change something
    assert load_config(out) == expected


@pytest.mark.parametrize("key", [f"{sec}.{f.name}" for sec, f in _fields() if f.type == "float"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_rejected(key, value):
    with pytest.raises(ConfigError, match=f"^{key}: must be a finite number"):
        load_config(overrides={key: value})


def test_nan_learning_rate_is_one_line_exit_2(tmp_path):
    r = run_cli("train", "--train.lr=nan", f"--train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["stoker: error: train.lr: must be a finite number, "
                                                                   "got nan"], r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, micro, count",
    [
        ({"train.micro_batch_size": 3}, 2, 8),  # 16 sequences: the largest divisor up to 3
        ({}, 16, 1),  # 0: the whole per-process batch
        ({"train.micro_batch_size": 3, "parallel.dp_replicate": 4}, 2, 2),  # 4 per process
        ({"train.micro_batch_size": 3, "train.batch_size": 7}, 1, 7),
        ({"train.micro_batch_size": 32}, 16, 1),  # a bound above the batch is the batch
        # Pipelines: count >= stages (1f1b) and micro <= train.micro_batch_size; default 2 x stages.
        ({"parallel.pp": 2}, 4, 4),
        ({"parallel.pp": 2, "train.batch_size": 6}, 1, 6),  # 4 does not divide 6: the next count that does
        ({"parallel.pp": 2, "train.micro_batch_size": 3}, 2, 8),
        ({"parallel.pp": 2, "train.micro_batch_size": 8}, 8, 2),
        ({"parallel.pp": 2, "train.batch_size": 2}, 1, 2),
        ({"parallel.pp": 2, "parallel.pp_microbatches": 8, "train.micro_batch_size": 3}, 2, 8),  # explicit wins
        # interleaved over pp=2 (4 stages): 5 micro-batches of 2 are 2 rounds with one left over,
        # which torch's schedule refuses; 10 of 1 are 5 whole rounds.
        ({"parallel.pp": 2, "parallel.pp_schedule": "interleaved-1f1b", "train.batch_size": 10,
          "train.micro_batch_size": 2}, 1, 10),
    ],
)
def test_micro_batch_size_is_an_upper_bound(overrides, micro, count):
    split = load_config(overrides=overrides).batch_split()
    assert (split.micro, split.count, split.micro * split.count) == (micro, count, split.local)
    cap = overrides.get("train.micro_batch_size", 0)
    # Say what was used whenever it is not the micro-batch size asked for.
    assert bool(split.note) == bool(cap and micro != cap)
    if split.note:
        assert "train.micro_batch_size" in split.note and str(micro) in split.note


def test_pipeline_micro_batch_counts_the_schedule_cannot_run_are_config_errors():
    # 1f1b needs a micro-batch per stage: 2 sequences cannot feed 4 stages.
    with pytest.raises(ConfigError, match="^train.batch_size: .*1f1b needs at least one micro-batch per stage"):
        load_config(overrides={"parallel.pp": 4, "train.batch_size": 2})
    with pytest.raises(ConfigError, match="^parallel.pp_microbatches: 1 .*1f1b"):
        load_config(overrides={"parallel.pp": 2, "parallel.pp_microbatches": 1})
    with pytest.raises(ConfigError, match="^parallel.pp_microbatches: 3 does not divide"):
        load_config(overrides={"parallel.pp": 2, "parallel.pp_microbatches": 3})


def test_train_with_a_micro_batch_size_that_does_not_divide_the_batch(small_data, tmp_path):
    r = run_train(small_data, tmp_path / "run", "--train.batch_size=16", "--train.micro_batch_size=3",
                  "--train.steps=2")
    assert "train.micro_batch_size=3: micro-batches of 2" in r.stdout, r.stdout
    assert sorted(losses(tmp_path / "run")) == [1, 2]
