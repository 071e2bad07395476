"""Tuning methods on one task: accuracy before and after, trained parameters, memory, time.

    python benchmarks/tune.py --preset tiny --base-steps 300 --steps 300

One run: a base model (trained here on data/stdlib when --base has no checkpoint), the
generated first-word task (stoker.tune.examples: 2000 training records, 200 held out), then
`stoker tune` with each method of --methods from the same base, each in its own process (its
peak resident memory is its own), and `stoker eval` of the base and of each result on the held-out records:
completion loss and exact match of greedy completions. Prints a table and writes JSON
(default runs/bench/tune.json). Then, with --serve-adapters N (default 8), one server with N LoRA
adapters of the base against the base alone at 32 concurrent requests
(benchmarks/serve_adapters.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

CHILD = """
import json, resource, sys, time
from stoker.config import load_config
from stoker.train.trainer import train
t0 = time.perf_counter()
s = train(load_config(None, sys.argv[1:]))
print("RESULT " + json.dumps({"summary": s, "wall_s": time.perf_counter() - t0,
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(cmd: list[str], threads: int) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def evaluate(run_dir: Path, records: Path, threads: int) -> dict:
    import re

    out = run([sys.executable, "-m", "stoker", "eval", str(run_dir), "--data", str(records)], threads)
    m = re.search(r"completion loss (\S+) nats/token, exact match (\S+)%", out)
    return {"completion_loss": float(m.group(1)), "exact_match": float(m.group(2)) / 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="run directory of the base (default runs/bench/tune-<preset>)")
    ap.add_argument("--preset", default="tiny", help="the base's shape, when it is trained here")
    ap.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--base-steps", type=int, default=300, help="training steps of the base, when trained here")
    ap.add_argument("--data", type=Path, default=Path("data/stdlib"), help="prepared data for the base")
    ap.add_argument("--methods", default="lora,prompt,full")
    ap.add_argument("--steps", type=int, default=300, help="tuning steps of each method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", default="lora=3e-3,prompt=3e-2,full=3e-4", help="learning rate per method")
    ap.add_argument("--lora-rank", type=int, default=8, help="tune.lora_rank of the LoRA run")
    ap.add_argument("--lora-targets", default=None, help="tune.lora_targets of the LoRA run (default: every projection)")
    ap.add_argument("--serve-adapters", type=int, default=8, help="then serve this many LoRA adapters of the base "
                    "at once against the base alone (benchmarks/serve_adapters.py; 0: skip)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/tune.json"))
    args = ap.parse_args()

    root = Path("runs/bench")
    base = args.base or root / f"tune-{args.preset}{f'-{args.n_layer}l' if args.n_layer else ''}"
    if not (args.data / "meta.json").is_file():
        run([sys.executable, "-m", "stoker", "prepare", "--out", str(args.data)], args.threads)
    if not (base / "checkpoints").is_dir():
        print(f"training the base {base} ({args.preset}, {args.base_steps} steps)", flush=True)
        run([sys.executable, "-m", "stoker", "train", f"--model.preset={args.preset}", f"--data.dir={args.data}",
             *([f"--model.n_layer={args.n_layer}"] if args.n_layer else []), f"--train.steps={args.base_steps}",
             "--train.seq_len=128", "--train.batch_size=16", f"--train.dtype={args.dtype}", "--train.eval_every=0",
             "--train.progress=false", f"--train.out_dir={base}"], args.threads)
    from stoker.tune.examples import write

    task = root / "tune-first-word"
    train_path, eval_path = write("first-word", task)
    rows = {"base": {"method": "base (no tuning)", **evaluate(base, eval_path, args.threads)}}
    print(f"  base: exact match {rows['base']['exact_match']:.1%}", flush=True)
    lrs = dict(kv.split("=") for kv in args.lr.split(","))
    for method in args.methods.split(","):
        out = root / f"tune-{base.name}-{method}"
        if out.exists():
            import shutil

            shutil.rmtree(out)  # a fresh run each time (a directory this script made)
        overrides = [f"--model.init_from={base}", f"--tune.method={method}", f"--tune.data={train_path}",
                     f"--train.out_dir={out}", f"--train.steps={args.steps}", f"--train.batch_size={args.batch_size}",
                     f"--train.seq_len={args.seq_len}", f"--train.lr={lrs[method]}", f"--train.dtype={args.dtype}",
                     "--train.warmup_steps=20", "--train.eval_every=0", "--train.progress=false",
                     "--train.ckpt_every=0", "--tune.virtual_tokens=16", f"--tune.lora_rank={args.lora_rank}",
                     *([f"--tune.lora_targets={args.lora_targets}"] if args.lora_targets else [])]
        res = json.loads(run([sys.executable, "-c", CHILD, *overrides], args.threads).split("RESULT ", 1)[1])
        s = res["summary"]
        rows[method] = {"method": method, "trainable_params": s["trainable_params"], "params": s["params"],
                        "trainable_share": s["trainable_params"] / s["params"], "peak_rss_bytes": res["peak_rss_bytes"],
                        "state_bytes": sum(s["memory_per_rank"][0][k] for k in ("params", "grads", "optimizer")),
                        "wall_s": res["wall_s"], "tokens_per_s": s["tokens_per_s"],
                        **evaluate(out, eval_path, args.threads)}
        print(f"  {method}: exact match {rows[method]['exact_match']:.1%}", flush=True)
    table = Table(title=f"tuning {base.name} on first-word ({args.steps} steps x {args.batch_size} records, {args.dtype})")
    for col in ("method", "trained params", "exact match", "completion loss", "peak RSS", "params+grads+Adam",
                "time", "tokens/s"):
        table.add_column(col, justify="right")
    for r in rows.values():
        t = "trainable_params" in r
        table.add_row(r["method"], f"{r['trainable_params']:,} ({r['trainable_share']:.2%})" if t else "",
                      f"{r['exact_match']:.1%}", f"{r['completion_loss']:.3f}",
                      f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB" if t else "",
                      f"{r['state_bytes'] / 2**20:,.0f} MiB" if t else "", f"{r['wall_s']:.0f} s" if t else "",
                      f"{r['tokens_per_s']:,.0f}" if t else "")
    Console().print(table)
    serving = None
    if args.serve_adapters:
        out = args.out.with_name(args.out.stem + "_serve.json")
        cmd = [sys.executable, str(Path(__file__).with_name("serve_adapters.py")), "--run", str(base), "--adapters",
               str(args.serve_adapters), "--rank", str(args.lora_rank), "--dtype", args.dtype, "--out", str(out),
               *(["--targets", args.lora_targets] if args.lora_targets else [])]
        print(run(cmd, 1), flush=True)
        serving = json.loads(out.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "serving": serving}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
