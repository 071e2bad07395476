"""Cleaning before tokenizing: quality filter -> HAP filter -> PII redaction -> exact
deduplication -> near deduplication, with counts of what each stage removed and why.

The per-document stages (filters, redaction, the dedup keys and MinHash signatures) run over
batches of documents in worker processes (`workers`, default every core); deduplication then
runs over the whole corpus in this process. Output does not depend on the worker count: each
document's fate is a function of its own text, and a group of duplicates keeps the copy whose
identity sorts first (stoker.data.dedup).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stoker.data.dedup import MinHashConfig, exact_duplicates, exact_key, near_duplicates, signature

QUALITY_MODES = ("off", "auto", "prose", "code")
DEDUP_MODES = ("off", "exact", "near", "both")
STAGES = ("quality", "hap", "pii", "exact_dedup", "near_dedup")
ENGINES = ("local", "ray")
WORK_MARK = ".stoker-clean"  # in a work directory stoker made (so it may remove it)
EXAMPLES = 3  # removed documents named per reason in the report


@dataclass(frozen=True)
class CleanConfig:
    quality: str = "off"  # off | auto (code rules for source files, prose for the rest) | prose | code
    hap_threshold: float = 0.0  # drop above this many flagged words per 100 (0: off)
    pii: bool = False  # redact personal information and secrets
    dedup: str = "off"  # off | exact | near | both
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    workers: int = 0  # processes for the per-document stages (0: every core)
    engine: str = "local"  # local (worker processes) or ray (Ray Data)
    ray_address: str | None = None  # a Ray cluster to join (default: a local one, started for the run)
    batch_bytes: int = 1 << 20  # text per batch of documents: the unit of work and of resuming

    def __post_init__(self) -> None:
        if self.quality not in QUALITY_MODES:
            raise ValueError(f"quality: expected one of {', '.join(QUALITY_MODES)}, got {self.quality!r}")
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"dedup: expected one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if self.hap_threshold < 0:
            raise ValueError(f"hap threshold: must be >= 0, got {self.hap_threshold}")
        if not 0 < self.minhash.threshold <= 1 or self.minhash.shingle < 1 or self.minhash.num_perm < 2:
            raise ValueError("minhash: threshold in (0, 1], shingle >= 1, num_perm >= 2")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes: must be >= 1, got {self.batch_bytes}")

    @property
    def active(self) -> bool:
        return self.quality != "off" or self.hap_threshold > 0 or self.pii or self.dedup != "off"


@dataclass
class _Doc:
    """One document's fate in the per-document stages."""

    reason: str | None  # why a filter dropped it
    text: str  # after redaction
    pii: Counter
    key: bytes | None = None
    sig: np.ndarray | None = None


def _process(batch: list[tuple[str, str]], cfg: CleanConfig) -> list[_Doc]:
    from stoker.data.filters.hap import hap_score
    from stoker.data.filters.pii import redact
    from stoker.data.filters.quality import quality_reason

    perms = cfg.minhash.permutations() if cfg.dedup in ("near", "both") else None
    out = []
    for ident, text in batch:
        reason = quality_reason(ident, text, cfg.quality) if cfg.quality != "off" else None
        if reason is None and cfg.hap_threshold > 0 and hap_score(text)[0] > cfg.hap_threshold:
            reason = "hap:score"
        pii: Counter = Counter()
        if reason is None and cfg.pii:
            text, pii = redact(text)
        doc = _Doc(reason, text, pii)
        if reason is None and cfg.dedup in ("exact", "both"):
            doc.key = exact_key(text)
        if reason is None and perms is not None:
            doc.sig = signature(text, cfg.minhash, perms)
        out.append(doc)
    return out


def _batches(docs: list[tuple[str, str]], batch_bytes: int) -> list[list[tuple[str, str]]]:
    out, cur, size = [], [], 0
    for d in docs:
        cur.append(d)
        size += len(d[1])
        if size >= batch_bytes or len(cur) >= 512:
            out.append(cur)
            cur, size = [], 0
    return out + [cur] if cur else out


