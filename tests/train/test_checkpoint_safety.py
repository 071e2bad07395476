"""Loading a checkpoint from elsewhere never runs code; a damaged one is named and the previous
complete one is used."""

import io
import json
import os
import pickle
import shutil

import pytest
import torch

from conftest import losses, train_here
from stoker.cli import main
from stoker.errors import RunError
from stoker.generate import export, load_trained
from stoker.train.checkpoint import _manifest, _SafePlanner, find_checkpoint, read_metadata


@pytest.fixture(scope="module")
def two_ckpts(small_data, tmp_path_factory):
    """A run with checkpoints at steps 3 and 6, trained once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("ck") / "run"
    train_here(small_data, out, "--train.steps=6", "--train.ckpt_every=3", "--train.keep_last=2")
    return out


@pytest.fixture
def run(two_ckpts, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(two_ckpts, dst)
    (dst / ".lock").unlink()
    return dst


class _Touch:
    """Pickles to a call of os.system: what an attacker would put in a checkpoint file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _reseal(ckpt):
    """Record the files' current checksums, as an attacker who crafts a whole checkpoint would."""
    state = json.loads((ckpt / "trainer.json").read_text())
    state["files"] = _manifest(ckpt)
    (ckpt / "trainer.json").write_text(json.dumps(state))


def test_crafted_metadata_runs_no_code(run, tmp_path, capsys):
    pwned = tmp_path / "pwned"
    newest = run / "checkpoints" / "step_00000006"
    (newest / ".metadata").write_bytes(pickle.dumps(_Touch(pwned)))
    _reseal(newest)
    model, _, step = load_trained(run)
    assert not pwned.exists()
    assert step == 3  # the crafted checkpoint was refused and the previous one used
    err = capsys.readouterr().err
    assert "step_00000006" in err and ".metadata" in err and "posix.system" in err
    # The same through the CLI's readers: export, and a resumed training run.
    export(run, tmp_path / "m.safetensors")
    assert not pwned.exists()


def test_crafted_bytes_entry_runs_no_code(run, small_data, tmp_path):
    """A byte entry (the optimizer's plain values) pointing at a pickle that calls os.system."""
    pwned = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "step_00000006"
    md = read_metadata(ckpt / ".metadata")
    key = next(k for k in md.storage_data if k.fqn.startswith("optim.param_groups") and k.fqn.endswith(".lr"))
    evil = io.BytesIO()
    torch.save(_Touch(pwned), evil)
    data = ckpt / md.storage_data[key].relative_path
    md.storage_data[key].offset, md.storage_data[key].length = data.stat().st_size, len(evil.getvalue())
    with data.open("ab") as f:
        f.write(evil.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(ckpt)
    with pytest.raises(pickle.UnpicklingError):
        _SafePlanner().load_bytes(None, io.BytesIO(evil.getvalue()))
    r = train_here(small_data, run, "--train.steps=8", "--train.decay_steps=6", check=False)
    assert not pwned.exists()
    assert r.returncode == 1 and "step_00000006" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def _truncate(ckpt):
    p = ckpt / "__0_0.distcp"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "__0_0.distcp"


def _garbage_metadata(ckpt):
    (ckpt / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    return ".metadata"


def _bad_trainer_json(ckpt):
    (ckpt / "trainer.json").write_text('{"step": 6, "rng": [')
    return "trainer.json"


def _flipped_block(ckpt):
    p = ckpt / "__0_0.distcp"
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 4096] = bytes(b ^ 0xFF for b in data[mid: mid + 4096])  # same size, other bytes
    p.write_bytes(bytes(data))
    return "__0_0.distcp"


@pytest.mark.parametrize("damage", [_truncate, _garbage_metadata, _bad_trainer_json, _flipped_block],
                         ids=["truncated_distcp", "garbage_metadata", "bad_trainer_json", "flipped_block"])
def test_damaged_checkpoint_is_named_and_the_previous_used(run, damage, capsys):
    name = damage(run / "checkpoints" / "step_00000006")
    _, _, step = load_trained(run)
    assert step == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000006" in err[0] and name in err[0]


def test_resume_sets_a_damaged_checkpoint_aside_and_continues_exactly(run, small_data, tmp_path):
    _flipped_block(run / "checkpoints" / "step_00000006")
    r = train_here(small_data, run, "--train.steps=6")
    assert "step_00000006 is damaged" in r.stderr
    assert (run / "checkpoints" / "damaged_step_00000006").is_dir()
    # Resumed from step 3, the curve is the one of an uninterrupted run.
    ref = tmp_path / "ref"
    train_here(small_data, ref, "--train.steps=6")
    assert losses(run) == losses(ref)
    assert find_checkpoint(run)[0].name == "step_00000006"


def test_no_checkpoint_verifies_is_one_line(run, capsys):
    for ckpt in (run / "checkpoints").iterdir():
        _garbage_metadata(ckpt)
    assert main(["eval", str(run)]) == 2
    assert "no complete checkpoint that verifies" in capsys.readouterr().err


def test_loader_refuses_unverified_direct_load(run):
    from stoker.generate import run_model_config
    from stoker.models.gpt import GPT
    from stoker.train.checkpoint import load_checkpoint

    _truncate(run / "checkpoints" / "step_00000006")
    with pytest.raises(RunError, match="__0_0.distcp"):
        load_checkpoint(run / "checkpoints" / "step_00000006", GPT(run_model_config(run)))
