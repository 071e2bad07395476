"""One-process training run: what the run directory holds, and misuse of it."""

import json
import math

from conftest import losses, run_train
from stoker.config import load_config
from stoker.train.schedule import lr_at


def test_run_directory_contents(small_data, tmp_path):
    out = tmp_path / "run"
    run_train(small_data, out, "--train.steps=12", "--train.eval_every=4", "--train.ckpt_every=3",
              "--train.keep_last=2")
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s", "mfu"} <= r.keys() for r in train)
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in train)
    assert [r["step"] for r in evals] == [4, 8, 12] and all(math.isfinite(r["val_loss"]) for r in evals)
    cfg = load_config(out / "config.toml")
    assert cfg.train.steps == 12 and cfg.data.dir == str(small_data)
    # The logged learning rate is the schedule's (warmup then cosine), step by step.
    assert [r["lr"] for r in train] == [lr_at(s, cfg.train) for s in range(12)]
    assert (out / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000009", "step_00000012"]  # keep_last=2 of 3, 6, 9, 12


def test_rerun_of_finished_run_trains_nothing(small_data, tmp_path):
    out = tmp_path / "run"
    run_train(small_data, out, "--train.steps=4")
    before = losses(out)
    r = run_train(small_data, out, "--train.steps=4")
    assert "already at step 4" in r.stdout
    assert losses(out) == before


def test_resume_with_another_model_shape_is_a_user_error(small_data, tmp_path):
    out = tmp_path / "run"
    run_train(small_data, out, "--train.steps=2")
    r = run_train(small_data, out, "--train.steps=4", "--model.n_embd=64", check=False)
    assert r.returncode == 2 and "n_embd 32 -> 64" in r.stderr and "Traceback" not in r.stderr


def test_resume_with_another_batch_size_is_a_user_error(small_data, tmp_path):
    out = tmp_path / "run"
    run_train(small_data, out, "--train.steps=2", "--train.decay_steps=4")
    r = run_train(small_data, out, "--train.steps=4", "--train.decay_steps=4", "--train.batch_size=4", check=False)
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr
