"""Hateful, abusive and profane text (HAP), scored by the word list that ships beside this
module (hap_words.txt): flagged words per 100 words, a hate word counting thrice. A document
scoring above the threshold is dropped. A word list catches the explicit cases and misses
the veiled ones, and it flags quotation and discussion alike: it is a first filter, not a
classifier."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

WORDS_FILE = Path(__file__).with_name("hap_words.txt")
WEIGHT = {"profanity": 1.0, "abuse": 1.0, "hate": 3.0}
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@lru_cache(maxsize=4)
def load_words(path: str = str(WORDS_FILE)) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """(exact words -> category, (prefix, category) for the entries ending in *)."""
    exact, prefixes = {}, []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        word, _, category = line.partition("\t")
        if category not in WEIGHT:
            raise ValueError(f"{path}:{n}: category {category!r} is not one of {', '.join(WEIGHT)}")
        if word.endswith("*"):
            prefixes.append((word[:-1], category))
        else:
            exact[word] = category
    return exact, tuple(sorted(prefixes, key=lambda p: -len(p[0])))


def hap_score(text: str, words_file: str = str(WORDS_FILE)) -> tuple[float, dict[str, int]]:
    """Flagged words per 100 words (weighted) and the count per category."""
    exact, prefixes = load_words(words_file)
    words = _WORD.findall(text.lower())
    counts: dict[str, int] = {}
    weight = 0.0
    firsts = {p[0][:2] for p in prefixes}
    for w in words:
        cat = exact.get(w)
        if cat is None and w[:2] in firsts:
            cat = next((c for p, c in prefixes if w.startswith(p)), None)
        if cat is not None:
            counts[cat] = counts.get(cat, 0) + 1
            weight += WEIGHT[cat]
    return 100.0 * weight / max(1, len(words)), counts
