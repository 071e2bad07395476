import math
import shutil
import subprocess
import sys
import tomllib

import pytest
import tomli_w
import torch

from conftest import run_train
from stoker import cli
from stoker.data.prepare import prepare
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


def cli_error(argv: list[str], capsys) -> str:
    """The CLI, in this process, failing as a user error: exit 2 and one line, no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("stoker: error: ") and err.count("\n") == 1, err
    return err


def copy_run(run_dir, dest, data_dir=None):
    shutil.copytree(run_dir, dest)
    if data_dir is not None:
        cfg = tomllib.loads((dest / "config.toml").read_text())
        cfg["data"]["dir"] = str(data_dir)
        (dest / "config.toml").write_text(tomli_w.dumps(cfg))
    return dest


def test_eval_names_a_missing_data_dir_and_takes_data_from_elsewhere(run_dir, small_data, tmp_path, capsys):
    moved = copy_run(run_dir, tmp_path / "run", data_dir=tmp_path / "gone")
    err = cli_error(["eval", str(moved)], capsys)
    assert str(tmp_path / "gone") in err and "--data" in err
    assert cli.main(["eval", str(moved), "--data", str(small_data), "--batches", "2"]) == 0
    assert f"{evaluate(run_dir, batches=2)['val_loss']:.4f}" in capsys.readouterr().out
    # Data of another tokenizer would be scored without complaint, and wrongly.
    (tmp_path / "s").mkdir()
    for i in range(3):
        (tmp_path / "s" / f"{i}.txt").write_text(f"other text {i} " * 40)
    prepare([str(tmp_path / "s")], tmp_path / "other", vocab_size=300, progress=False)
    assert "another tokenizer" in cli_error(["eval", str(moved), "--data", str(tmp_path / "other")], capsys)
    assert "--batches" in cli_error(["eval", str(run_dir), "--batches", "0"], capsys)


def test_run_without_its_tokenizer_is_a_user_error(run_dir, tmp_path, capsys):
    broken = copy_run(run_dir, tmp_path / "run")
    (broken / "tokenizer.json").unlink()
    for argv in (["generate", str(broken), "--max-new-tokens", "2"], ["eval", str(broken), "--batches", "1"]):
        assert str(broken / "tokenizer.json") in cli_error(argv, capsys)
