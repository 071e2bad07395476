"""`stoker demo`: the stdlib corpus -> a small trained model -> a sample, in a few minutes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from stoker.config import ConfigError, load_config
from stoker.runs import DEMO_MARK


def _steps_for(minutes: float, cfg) -> int:
    """Steps that fit the time budget, from a timed probe of a few steps of the same model and batch."""
    from stoker.data.prepare import load_meta
    from stoker.models.gpt import set_attention
    from stoker.train.metrics import fastest_attention
    from stoker.train.trainer import build_model, build_optimizer, model_config

    t = cfg.train
    model = build_model(model_config(cfg, load_meta(cfg.data.dir)["vocab_size"]), t.seed, torch.device("cpu"))
    c = model.cfg
    set_attention(model, fastest_attention(t.batch_size, c.n_head, c.kv_heads, t.seq_len, c.head_dim, t.dtype,
                                           torch.device("cpu"))[0])  # as the run will choose
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, model.cfg.vocab_size, (t.batch_size, t.seq_len + 1))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bf16"):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    per_step = sorted(times[2:])[1] * 1.2  # a low median of the warm steps; evals and a busy machine add to it
    return max(20, int(minutes * 60 / per_step))


def _fastest_dtype() -> tuple[str, str]:
    """bf16 autocast where the hardware runs bf16 matmuls faster than fp32 (GPUs, CPUs with AMX);
    CPUs without bf16 units emulate it, several times slower than fp32."""
    from stoker.train.metrics import peak_flops

    if torch.cuda.is_available():
        return "bf16", "GPU"
    cpu = torch.device("cpu")
    bf16, fp32 = peak_flops(cpu, "bf16"), peak_flops(cpu, "fp32")
    verdict = "bf16" if bf16 > fp32 else "fp32"
    return verdict, f"measured matmul peak: bf16 {bf16 / 1e12:.2f}, fp32 {fp32 / 1e12:.2f} TFLOP/s"


def _fresh_out_dir(data_dir: Path, out_dir: Path) -> None:
    """Empty `out_dir` for a new demo run, or ConfigError when it is not the demo's to empty."""
    data, out = data_dir.resolve(), out_dir.resolve()
    if out == data or out in data.parents or data in out.parents:
        raise ConfigError(f"--out-dir {str(out_dir)!r} and --data-dir {str(data_dir)!r} overlap; "
                          "give the run a directory of its own")
    if out_dir.is_file() or out_dir.is_symlink():
        raise ConfigError(f"--out-dir {str(out_dir)!r} is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / DEMO_MARK).is_file():  # the demo deletes only what it made
            raise ConfigError(f"--out-dir {str(out_dir)!r} is not empty and was not made by `stoker demo`; "
                              "choose a new or empty directory")
        shutil.rmtree(out_dir)  # the demo always starts from scratch
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARK).write_text("made by `stoker demo`; it deletes and rebuilds this directory on each run\n")


def demo(data_dir: str = "data/stdlib", out_dir: str = "runs/demo", minutes: float = 3.0) -> dict:
    from rich.console import Console

    from stoker.cli import train_table
    from stoker.data.prepare import prepare, summary_table
    from stoker.generate import generate
    from stoker.train.trainer import train

    console = Console()
    _fresh_out_dir(Path(data_dir), Path(out_dir))  # before any work: a refusal costs nothing
    if not (Path(data_dir) / "meta.json").is_file():
        console.print(f"[bold]1/3 prepare[/]: the Python standard library's sources -> {data_dir}")
        console.print(summary_table(prepare(None, data_dir)))
    else:
        console.print(f"[bold]1/3 prepare[/]: reusing {data_dir}")
    dtype, why = _fastest_dtype()
    overrides = {
        "model.preset": "tiny", "data.dir": data_dir, "train.out_dir": out_dir, "train.dtype": dtype,
        "train.batch_size": 16, "train.seq_len": 256, "train.lr": 3e-3, "train.warmup_steps": 30,
        "train.eval_every": 50, "train.eval_batches": 8, "train.ckpt_every": 0,
    }
    cfg = load_config(overrides=overrides)
    steps = _steps_for(minutes, cfg)
    cfg = load_config(overrides=dict(overrides, **{"train.steps": steps}))
    console.print(f"[bold]2/3 train[/]: preset tiny, {dtype} ({why}), {steps} steps (~{minutes:g} min) -> {out_dir}")
    summary = train(cfg)
    console.print(train_table(summary))
    prompt = "def fibonacci(n):\n"
    console.print("[bold]3/3 generate[/]: prompt " + repr(prompt))
    text = generate(out_dir, prompt, max_new_tokens=200, temperature=0.7, top_k=40, seed=0)
    console.print(prompt + text, markup=False, highlight=False)
    return summary
