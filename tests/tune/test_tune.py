"""`stoker tune` end to end on a small trained model."""

import pytest
import torch

from conftest import assert_curves_close, losses
from stoker.cli import main
from stoker.generate import load_trained
from stoker.tune.adapters import apply_adapter
from stoker.tune.setup import ADAPTER_DIR
from tests.tune.conftest import write_records

COMMON = ["--train.seq_len=32", "--train.batch_size=8", "--train.warmup_steps=2", "--train.eval_every=0",
          "--train.progress=false", "--train.eval_batches=2"]


def tune(base, records, out, method, *extra) -> int:
    return main(["tune", str(base), str(records), "--method", method, "--out", str(out), *COMMON, *extra])


def test_lora_trains_only_the_adapter_and_its_peft_files_give_the_run(tune_base, tmp_path):
    records = write_records(tmp_path / "r.jsonl", 64)
    out = tmp_path / "lora"
    assert tune(tune_base, records, out, "lora", "--train.steps=16", "--train.lr=1e-2", "--tune.lora_rank=4") == 0
    run, tok, step = load_trained(out)
    base, _, _ = load_trained(tune_base)
    assert step == 16
    # The base's weights are untouched; the adapter moved.
    tuned = dict(run.named_parameters())
    for name, p in base.named_parameters():
        assert torch.equal(tuned[name], p), name
    assert all(".lora_" in n for n in set(tuned) - set(dict(base.named_parameters())))
    assert any(n.endswith("lora_B") and p.abs().max() > 0 for n, p in tuned.items())
    curve = losses(out)
    assert sum(curve[s] for s in (13, 14, 15, 16)) < sum(curve[s] for s in (1, 2, 3, 4))  # it learns
    # base + the PEFT-format adapter written beside the checkpoint = the run itself. This GPT-2
    # shape's q/k/v updates travel as one rank-3r update of the fused c_attn (zeros off the
    # diagonal blocks): the same sum in another order, ~1e-7 of the logits' scale.
    apply_adapter(base, out / ADAPTER_DIR)
    idx = torch.tensor([tok.encode("return x\n=")])
    with torch.no_grad():
        ours, theirs = base(idx), run(idx)
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_resumed_tuning_continues_exactly(tune_base, tmp_path):
    records = write_records(tmp_path / "r.jsonl", 64)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert tune(tune_base, records, straight, "lora", "--train.steps=12", "--train.lr=1e-2", "--train.decay_steps=12") == 0
    assert tune(tune_base, records, split, "lora", "--train.steps=6", "--train.lr=1e-2", "--train.decay_steps=12") == 0
    assert tune(tune_base, records, split, "lora", "--train.steps=12", "--train.lr=1e-2", "--train.decay_steps=12") == 0
    assert losses(split) == losses(straight)


def test_prompt_tuning_and_full_fine_tuning_run_and_load(tune_base, tmp_path):
    records = write_records(tmp_path / "r.jsonl", 32)
    assert tune(tune_base, records, tmp_path / "p", "prompt", "--train.steps=6", "--train.lr=3e-2",
                "--tune.virtual_tokens=4", "--tune.prompt_init=first word") == 0
    run, tok, _ = load_trained(tmp_path / "p")
    base, _, _ = load_trained(tune_base)
    apply_adapter(base, tmp_path / "p" / ADAPTER_DIR)
    idx = torch.tensor([tok.encode("return x\n=")])
    with torch.no_grad():
        assert torch.equal(base(idx), run(idx))
    assert run.prompt.n_tokens == 4
    assert tune(tune_base, records, tmp_path / "f", "full", "--train.steps=4", "--train.lr=1e-3") == 0
    full, _, _ = load_trained(tmp_path / "f")
    base, _, _ = load_trained(tune_base)
    changed = [n for n, p in full.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.parameters()))  # every weight trains
    assert not (tmp_path / "f" / ADAPTER_DIR).exists()


def test_tuning_errors_are_one_line(tune_base, tmp_path, capsys):
    records = write_records(tmp_path / "r.jsonl", 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    for args, needle in [([str(tune_base), str(bad)], f"{bad}:2:"),
                         ([str(tune_base), str(records), "--tune.lora_targets=nothing"], "match no linear layer"),
                         ([str(tune_base), str(records), "--train.seq_len=128"], "longer than the model's context"),
                         ([str(tmp_path), str(records)], "not a run directory"),
                         ([str(tune_base), str(records), "--train.seq_len=64", "--method", "prompt"],
                          "exceed the model's context")]:
        assert main(["tune", *args, "--out", str(tmp_path / "o"), "--train.progress=false"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_lora_under_ddp_and_fsdp_follows_one_process(tune_base, tmp_path):
    """Records put different numbers of completion tokens in each rank's share: the loss is
    the mean over all of them (each share weighted by its count), so layouts agree."""
    import os
    import subprocess
    import sys

    records = write_records(tmp_path / "r.jsonl", 64, seed=4)
    args = [str(tune_base), str(records), *COMMON, "--train.steps=6", "--train.lr=1e-2"]
    assert tune(tune_base, records, tmp_path / "one", "lora", "--train.steps=6", "--train.lr=1e-2") == 0
    one = losses(tmp_path / "one")
    for name, extra in [("ddp", []), ("fsdp", ["--parallel.dp_shard=2"])]:
        cmd = [sys.executable, "-m", "stoker", "tune", *args, "--out", str(tmp_path / name), "--nproc", "2", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert_curves_close(losses(tmp_path / name), one, range(1, 7))


def test_a_lora_run_serves_merged_and_a_prompt_run_is_refused(tune_base, tmp_path):
    from stoker.config import ConfigError
    from stoker.serve.models import load_for_serving, parse_models

    records = write_records(tmp_path / "r.jsonl", 32)
    assert tune(tune_base, records, tmp_path / "l", "lora", "--train.steps=4", "--train.lr=1e-2") == 0
    served = load_for_serving(tmp_path / "l")
    run, tok, _ = load_trained(tmp_path / "l")
    idx = torch.tensor([tok.encode("return x\n=")])
    with torch.no_grad():  # W + s B A folded, and oneDNN's kernels: rounding, ~1e-6 of the scale
        assert (served(idx) - run(idx)).abs().max() <= 1e-5 * run(idx).abs().max()
    assert tune(tune_base, records, tmp_path / "p", "prompt", "--train.steps=1", "--tune.virtual_tokens=2") == 0
    with pytest.raises(ConfigError, match="prompt-tuning run"):
        parse_models([str(tmp_path / "p")])
