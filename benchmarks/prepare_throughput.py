"""Cleaning throughput and accuracy, in one run.

- Throughput on the standard library's source (the default corpus, code rules): each stage
  alone on one process (MB/s per core), then the whole per-document pipeline plus
  deduplication with 1 and with 2 worker processes (documents/s, and the speed-up).
- Accuracy on a generated noisy corpus (stoker.data.noisy): planted near copies found (those
  whose exact shingle Jaccard is >= the threshold), false positives among documents with no
  copy, planted PII and secrets redacted, abusive and junk documents dropped.

    python benchmarks/prepare_throughput.py [--mb 20] [--out runs/bench/prepare.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=20, help="MB of the standard library to time (default 20)")
    ap.add_argument("--documents", type=int, default=2000, help="original documents of the noisy corpus")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/prepare.json"))
    args = ap.parse_args()

    from stoker.data.clean import CleanConfig, clean
    from stoker.data.dedup import MinHashConfig, exact_key, signature
    from stoker.data.filters.hap import hap_score
    from stoker.data.filters.pii import redact
    from stoker.data.filters.quality import quality_reason
    from stoker.data.noisy import generate
    from stoker.data.prepare import _read, default_sources

    docs, size = [], 0
    for d in _read(default_sources(), lambda: None).docs:
        docs.append(d)
        size += len(d[1].encode())
        if size >= args.mb * 2**20:
            break
    mb = size / 2**20
    mh = MinHashConfig()
    perms = mh.permutations()
    stages = {
        "quality (auto: code rules)": lambda i, t: quality_reason(i, t),
        "hap": lambda i, t: hap_score(t),
        "pii": lambda i, t: redact(t),
        "exact dedup key": lambda i, t: exact_key(t),
        "minhash signature": lambda i, t: signature(t, mh, perms),
    }
    rows = {}
    for name, fn in stages.items():
        t0 = time.perf_counter()
        for ident, text in docs:
            fn(ident, text)
        dt = time.perf_counter() - t0
        rows[name] = {"stage": name, "mb_per_s_per_core": mb / dt, "seconds": dt}
        print(f"  {name}: {mb / dt:.1f} MB/s", flush=True)
    full = CleanConfig(quality="auto", hap_threshold=1.0, pii=True, dedup="both")
    runs = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        kept, report = clean(docs, CleanConfig(**{**full.__dict__, "workers": workers}))
        dt = time.perf_counter() - t0
        runs[workers] = {"workers": workers, "seconds": dt, "documents_per_s": len(docs) / dt, "mb_per_s": mb / dt,
                         "documents_out": len(kept)}
        print(f"  whole pipeline, {workers} worker(s): {len(docs) / dt:,.0f} documents/s, {mb / dt:.1f} MB/s",
              flush=True)
    speedup = runs[1]["seconds"] / runs[2]["seconds"]

    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate(tmp, args.documents, seed=0)
        noisy = sorted((p.name, p.read_text()) for p in Path(tmp).glob("*.txt"))
    kept, report = clean(noisy, full)
    out = dict(kept)
    gone = {d for d, _ in noisy} - set(out)
    planted = [p for p in manifest["near"] if p["jaccard"] >= mh.threshold]
    found = sum(p["copy"] in gone for p in planted)
    with_copy = {p["original"] for p in manifest["near"]} | {p["original"] for p in manifest["exact"]}
    distinct = [d for d, _ in noisy if d.startswith("doc") and d not in with_copy]
    false = sum(d in gone for d in distinct)
    pii_hit = sum(p["document"] in out and p["value"] not in out[p["document"]] for p in manifest["pii"])
    pii_total = sum(p["document"] in out for p in manifest["pii"])
    accuracy = {
        "near copies found (Jaccard >= threshold)": (found, len(planted)),
        "exact copies removed": (sum(p["copy"] in gone for p in manifest["exact"]), len(manifest["exact"])),
        "false positives among distinct documents": (false, len(distinct)),
        "PII and secrets redacted": (pii_hit, pii_total),
        "abusive documents dropped": (sum(d in gone for d in manifest["abuse"]), len(manifest["abuse"])),
        "junk documents dropped": (sum(d in gone for d in manifest["junk"]), len(manifest["junk"])),
    }

    t = Table(title=f"cleaning throughput: {mb:.1f} MB of the standard library ({len(docs):,} documents)")
    t.add_column("stage")
    t.add_column("MB/s per core", justify="right")
    for r in rows.values():
        t.add_row(r["stage"], f"{r['mb_per_s_per_core']:.1f}")
    for w, r in runs.items():
        t.add_row(f"whole pipeline, {w} worker(s)", f"{r['mb_per_s']:.1f} ({r['documents_per_s']:,.0f} documents/s)")
    Console().print(t)
    print(f"speed-up with 2 workers: {speedup:.2f}x")
    a = Table(title=f"accuracy on the generated noisy corpus ({len(noisy):,} documents)")
    a.add_column("measure")
    a.add_column("count", justify="right")
    a.add_column("share", justify="right")
    for k, (n, of) in accuracy.items():
        a.add_row(k, f"{n} / {of}", f"{n / of:.1%}" if of else "")
    Console().print(a)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "mb": mb,
                                    "documents": len(docs), "stages": rows, "pipeline": runs, "speedup_2_workers": speedup,
                                    "accuracy": {k: {"count": n, "of": of} for k, (n, of) in accuracy.items()},
                                    "noisy_report": report}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
