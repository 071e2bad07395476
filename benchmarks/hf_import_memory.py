"""Peak memory of `stoker import` on a random Llama model of over 1B parameters (Llama 3.2
1B's shape), against the bytes of its weights and of its largest file.

The model is built with transformers (random weights, nothing downloaded), saved as sharded
safetensors, then imported by `stoker import` in a process of its own, whose peak resident
memory (getrusage's ru_maxrss) is compared with that of a process that only imports the same
modules (the baseline, in the same run):

    python benchmarks/hf_import_memory.py --out benchmarks/results/hf_import_memory.json

The target: peak minus baseline at most the weights plus the largest file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(argv: list[str]) -> tuple[int, float, float]:
    """(exit code, peak RSS in bytes, seconds) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"{' '.join(argv[:4])} failed: {p.stderr.read().decode()[-2000:]}")
    return p.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def build(dest: Path, preset: str, shard: str) -> int:
    """A random model of `preset`'s shape in bf16, saved as transformers saves one; its parameter count."""
    import torch
    import transformers

    from stoker.data.prepare import default_sources
    from stoker.data.tokenizer import train_bpe
    from stoker.models.gpt import GPTConfig
    from stoker.models.hf import hf_config

    cfg = hf_config(GPTConfig.from_preset(preset))
    cfg.pop("architectures")
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest, safe_serialization=True, max_shard_size=shard)
    del model
    texts = [p.read_text() for p in sorted((default_sources()[0] / "json").glob("*.py"))]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 400), eos_token="<|endoftext|>")
    tok.save_pretrained(dest)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-1b", help="the shape to build (default llama3-1b: 1.24B parameters)")
    ap.add_argument("--shard", default="1GB", help="the largest safetensors file transformers writes (default 1GB)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # the child that builds the model
    args = ap.parse_args()
    if args.build:
        print(build(Path(args.build), args.preset, args.shard))
        return
    # This process stays small: a child's peak RSS counts what it inherited at fork, so the
    # model is built in a child of its own and every measured child forks from a small parent.
    work = Path(tempfile.mkdtemp(prefix="stoker-import-bench-"))
    try:
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--build", str(work / "hf"), "--preset", args.preset,
                               "--shard", args.shard], capture_output=True, text=True, check=True)
        params = int(made.stdout.split()[-1])
        built = time.perf_counter() - t0
        files = sorted((work / "hf").glob("*.safetensors"))
        weights = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)
        _, base, _ = run_measured([sys.executable, "-c", "import stoker.cli, stoker.models.hf, stoker.models.gpt, "
                                   "stoker.train.checkpoint, safetensors.torch, tokenizers"])
        _, peak, seconds = run_measured([sys.executable, "-m", "stoker", "import", str(work / "hf"), "--out",
                                         str(work / "run")])
        used = peak - base
        r = {"preset": args.preset, "params": params, "dtype": "bfloat16", "files": len(files),
             "weights_bytes": weights, "largest_file_bytes": largest, "baseline_rss_bytes": base,
             "import_peak_rss_bytes": peak, "import_above_baseline_bytes": used,
             "above_baseline_over_weights": used / weights,
             "above_baseline_over_weights_plus_largest_file": used / (weights + largest),
             "import_seconds": seconds, "build_seconds": built}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    print(f"{args.preset}: {params / 1e9:.2f}B parameters in {len(files)} files, {weights / gib:.2f} GiB "
          f"(largest {largest / gib:.2f} GiB)")
    print(f"stoker import: peak {peak / gib:.2f} GiB, baseline {base / gib:.2f} GiB: {used / gib:.2f} GiB above it = "
          f"{r['above_baseline_over_weights']:.2f} x the weights, "
          f"{r['above_baseline_over_weights_plus_largest_file']:.2f} x (weights + largest file); {seconds:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
