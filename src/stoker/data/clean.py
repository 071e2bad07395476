"""Cleaning before tokenizing: quality filter -> HAP filter -> PII redaction -> exact
deduplication -> near deduplication, with counts of what each stage removed and why.

The per-document stages (filters, redaction, the dedup keys and MinHash signatures) run over
batches of documents in worker processes (`workers`, default every core); deduplication then
runs over the whole corpus in this process. Output does not depend on the worker count: each
document's fate is a function of its own text, and a group of duplicates keeps the copy whose
identity sorts first (stoker.data.dedup).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from stoker.data.dedup import MinHashConfig, exact_duplicates, exact_key, near_duplicates, signature

QUALITY_MODES = ("off", "auto", "prose", "code")
DEDUP_MODES = ("off", "exact", "near", "both")
STAGES = ("quality", "hap", "pii", "exact_dedup", "near_dedup")
EXAMPLES = 3  # removed documents named per reason in the report
BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class CleanConfig:
    quality: str = "off"  # off | auto (code rules for source files, prose for the rest) | prose | code
    hap_threshold: float = 0.0  # drop above this many flagged words per 100 (0: off)
    pii: bool = False  # redact personal information and secrets
    dedup: str = "off"  # off | exact | near | both
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    workers: int = 0  # processes for the per-document stages (0: every core)

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


def _batches(docs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out, cur, size = [], [], 0
    for d in docs:
        cur.append(d)
        size += len(d[1])
        if size >= BATCH_BYTES or len(cur) >= 512:
            out.append(cur)
            cur, size = [], 0
    return out + [cur] if cur else out


def _run_local(docs: list[tuple[str, str]], cfg: CleanConfig, advance: Callable[[int], None]) -> list[_Doc]:
    workers = cfg.workers or os.cpu_count() or 1
    batches = _batches(docs)
    results: list[_Doc] = []
    if workers == 1 or len(batches) == 1:
        for b in batches:
            results += _process(b, cfg)
            advance(len(b))
        return results
    # fork: the children inherit the loaded modules (no re-import per worker)
    with multiprocessing.get_context("fork").Pool(min(workers, len(batches))) as pool:
        for b, res in zip(batches, pool.imap(_ProcessBatch(cfg), batches)):
            results += res
            advance(len(b))
    return results


class _ProcessBatch:
    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg

    def __call__(self, batch: list[tuple[str, str]]) -> list[_Doc]:
        return _process(batch, self.cfg)


def clean(docs: list[tuple[str, str]], cfg: CleanConfig, advance: Callable[[int], None] = lambda n: None
          ) -> tuple[list[tuple[str, str]], dict]:
    """The documents (identity, text) that pass, redacted, in their order, and the report:
    per stage documents and bytes in and out, reasons with examples, PII counts, throughput."""
    t0 = time.perf_counter()
    results = _run_local(docs, cfg, advance)
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
        "workers": cfg.workers or os.cpu_count() or 1,
        "documents_per_s": len(docs) / seconds if seconds else 0.0,
        "mb_per_s": total_bytes / 2**20 / seconds if seconds else 0.0,
    }
    return [(docs[i][0], results[i].text) for i in live], report


def _stage_on(stage: str, cfg: CleanConfig) -> bool:
    return {"quality": cfg.quality != "off", "hap": cfg.hap_threshold > 0, "pii": cfg.pii,
            "exact_dedup": cfg.dedup in ("exact", "both"), "near_dedup": cfg.dedup in ("near", "both")}[stage]


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
