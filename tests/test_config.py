import subprocess
import sys

import pytest

from stoker.config import ConfigError, load_config


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
def test_cli_config_errors_exit_2_with_one_line(override, names, tmp_path):
    r = run_cli("train", override, f"--train.out_dir={tmp_path / 'run'}")
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
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(overrides={"train.batch_size": 8, "train.micro_batch_size": 3})
