"""Many adapters of one base served at once, against the base alone, in one run.

On serve_load.py's model (default 12 x 768, GPT-2 small's shape), one `stoker serve` with N LoRA
adapters (rank --rank on every attention and MLP projection, updates drawn at random:
throughput does not depend on their values) and, with --prompt-adapters, prompt adapters too:
B concurrent streaming requests (greedy) for the base alone, then B for the adapters, request i
asking for adapter i mod N, so every decode step mixes them all. Fresh prompts each round, the
fastest of --rounds reported; the ratio adapters / base is the cost of serving them.

    python benchmarks/serve_adapters.py
    python benchmarks/serve_adapters.py --dtype bf16 --out runs/bench/serve_adapters_bf16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import ensure_run, load, source_text, start_server  # noqa: E402


def make_adapters(run: Path, out: Path, n: int, rank: int, targets: str, prompts: int) -> list[str]:
    """n LoRA adapters (and `prompts` prompt adapters of 16 virtual tokens) of the run's model
    under out/, made once; returns their directories' names."""
    import torch

    from stoker.generate import load_trained
    from stoker.tune.adapters import save_adapter
    from stoker.tune.lora import apply_lora, lora_layers
    from stoker.tune.prompt import apply_prompt

    names = [f"lora{i}" for i in range(n)] + [f"prompt{i}" for i in range(prompts)]
    if all((out / name / "adapter_config.json").is_file() for name in names):
        return names
    base, _, _ = load_trained(run)
    for i, name in enumerate(names):
        m = copy.deepcopy(base)
        if name.startswith("lora"):
            apply_lora(m, targets, rank, 2 * rank, seed=i)
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for layer in lora_layers(m).values():
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        else:
            apply_prompt(m, 16, seed=i)
        save_adapter(m, out / name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench/serve-125m"), help="the base's run directory "
                    "(trained one step here when it has no checkpoint)")
    ap.add_argument("--preset", default="gpt3-125m")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--data", type=Path, default=Path("data/stdlib"))
    ap.add_argument("--adapters", type=int, default=8, help="LoRA adapters served (default 8)")
    ap.add_argument("--prompt-adapters", type=int, default=0, help="prompt adapters served besides them")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate,fc,proj")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch and the concurrency")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve_adapters.json"))
    args = ap.parse_args()

    from stoker.train.checkpoint import latest_checkpoint

    if latest_checkpoint(args.run) is None:
        ensure_run(args.run, args.data, args.preset, args.context)
    root = args.run.with_name(f"{args.run.name}-adapters-r{args.rank}")
    names = make_adapters(args.run, root, args.adapters, args.rank, args.targets, args.prompt_adapters)
    text, B = source_text(), args.max_batch

    def prompts(round_: int) -> list[str]:
        chars, start = args.prompt_tokens * 3, 300_000 + round_ * B * args.prompt_tokens * 3
        return [text[start + i * chars: start + (i + 1) * chars] for i in range(B)]

    extra = [a for name in names for a in ("--adapter", f"{name}={root / name}")]
    proc, url = start_server(args.run, B, args.threads, args.dtype, "--max-adapters", str(len(names)), *extra)
    rows = {}
    try:
        base = args.run.resolve().name
        load(url, prompts(90)[:4], 4, [base] + names[:3])  # load the model and the adapters, warm up
        settings = {"base": ("the base alone", [base] * B),
                    "adapters": (f"{len(names)} adapters, request i -> adapter i mod {len(names)}",
                                 [names[i % len(names)] for i in range(B)])}
        for key, (label, models) in settings.items():
            runs = [load(url, prompts(10 * (key == "adapters") + r), args.max_tokens, models) for r in range(args.rounds)]
            rows[key] = {"setting": label, **max(runs, key=lambda r: r["tokens_per_s"])}
            print(f"  {label}: {rows[key]['tokens_per_s']:,.1f} tokens/s", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    ratio = rows["adapters"]["tokens_per_s"] / rows["base"]["tokens_per_s"]
    table = Table(title=f"serve: {args.run.name}, {args.dtype}, {args.threads} thread(s), {B} concurrent, "
                        f"{args.max_tokens} new tokens each, LoRA rank {args.rank} on {args.targets}")
    for col in ("setting", "tokens/s", "TTFT p50", "latency p99"):
        table.add_column(col, justify="right")
    for r in rows.values():
        table.add_row(r["setting"], f"{r['tokens_per_s']:,.1f}", f"{r['ttft_p50_s']:.2f} s", f"{r['latency_p99_s']:.2f} s")
    Console().print(table)
    print(f"adapters / base alone: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "ratio": ratio}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
