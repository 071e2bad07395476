"""`stoker prepare`: text files -> a BPE tokenizer and packed train/val token shards.

Output directory:
  tokenizer.json            byte-level BPE
  train_00000.bin, ...      raw little-endian token ids (uint16 when the vocabulary allows),
  val_00000.bin, ...        documents in order, each followed by one end-of-text token
  meta.json                 vocabulary, dtype, shard lists and counts
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from stoker.data.tokenizer import Tokenizer, train_bpe

TEXT_SUFFIXES = {".txt", ".md", ".py"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl"}
META = "meta.json"
ENCODE_CHUNK = 64  # documents per encode_batch call: big enough to amortize, small enough for a live bar


def default_sources() -> list[Path]:
    """The Python standard library's own sources: real text on every machine with Python."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def _skip_dir(path: Path) -> bool:
    # Third-party packages are not the stdlib; __pycache__ holds only .pyc, whose presence
    # varies by machine and would make the "ignored" count differ for the same corpus.
    return path.name in ("site-packages", "dist-packages", "__pycache__")


def _walk(src: Path) -> Iterator[Path]:
    if src.is_file():
        yield src
        return
    for p in sorted(src.iterdir()):
        if p.is_dir():
            if not _skip_dir(p) and not p.is_symlink():  # symlinked folders can loop
                yield from _walk(p)
        elif p.is_file():
            yield p


@dataclass
class _Corpus:
    docs: list[tuple[str, str]] = field(default_factory=list)  # (identity, text)
    files: int = 0
    skipped_non_utf8: int = 0
    skipped_jsonl_lines: int = 0
    ignored: int = 0


def _read(sources: list[Path], advance: Callable[[], None]) -> _Corpus:
    c = _Corpus()
    for src in sources:
        for path in _walk(src):
            suffix = path.suffix.lower()
            if suffix not in SUFFIXES:
                c.ignored += 1
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                c.skipped_non_utf8 += 1
                continue
            c.files += 1
            # The identity decides the split, so it must not depend on where the corpus lives.
            ident = (path.relative_to(src) if src.is_dir() else Path(path.name)).as_posix()
            if suffix == ".jsonl":
                # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends.
                for n, line in enumerate(text.split("\n")):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line).get("text")
                    except (ValueError, AttributeError):
                        doc = None
                    if not isinstance(doc, str):
                        c.skipped_jsonl_lines += 1
                        continue
                    c.docs.append((f"{ident}:{n + 1}", doc))
            else:
                c.docs.append((ident, text))
            advance()
    return c


def _hash01(ident: str) -> float:
    """A stable hash in [0, 1): Python's hash() is salted per process."""
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:8], "little") / 2**64


