"""A generated noisy corpus for trying and measuring the cleaning stages: prose documents with
planted exact copies, near copies (a few words edited or added), personal information and
secrets, abusive text and junk, and a manifest of what was planted where.

    python -m stoker.data.noisy --out data/noisy-src            # then: stoker prepare data/noisy-src --clean
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from stoker.data.filters.pii import luhn

COMMON = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her all she there would their we him been has when who will more no if out so said what "
          "up its about into than them can only other new some could time these two may then do first any my now "
          "such like our over man me even most made after also did many before must through back years where much "
          "your way well down should because each just those people how too little state good very make world still "
          "own see men work long get here between both life being under never day same another know while last might "
          "us great old year off come since against go came right used take three").split()
MANIFEST = "manifest.json"


def prose(rng: random.Random, n_words: int = 200, vocab: int = 5000) -> str:
    """Sentences of common words and rare ones (w123): passes the quality rules, and two such
    texts share almost no 5-word shingles."""
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(COMMON) if rng.random() < 0.6 else f"w{rng.randrange(vocab)}")
        if len(sentence) >= rng.randint(8, 16):
            out.append(" ".join([rng.choice(("the", "and", "to", "of"))] + sentence).capitalize() + ".")
            sentence = []
    return " ".join(out + [" ".join(sentence) + "."] * bool(sentence))


def pii_items(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, value) of every pattern the redaction ships, freshly generated."""
    def card() -> str:
        while True:
            digits = rng.choice("3456") + "".join(str(rng.randrange(10)) for _ in range(15))
            if luhn(digits):
                return " ".join(digits[i:i + 4] for i in range(0, 16, 4))

    alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

    def rand(n: int, chars: str = alnum) -> str:
        return "".join(rng.choice(chars) for _ in range(n))

    return [
        ("email", f"{rand(6).lower()}.{rand(5).lower()}@{rand(7).lower()}.com"),
        ("email", f"{rand(4).lower()}+news@mail.{rand(5).lower()}.org"),
        ("ip", f"{rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"),
        ("ip", f"2001:4860:{rng.randrange(1, 16**4):x}::{rng.randrange(1, 16**4):x}"),
        ("phone", f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"),
        ("phone", f"0{rng.randint(20, 99)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"),
        ("card", card()),
        ("secret", "AKIA" + rand(16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")),
        ("secret", "ghp_" + rand(36)),
        ("secret", "sk-" + rand(40)),
        ("secret", f"-----BEGIN RSA PRIVATE KEY-----\n{rand(64)}\n-----END RSA PRIVATE KEY-----"),
    ]


def shingle_jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word k-gram sets (as stoker.data.dedup shingles)."""
    def grams(t: str) -> set:
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / max(1, len(x | y))


def generate(out: str | Path, n: int = 1000, seed: int = 0) -> dict:
    """Write n prose documents and, planted among them: a near copy of every 5th (1 to 8 words
    edited), an exact copy of every 10th, PII in every 20th, abuse in every 50th, junk in every
    50th; returns (and writes beside them) the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = {f"doc{i:05d}.txt": prose(rng, rng.randint(150, 400)) for i in range(n)}
    names = list(texts)
    manifest: dict = {"documents": n, "near": [], "exact": [], "pii": [], "abuse": [], "junk": []}
    for i, name in enumerate(names):
        if i % 20 == 3:
            items = pii_items(rng)
            texts[name] += " " + " ".join(f"{prose(rng, 10)} {v} ." for _, v in items)
            manifest["pii"] += [{"document": name, "kind": k, "value": v} for k, v in items]
    for i, name in enumerate(names):
        if i % 5 == 0:
            words = texts[name].split()
            for k in rng.sample(range(len(words)), rng.randint(1, 8)):
                words[k] = f"edit{rng.randrange(9999)}"
            copy = f"near{i:05d}.txt"
            texts[copy] = " ".join(words)
            manifest["near"].append({"original": name, "copy": copy,
                                     "jaccard": shingle_jaccard(texts[name], texts[copy])})
        if i % 10 == 1:
            texts[f"exact{i:05d}.txt"] = texts[name]
            manifest["exact"].append({"original": name, "copy": f"exact{i:05d}.txt"})
        if i % 50 == 7:
            texts[f"abuse{i:05d}.txt"] = prose(rng, 80) + " you idiot, you bastard, shit" * 6
            manifest["abuse"].append(f"abuse{i:05d}.txt")
        if i % 50 == 9:
            texts[f"junk{i:05d}.txt"] = " ".join(f"#{rng.randrange(99)} ..." for _ in range(60))
            manifest["junk"].append(f"junk{i:05d}.txt")
    for name, text in texts.items():
        (out / name).write_text(text)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write (the documents and manifest.json)")
    ap.add_argument("--documents", type=int, default=1000, help="original documents (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    m = generate(args.out, args.documents, args.seed)
    print(f"wrote {args.out}: {m['documents']} documents, {len(m['near'])} near and {len(m['exact'])} exact copies, "
          f"{len(m['pii'])} PII items, {len(m['abuse'])} abusive and {len(m['junk'])} junk documents")


if __name__ == "__main__":
    main()
