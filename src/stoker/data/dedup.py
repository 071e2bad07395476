"""Exact and near-duplicate detection over a whole corpus, deterministic: the copy kept of a
group of duplicates is the one whose identity sorts first, whatever the order the documents
arrive in, the engine or the number of workers.

Exact: SHA-1 of the text lower-cased with runs of whitespace collapsed.
Near (Broder's MinHash with banded LSH): a document's set of word `shingle`-grams, hashed to 32
bits; `num_perm` hash functions of those (the splitmix64 finalizer of the hash xor a
per-function seed) give a signature whose agreement estimates Jaccard similarity within its
binomial spread. (A linear (a h + b) mod p over 32-bit h does not: its orders coincide whenever
a h never wraps, measured: agreement off by 0.15 on average against 0.03 expected.)
Signatures are cut in `bands` bands of `rows` rows and documents sharing any band are
candidates, bands and rows chosen so that a pair at the threshold is one with probability
>= 0.95; a candidate pair is a duplicate when its signatures agree on at least the threshold
less three standard deviations of the estimate. The threshold is thus soft, as MinHash's
always is: pairs at it are found at least 95% of the time, pairs well below it (0.5 against
0.8) practically never. Duplicates join groups through union-find (transitively).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_WORD = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).digest()


@dataclass(frozen=True)
class MinHashConfig:
    num_perm: int = 128
    shingle: int = 5  # words per shingle
    threshold: float = 0.8  # Jaccard similarity from which two documents are duplicates
    seed: int = 1

    def bands_rows(self) -> tuple[int, int]:
        """(bands, rows), bands x rows <= num_perm: of those that make a pair at the threshold a
        candidate with probability >= 0.95, the one with the least candidate probability mass
        below the threshold (false candidates, which the signature check then weeds out)."""
        t, best, best_fp = self.threshold, None, math.inf
        xs = np.linspace(0.0, t, 200)
        for b in range(1, self.num_perm + 1):
            for r in range(1, self.num_perm // b + 1):
                if 1 - (1 - t ** r) ** b < 0.95:
                    continue
                fp = float(np.trapezoid(1 - (1 - xs ** r) ** b, xs))
                if fp < best_fp:
                    best, best_fp = (b, r), fp
        return best or (self.num_perm, 1)

    @property
    def check(self) -> float:
        """Signature agreement a candidate pair needs: the threshold less three standard
        deviations of the estimate at it (sqrt(t (1 - t) / num_perm)), so that a pair at the
        threshold passes (99.9%) and one far below it does not."""
        t = self.threshold
        return t - 3 * math.sqrt(t * (1 - t) / self.num_perm)

    def permutations(self) -> np.ndarray:
        """The hash functions' seeds, (num_perm,) uint64."""
        rng = np.random.Generator(np.random.PCG64(self.seed))
        return rng.integers(0, np.iinfo(np.uint64).max, self.num_perm, dtype=np.uint64, endpoint=True)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps, as it should)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the text's distinct word k-grams (lower-cased; the whole text as one
    shingle when it has fewer than k words)."""
    words = _WORD.findall(text.lower())
    if len(words) < k:
        grams = {" ".join(words)}
    else:
        grams = {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}
    return np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


def signature(text: str, cfg: MinHashConfig, seeds: np.ndarray) -> np.ndarray:
    """The text's MinHash signature, (num_perm,) uint64."""
    h = shingle_hashes(text, cfg.shingle)
    out = np.empty(cfg.num_perm, dtype=np.uint64)
    for lo in range(0, len(h), 2048):  # bounded memory for long documents
        part = _mix(h[lo:lo + 2048, None] ^ seeds[None]).min(axis=0)
        out = part if lo == 0 else np.minimum(out, part)
    return out


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the root is the group's smallest index


def exact_duplicates(idents: list[str], keys: list[bytes]) -> dict[int, int]:
    """{index of a duplicate: index of the copy kept} for equal keys; the kept copy is the one
    whose identity sorts first."""
    first: dict[bytes, int] = {}
    for i in sorted(range(len(idents)), key=idents.__getitem__):
        first.setdefault(keys[i], i)
    return {i: first[k] for i, k in enumerate(keys) if first[k] != i}


def near_duplicates(idents: list[str], sigs: np.ndarray, cfg: MinHashConfig) -> dict[int, int]:
    """{index of a near duplicate: index of its group's kept copy}; sigs (N, num_perm)."""
    order = sorted(range(len(idents)), key=idents.__getitem__)  # position = rank of the identity
    rank = {i: p for p, i in enumerate(order)}
    bands, rows = cfg.bands_rows()
    uf = _UnionFind(len(idents))
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        part = np.ascontiguousarray(sigs[:, band * rows:(band + 1) * rows])
        for i in range(len(idents)):
            buckets[part[i].tobytes()].append(rank[i])
        # In a canonical order (buckets by their sorted members), so the groups found do not
        # depend on the order the documents came in.
        for members in sorted(sorted(m) for m in buckets.values() if len(m) > 1):
            head = members[0]
            for m in members[1:]:
                if uf.find(m) == uf.find(head):
                    continue
                agree = float((sigs[order[head]] == sigs[order[m]]).mean())
                if agree >= cfg.check:
                    uf.union(head, m)
                else:  # the bucket's head may differ from it; others in the bucket may not
                    for other in members:
                        if other != m and uf.find(other) != uf.find(m) and \
                                float((sigs[order[other]] == sigs[order[m]]).mean()) >= cfg.check:
                            uf.union(other, m)
                            break
    out = {}
    for p in range(len(idents)):
        root = uf.find(p)
        if root != p:
            out[order[p]] = order[root]
    return out