def _val_mask(idents: list[str], val_fraction: float) -> list[bool]:
    h = [_hash01(i) for i in idents]
    val = [x < val_fraction for x in h]
    if len(val) >= 2 and not any(val):
        val[h.index(min(h))] = True  # always something to evaluate on
    if val and all(val):
        val[h.index(max(h))] = False  # and always something to train the tokenizer on
    return val


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _ShardWriter:
    """Appends tokens to {split}_00000.bin, {split}_00001.bin, ... of at most shard_tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.dtype = dtype.newbyteorder("<")
        self.shards: list[str] = []
        self._f: BinaryIO | None = None
        self._room = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._room == 0:
                self._next()
            part, tokens = tokens[: self._room], tokens[self._room :]
            self._f.write(part.tobytes())
            self._room -= len(part)

    def _next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._f = open(self.out / name, "wb")
        self._room = self.shard_tokens

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _check_out(out: Path) -> None:
    # The old directory is deleted on success: never do that to something we did not write.
    if out.exists() and not (out.is_dir() and ((out / META).is_file() or not any(out.iterdir()))):
        raise ValueError(f"out: {str(out)!r} exists and is not a prepared data directory (no {META}); "
                         "choose a new path or remove it")


def prepare(
    sources: list[str] | None,
    out: str | Path,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    shard_tokens: int = 2**24,
    progress: bool = True,
) -> dict:
    """Tokenize `sources` (default: the stdlib) into `out`; returns meta.json's content plus "seconds"."""
    t0 = time.perf_counter()
    if not 257 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size: must be between 257 (256 bytes + end-of-text) and 2**32, got {vocab_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens: must be at least 1, got {shard_tokens}")
    srcs = [Path(s) for s in sources] if sources else default_sources()
    for s in srcs:
        if not s.exists():
            raise FileNotFoundError(f"source {str(s)!r} does not exist")
    out = Path(out)
    _check_out(out)

    with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("reading files", total=None)
        corpus = _read(srcs, lambda: bar.advance(task))
        if not corpus.docs:
            raise ValueError(f"no documents (.txt .md .py .jsonl, UTF-8) found in {', '.join(map(str, srcs))}")
        val = _val_mask([ident for ident, _ in corpus.docs], val_fraction)
        docs = {
            "train": [t for (_, t), v in zip(corpus.docs, val) if not v],
            "val": [t for (_, t), v in zip(corpus.docs, val) if v],
        }

        bar.update(task, description=f"training BPE ({vocab_size:,} tokens)")
        tok = Tokenizer(train_bpe(docs["train"], vocab_size))
        dtype = dtype_for(tok.vocab_size)

        out.parent.mkdir(parents=True, exist_ok=True)
        # Built beside `out` (same file system, so the final rename is atomic) under a unique name.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            splits = {}
            total_bytes = 0
            for split, texts in docs.items():
                nbytes = [len(t.encode("utf-8")) for t in texts]
                bar.update(task, description=f"encoding {split}", total=sum(nbytes), completed=0)
                writer = _ShardWriter(tmp, split, dtype, shard_tokens)
                tokens = 0
                for i in range(0, len(texts), ENCODE_CHUNK):
                    ids = tok.encode_batch(texts[i : i + ENCODE_CHUNK])
                    for d in ids:
                        d.append(tok.eot_id)
                    n = sum(map(len, ids))
                    writer.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=n))
                    tokens += n
                    bar.advance(task, sum(nbytes[i : i + ENCODE_CHUNK]))
                writer.close()
                splits[split] = {"shards": writer.shards, "tokens": tokens, "documents": len(texts),
                                 "bytes": sum(nbytes)}
                total_bytes += sum(nbytes)
            tok.save(tmp)
            tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
            meta = {
                "vocab_size": tok.vocab_size, "dtype": dtype.name, "eot_id": tok.eot_id, "splits": splits,
                "files": corpus.files, "documents": len(corpus.docs), "bytes": total_bytes, "tokens": tokens,
                "bytes_per_token": total_bytes / tokens, "skipped_non_utf8": corpus.skipped_non_utf8,
                "skipped_jsonl_lines": corpus.skipped_jsonl_lines, "ignored": corpus.ignored,
                "sources": [str(s.resolve()) for s in srcs],
            }
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dict(meta, seconds=time.perf_counter() - t0)


def _replace(new: Path, out: Path) -> None:
    """Swap the finished directory in: until here a crash leaves any previous `out` intact."""
    if not out.exists():
        new.rename(out)
        return
    old = new.with_suffix(".old")
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data in {str(data_dir)!r} ({META} missing); "
                                f"run `stoker prepare --out {data_dir}`")
    return json.loads(path.read_text())


def load_split(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """Read-only memory maps of one split's shards (an empty split has none)."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(meta['splits'])}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    return [np.memmap(Path(data_dir) / s, dtype=dtype, mode="r") for s in meta["splits"][split]["shards"]]


def summary_table(summary: dict) -> Table:
    table = Table(title="prepared data")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("files read", f"{summary['files']:,}"),
        ("documents", f"{summary['documents']:,}"),
        ("bytes", f"{summary['bytes']:,}"),
        ("tokens", f"{summary['tokens']:,}"),
        ("bytes per token", f"{summary['bytes_per_token']:.2f}"),
        ("vocabulary", f"{summary['vocab_size']:,} ({summary['dtype']})"),
        ("train / val tokens", f"{summary['splits']['train']['tokens']:,} / {summary['splits']['val']['tokens']:,}"),
        ("skipped: not UTF-8", f"{summary['skipped_non_utf8']:,}"),
        ("skipped: bad jsonl lines", f"{summary['skipped_jsonl_lines']:,}"),
        ("ignored (other file types)", f"{summary['ignored']:,}"),
    ]
    if "seconds" in summary:
        rows.append(("time", f"{summary['seconds']:.1f} s"))
    for k, v in rows:
        table.add_row(k, v)
    return table
