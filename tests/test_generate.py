import math
import subprocess
import sys

import pytest
import torch

from conftest import run_train
from stoker.generate import evaluate, generate, load_trained, sample


@pytest.fixture(scope="module")
def run_dir(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    run_train(small_data, out, "--train.steps=30")
    return out


def test_eval_reports_a_trained_loss(run_dir):
    r = evaluate(run_dir, batches=4)
    assert r["step"] == 30
    assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    assert r["val_loss"] < math.log(512) - 0.5  # below the uniform guess over the 512-token vocabulary (init loss)
    cli = subprocess.run([sys.executable, "-m", "stoker", "eval", str(run_dir), "--batches", "4"],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and f"{r['val_loss']:.4f}" in cli.stdout


def test_greedy_sampling_is_argmax_of_the_model(run_dir):
    model, tok, _ = load_trained(run_dir)
    prompt = tok.encode("def ")
    got = sample(model, prompt, 12, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # reference: full forward pass each step, pick the most likely token
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = ids[len(prompt):]
    if tok.eot_id in expected:
        expected = expected[: expected.index(tok.eot_id)]
    assert got == expected


def test_seeded_sampling_is_reproducible(run_dir):
    a = generate(run_dir, "import ", max_new_tokens=30, seed=1)
    assert a == generate(run_dir, "import ", max_new_tokens=30, seed=1)
    assert a != generate(run_dir, "import ", max_new_tokens=30, seed=2)


def test_cli_generate_and_its_errors(run_dir, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "stoker", "generate", str(run_dir), "--prompt", "class ",
                         "--max-new-tokens", "5", "--temperature", "0"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("class ")
    bad = subprocess.run([sys.executable, "-m", "stoker", "generate", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "model.json" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "stoker", "generate", str(run_dir), "--temperature", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--temperature" in bad.stderr


def test_export_writes_one_safetensors_file_with_the_same_model(run_dir, tmp_path):
    from safetensors import safe_open

    from stoker.generate import load_exported

    dest = tmp_path / "m.safetensors"
    cli = subprocess.run([sys.executable, "-m", "stoker", "export", str(run_dir), "--out", str(dest)],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    with safe_open(str(dest), framework="pt") as f:
        keys = set(f.keys())
    assert "blocks.0.attn.q_proj.weight" in keys and len({"wte.weight", "lm_head.weight"} & keys) == 1  # tied: once
    ref, _, _ = load_trained(run_dir)
    got = load_exported(dest)
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(got(ids), ref(ids))  # the same weights, bit for bit
    assert got.lm_head.weight is got.wte.weight
    bad = subprocess.run([sys.executable, "-m", "stoker", "export", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "none" in bad.stderr and "Traceback" not in bad.stderr