class _ProcessBatch:
    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg

    def __call__(self, batch: list[tuple[str, str]]) -> list[_Doc]:
        return _process(batch, self.cfg)


class _Store:
    """Finished batches' results in `work/`, so that an interrupted run continues where it
    stopped: each batch a JSON file and, for near deduplication, a .npy of its signatures
    (read without pickle), named by a hash of the settings and of the batch's documents."""

    def __init__(self, work: Path | None, cfg: CleanConfig):
        self.work = work
        per_doc = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "engine", "ray_address")}
        self.salt = json.dumps(per_doc, sort_keys=True, default=str).encode()
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            (work / WORK_MARK).touch()

    def name(self, batch: list[tuple[str, str]]) -> str:
        h = hashlib.sha1(self.salt)
        for ident, text in batch:
            h.update(ident.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()

    def get(self, batch: list[tuple[str, str]]) -> list[_Doc] | None:
        if self.work is None:
            return None
        stem = self.work / self.name(batch)
        try:
            rows = json.loads(stem.with_suffix(".json").read_text())
            sigs = np.load(stem.with_suffix(".npy"), allow_pickle=False) if stem.with_suffix(".npy").exists() else None
            docs = [_Doc(r["reason"], r["text"], Counter(r["pii"]), bytes.fromhex(r["key"]) if r["key"] else None,
                         sigs[i] if sigs is not None and r["sig"] else None) for i, r in enumerate(rows)]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # absent or cut short by the interruption: computed again
        return docs if len(docs) == len(batch) else None

    def put(self, batch: list[tuple[str, str]], docs: list[_Doc]) -> None:
        if self.work is None:
            return
        stem = self.work / self.name(batch)
        sigs = [d.sig for d in docs if d.sig is not None]
        if sigs:
            width = len(sigs[0])
            arr = np.stack([d.sig if d.sig is not None else np.zeros(width, np.uint64) for d in docs])
            tmp = stem.with_suffix(".npy.tmp")
            with tmp.open("wb") as f:
                np.save(f, arr)
            tmp.replace(stem.with_suffix(".npy"))
        rows = [{"reason": d.reason, "text": d.text, "pii": dict(d.pii), "key": d.key.hex() if d.key else None,
                 "sig": d.sig is not None} for d in docs]
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(stem.with_suffix(".json"))  # last: the batch counts as done once this exists


def _run(docs: list[tuple[str, str]], cfg: CleanConfig, advance: Callable[[int], None],
         work: Path | None) -> list[_Doc]:
    """The per-document stages over every batch, on the configured engine, reusing what an
    interrupted run finished."""
    store = _Store(work, cfg)
    batches = _batches(docs, cfg.batch_bytes)
    done: dict[int, list[_Doc]] = {}
    for i, b in enumerate(batches):
        if (got := store.get(b)) is not None:
            done[i] = got
            advance(len(b))
    todo = [i for i in range(len(batches)) if i not in done]
    run = _ray_map if cfg.engine == "ray" else _local_map
    for i, res in run([batches[i] for i in todo], todo, cfg):
        store.put(batches[i], res)
        done[i] = res
        advance(len(batches[i]))
    return [d for i in range(len(batches)) for d in done[i]]


def _local_map(batches: list, ids: list[int], cfg: CleanConfig) -> Iterator[tuple[int, list[_Doc]]]:
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(batches) <= 1:
        for i, b in zip(ids, batches):
            yield i, _process(b, cfg)
        return
    # fork: the children inherit the loaded modules (no re-import per worker)
    with multiprocessing.get_context("fork").Pool(min(workers, len(batches))) as pool:
        yield from zip(ids, pool.imap(_ProcessBatch(cfg), batches))


def _ray_map(batches: list, ids: list[int], cfg: CleanConfig) -> Iterator[tuple[int, list[_Doc]]]:
    """The same per-batch function as tasks of Ray Data: one row per batch, results back in
    batch order (Ray Data may finish them in any order)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'ray[data]' (or stoker[ray])") from None
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, num_cpus=None if cfg.ray_address else (cfg.workers or None),
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    if not batches:
        return
    fn = _ProcessBatch(cfg)

    def work(row: dict) -> dict:
        batch = json.loads(row["batch"])
        return {"i": row["i"], "out": pickle.dumps(fn([tuple(d) for d in batch]))}

    ds = ray.data.from_items([{"i": i, "batch": json.dumps(b)} for i, b in zip(ids, batches)],
                             override_num_blocks=len(batches))
    results = {r["i"]: r["out"] for r in ds.map(work).iter_rows()}
    for i in ids:
        yield i, pickle.loads(results[i])  # this run's own workers' results, in memory


CONFIG_KEYS = ("quality", "hap", "pii", "dedup", "near_threshold", "shingle", "num_perm", "workers", "engine",
               "ray_address", "batch_bytes")


def clean_config(path: str | Path | None = None, all_on: bool = False, overrides: dict | None = None) -> CleanConfig:
    """Settings from a TOML file's [clean] table (keys CONFIG_KEYS), then `overrides` (the same
    keys); all_on: every stage on at its default unless set (what `--clean` means).
    ValueError, one line, for an unreadable file or an unknown key."""
    table: dict = {}
    if path is not None:
        import tomllib

        try:
            table = tomllib.loads(Path(path).read_text()).get("clean", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: not a readable TOML file ({e})") from None
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [clean] must be a table")
        unknown = sorted(set(table) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown [clean] key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    v = {**table, **(overrides or {})}
    mh = MinHashConfig()
    try:
        return CleanConfig(
            quality=v.get("quality", "auto" if all_on else "off"), hap_threshold=float(v.get("hap", 1.0 if all_on else 0.0)),
            pii=bool(v.get("pii", all_on)), dedup=v.get("dedup", "both" if all_on else "off"),
            minhash=MinHashConfig(num_perm=int(v.get("num_perm", mh.num_perm)), shingle=int(v.get("shingle", mh.shingle)),
                                  threshold=float(v.get("near_threshold", mh.threshold))),
            workers=int(v.get("workers", 0)), engine=v.get("engine", "local"), ray_address=v.get("ray_address"),
            batch_bytes=int(v.get("batch_bytes", 1 << 20)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path or 'cleaning settings'}: {e}") from None


def clean(docs: list[tuple[str, str]], cfg: CleanConfig, advance: Callable[[int], None] = lambda n: None,
          work: Path | None = None) -> tuple[list[tuple[str, str]], dict]:
    """The documents (identity, text) that pass, redacted, in their order, and the report:
    per stage documents and bytes in and out, reasons with examples, PII counts, throughput.
    work: a directory for finished batches, so that a run interrupted and started again
    continues where it stopped."""
    t0 = time.perf_counter()
    results = _run(docs, cfg, advance, work)
    t_docs = time.perf_counter() - t0
    removed: dict[int, str] = {i: r.reason for i, r in enumerate(results) if r.reason}
    live = [i for i in range(len(docs)) if i not in removed]
    if cfg.dedup in ("exact", "both"):
        dup = exact_duplicates([docs[i][0] for i in live], [results[i].key for i in live])
        for j, kept in dup.items():
            removed[live[j]] = f"exact_dedup:copy of {docs[live[kept]][0]}"
        live = [i for i in live if i not in removed]
    if cfg.dedup in ("near", "both") and live:
        sigs = np.stack([results[i].sig for i in live])
        dup = near_duplicates([docs[i][0] for i in live], sigs, cfg.minhash)
        for j, kept in dup.items():
            removed[live[j]] = f"near_dedup:near copy of {docs[live[kept]][0]}"
        live = [i for i in live if i not in removed]
    seconds = time.perf_counter() - t0

    stages, n_in, b_in = [], len(docs), sum(len(t.encode()) for _, t in docs)
    for stage in STAGES:
        gone = sorted(i for i, r in removed.items() if r.split(":", 1)[0] == stage)
        reasons: dict[str, dict] = {}
        for i in gone:
            reason = removed[i].split(":", 1)[1]
            key = reason.split(" of ")[0] if stage.endswith("dedup") else reason
            entry = reasons.setdefault(key, {"documents": 0, "examples": []})
            entry["documents"] += 1
            if len(entry["examples"]) < EXAMPLES:
                entry["examples"].append({"document": docs[i][0], "reason": reason, "text": docs[i][1][:200]})
        gone_bytes = sum(len(docs[i][1].encode()) for i in gone)
        row = {"stage": stage, "documents_in": n_in, "documents_out": n_in - len(gone), "bytes_in": b_in}
        if stage == "pii":
            redacted = sum(len(docs[i][1].encode()) - len(results[i].text.encode()) for i in live)
            row["bytes_out"] = b_in - redacted
        else:
            row["bytes_out"] = b_in - gone_bytes
        row["removed"] = reasons
        stages.append(row)
        n_in, b_in = row["documents_out"], row["bytes_out"]
    pii: Counter = Counter()
    for i in live:
        pii.update(results[i].pii)
    total_bytes = sum(len(t.encode()) for _, t in docs)
    report = {
        "config": {**asdict(cfg), "minhash": {**asdict(cfg.minhash), "bands_rows": cfg.minhash.bands_rows()}},
        "stages": [s for s in stages if _stage_on(s["stage"], cfg)],
        "pii": dict(sorted(pii.items())), "documents_in": len(docs), "documents_out": len(live),
        "bytes_in": total_bytes, "bytes_out": sum(len(results[i].text.encode()) for i in live),
        "seconds": seconds, "per_document_stages_seconds": t_docs,
        "workers": cfg.workers or os.cpu_count() or 1, "engine": cfg.engine,
        "documents_per_s": len(docs) / seconds if seconds else 0.0,
        "mb_per_s": total_bytes / 2**20 / seconds if seconds else 0.0,
    }
    return [(docs[i][0], results[i].text) for i in live], report


def _stage_on(stage: str, cfg: CleanConfig) -> bool:
    return {"quality": cfg.quality != "off", "hap": cfg.hap_threshold > 0, "pii": cfg.pii,
            "exact_dedup": cfg.dedup in ("exact", "both"), "near_dedup": cfg.dedup in ("near", "both")}[stage]


def plot_report(report: dict, path: str | Path) -> Path:
    """A picture of the report: documents removed per stage and reason, and PII redacted by
    type, as horizontal bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removed = [(f"{s['stage']}: {k}", v["documents"]) for s in report["stages"] for k, v in s["removed"].items()]
    pii = [(f"pii: {k}", n) for k, n in report["pii"].items()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * max(len(removed), len(pii), 3) + 1.5))
    for ax, rows, title in ((axes[0], removed, "documents removed"), (axes[1], pii, "items redacted")):
        labels, values = [r[0] for r in rows] or ["(none)"], [r[1] for r in rows] or [0]
        ax.barh(labels[::-1], values[::-1], color="#c0504d" if ax is axes[0] else "#4f81bd")
        ax.set_title(title)
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:,}", va="center")
    fig.suptitle(f"cleaning: {report['documents_in']:,} -> {report['documents_out']:,} documents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def report_table(report: dict):
    """The report's stages as a rich table."""
    from rich.table import Table

    t = Table(title=f"cleaning: {report['documents_in']:,} -> {report['documents_out']:,} documents, "
                    f"{report['mb_per_s']:.1f} MB/s with {report['workers']} worker(s)")
    for col in ("stage", "documents in", "out", "MB in", "out", "removed, by reason"):
        t.add_column(col, justify="right" if col != "removed, by reason" else "left")
    for s in report["stages"]:
        why = ", ".join(f"{k} {v['documents']}" for k, v in s["removed"].items())
        if s["stage"] == "pii":
            why = ", ".join(f"{k} {v}" for k, v in report["pii"].items()) + " redacted" if report["pii"] else ""
        t.add_row(s["stage"], f"{s['documents_in']:,}", f"{s['documents_out']:,}", f"{s['bytes_in'] / 2**20:.2f}",
                  f"{s['bytes_out'] / 2**20:.2f}", why)
    return t
