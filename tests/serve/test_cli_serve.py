import os
import re
import subprocess
import sys

import httpx
import pytest

from stoker.cli import main
from stoker.data.tokenizer import Tokenizer
from stoker.serve.engine import Engine, SamplingParams
from stoker.serve.models import load_for_serving

PARAMS = {"max_tokens": 12, "temperature": 1.0, "seed": 21}


@pytest.fixture(scope="module")
def lru_server(serve_runs):
    """`stoker serve` as users run it: both models, one resident at a time, any free port."""
    cmd = [sys.executable, "-m", "stoker", "serve", str(serve_runs[0]), f"b={serve_runs[1]}", "--port", "0",
           "--max-loaded", "1", "--max-batch", "4", "--dtype", "fp32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    assert m, line + proc.stderr.read()
    yield m.group(1)
    proc.terminate()
    proc.wait(30)


def expected(run_dir, prompt: str) -> str:
    tok = Tokenizer.load(run_dir)
    engine = Engine(load_for_serving(run_dir), tok, max_batch=4)
    try:
        return engine.generate(tok.encode(prompt), SamplingParams(**PARAMS)).text
    finally:
        engine.close()


def test_max_loaded_one_alternates_loads_and_answers_right(lru_server, serve_runs):
    want = {"alpha": expected(serve_runs[0], "def "), "b": expected(serve_runs[1], "def ")}
    assert want["alpha"] != want["b"]  # the two models tell themselves apart
    assert httpx.get(f"{lru_server}/health").json()["loaded"] == []
    for name in ["alpha", "b", "alpha", "b", "b"]:
        r = httpx.post(f"{lru_server}/v1/completions", json={"model": name, "prompt": "def ", **PARAMS}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[name]
        assert httpx.get(f"{lru_server}/health").json()["loaded"] == [name]
    metrics = httpx.get(f"{lru_server}/metrics").text
    loads = dict(re.findall(r'^stoker_model_loads_total\{model="(\w+)"\} (\S+)$', metrics, re.M))
    assert loads == {"alpha": "2.0", "b": "2.0"}  # the repeated "b" reused the resident model


def test_serve_user_errors_exit_2(tmp_path, serve_runs, capsys, monkeypatch):
    for args, needle in [([str(tmp_path)], "model.json"), ([str(serve_runs[0]), "--max-batch", "0"], "--max-batch"),
                         ([f"x={serve_runs[0]}", f"x={serve_runs[1]}"], "twice"),
                         ([str(serve_runs[0]), "--api-key", ""], "--api-key"),
                         ([str(serve_runs[0]), "--max-body-mb", "0"], "--max-body-mb"),
                         ([str(serve_runs[0]), "--kv-keep-s", "-1"], "--kv-keep-s"),
                         ([str(serve_runs[0]), "--kv-keep-s", "nan"], "--kv-keep-s"),
                         ([str(serve_runs[0]), "--kv-keep-s", "inf"], "--kv-keep-s")]:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("STOKER_API_KEY", "")  # set but empty: a mistake, not "no key"
    assert main(["serve", str(serve_runs[0])]) == 2
    assert "STOKER_API_KEY" in capsys.readouterr().err


def test_auto_dtype_is_the_one_whose_decode_linears_run_faster(monkeypatch):
    """--dtype auto on a CPU follows the serving-shaped probe (not the matmul peak), at the
    server's --max-batch rows; explicit dtypes are taken as given, a wrong one is refused."""
    import torch

    from stoker.config import ConfigError
    from stoker.serve import server

    asked = []
    for fast in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(server, "decode_linear_speed",
                            lambda dtype, rows, fast=fast: asked.append(rows) or (2.0 if dtype == fast else 1.0))
        assert server.serve_dtype("auto", 32) == {torch.bfloat16: "bf16", torch.float32: "fp32"}[fast]
    assert set(asked) == {32}
    assert server.serve_dtype("fp32", 32) == "fp32" and server.serve_dtype("bf16", 32) == "bf16"
    with pytest.raises(ConfigError, match="--dtype"):
        server.serve_dtype("fp16", 32)


def test_the_dtype_probe_times_packed_linears_in_the_dtype_asked(monkeypatch):
    """The probe runs the serving path's packed linear layers in the dtype it is asked about
    (a probe of the wrong layer or dtype would decide on something the server never runs)."""
    import torch

    from stoker.models import gpt
    from stoker.serve.server import decode_linear_speed

    seen = []
    forward = gpt.PackedLinear.forward
    monkeypatch.setattr(gpt.PackedLinear, "forward", lambda self, x, gelu=False: seen.append(
        (x.dtype, self.weight.dtype, x.shape[0])) or forward(self, x, gelu))
    for dtype in (torch.float32, torch.bfloat16):
        seen.clear()
        speed = decode_linear_speed(dtype, 4, seconds=0.01)
        assert speed > 0 and seen and set(seen) == {(dtype, dtype, 4)}
