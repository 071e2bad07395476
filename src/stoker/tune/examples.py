"""Example tasks to tune on, generated from the Python standard library's source (which ships
with Python: nothing is downloaded).

    python -m stoker.tune.examples first-word --out data/first-word

writes train.jsonl and eval.jsonl. Tasks:
- first-word: `{"prompt": "<a line of code>\\nfirst word:", "completion": " <its first word>"}`; a
  model trained on code continues the code instead, so it starts near 0% exact match.
- last-word: the same with the line's last word (multitask prompt tuning trains both).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from stoker.data.prepare import default_sources

TASKS = ("first-word", "last-word")


def code_lines(max_chars: int = 40) -> list[list[str]]:
    """Distinct lines of 3 to 6 words from a few stdlib packages, each word an identifier-like token."""
    root = default_sources()[0]
    seen, out = set(), []
    for pkg in ("json", "email", "asyncio", "http", "logging"):
        for f in sorted((root / pkg).glob("*.py")):
            for line in f.read_text(errors="replace").splitlines():
                line = line.strip()
                words = line.split()
                if line in seen or not 3 <= len(words) <= 6 or len(line) > max_chars:
                    continue
                if not words[0].isidentifier() or not words[-1].strip("():,.[]'\"=").replace("_", "a").isalnum():
                    continue
                seen.add(line)
                out.append(words)
    return out


def records(task: str, n: int, seed: int = 0, lines: list[list[str]] | None = None) -> list[dict]:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    lines = list(lines if lines is not None else code_lines())
    random.Random(seed).shuffle(lines)
    word = 0 if task == "first-word" else -1
    name = task.replace("-", " ")
    return [{"prompt": f"{' '.join(w)}\n{name}:", "completion": " " + w[word], "task": task} for w in lines[:n]]


def write(task: str, out: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl under `out`, disjoint lines."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recs = records(task, n_train + n_eval, seed)
    if len(recs) < n_train + n_eval:
        raise ValueError(f"only {len(recs)} distinct lines; ask for fewer records")
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (recs[:n_train], recs[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description="Write an example tuning task as JSONL records (train.jsonl, eval.jsonl)")
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--out", required=True, help="directory to write train.jsonl and eval.jsonl into")
    ap.add_argument("--train", type=int, default=2000, help="training records (default 2000)")
    ap.add_argument("--eval", type=int, default=200, help="evaluation records (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for p in write(args.task, args.out, args.train, args.eval, args.seed):
        print(p)


if __name__ == "__main__":
    main()
