"""Cleaning stages: PII redaction, HAP and quality filters, deduplication, and `stoker prepare`
with them."""

import json
import random
import re
import sys

import numpy as np
import pytest

from stoker import cli
from stoker.data.clean import CleanConfig, clean
from stoker.data.dedup import MinHashConfig, near_duplicates, signature
from stoker.data.filters.hap import hap_score
from stoker.data.filters.pii import luhn, redact
from stoker.data.filters.quality import code_reason, prose_reason, quality_reason

COMMON = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her all she there would their we him been has when who will more no if out so said what "
          "up its about into than them can only other new some could time these two may then do first any my now "
          "such like our over man me even most made after also did many before must through back years where much "
          "your way well down should because each just those people how too little state good very make world still "
          "own see men work long get here between both life being under never day same another know while last might "
          "us great old year off come since against go came right used take three").split()


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


# ---- PII ----

def planted_pii(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, value) pairs of every shipped pattern, generated."""
    def card() -> str:
        while True:
            digits = "4" + "".join(str(rng.randrange(10)) for _ in range(15))
            if luhn(digits):
                return " ".join(digits[i:i + 4] for i in range(0, 16, 4))
    alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    rand = lambda n, chars=alnum: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    return [
        ("email", f"{rand(6).lower()}.{rand(5).lower()}@{rand(7).lower()}.com"),
        ("email", f"{rand(4).lower()}+tag@mail.{rand(5).lower()}.org"),
        ("ip", f"{rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"),
        ("ip", f"2001:4860:{rng.randrange(16**4):x}::{rng.randrange(1, 16**4):x}"),
        ("phone", f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"),
        ("phone", f"0{rng.randint(20, 99)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"),
        ("card", card()),
        ("secret", "AKIA" + rand(16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")),
        ("secret", "ghp_" + rand(36)),
        ("secret", "sk-" + rand(40)),
        ("secret", f"-----BEGIN RSA PRIVATE KEY-----\n{rand(64)}\n{rand(64)}\n-----END RSA PRIVATE KEY-----"),
    ]


def test_every_planted_pii_item_is_redacted_and_look_alikes_are_kept():
    rng = random.Random(0)
    planted, found = 0, 0
    for i in range(100):
        items = planted_pii(rng)
        text = " ".join(f"{prose(rng, 12)} {value} ," for _, value in items)
        out, counts = redact(text)
        for kind, value in items:
            planted += 1
            found += value not in out
        assert sum(counts.values()) == len(items), (counts, out)
    assert found == planted  # 100% on the shipped patterns
    keep = ("version 3.11.4, build 1.2.3.4.5; private hosts 10.0.0.1, 192.168.1.20, 127.0.0.1 and ::1; "
            "the count is 1234567890123; card-like 4111 1111 1111 1112 fails Luhn; ISBN 978-3-16-148410-0; "
            "date 2024-01-15 12:30; password = 'short'")
    assert redact(keep) == (keep, {})


def test_an_assigned_secret_keeps_its_name():
    out, counts = redact('db_password = "correct-horse-battery"\nAPI_KEY: \'0123456789abcdef\'')
    assert out == 'db_password = "<SECRET>"\nAPI_KEY: \'<SECRET>\'' and counts == {"secret": 2}


# ---- HAP and quality ----

def test_hap_score_flags_planted_abuse_and_not_innocent_substrings():
    rng = random.Random(1)
    clean_text = prose(rng, 300)
    assert hap_score(clean_text) == (0.0, {})
    assert hap_score("Scunthorpe, a classic cocktail, Dickens and the assassin's class")[0] == 0.0
    score, counts = hap_score("the cat sat " * 32 + "you fucking idiot, you bastard")
    assert counts == {"profanity": 1, "abuse": 2} and score == pytest.approx(300 / 101)  # 3 in 101 words
    docs = [(f"clean{i}.txt", prose(rng)) for i in range(20)] + [(f"hap{i}.txt", prose(rng, 100) + " shit idiot " * 5)
                                                                  for i in range(5)]
    kept, report = clean(docs, CleanConfig(hap_threshold=1.0, workers=1))
    assert [d for d, _ in kept] == [f"clean{i}.txt" for i in range(20)]
    assert report["stages"][0]["removed"]["score"]["documents"] == 5


def test_each_quality_rule_drops_what_it_should():
    rng = random.Random(2)
    good = prose(rng, 300)
    assert prose_reason(good) is None
    cases = {
        "too_few_words": "Just a few words here.",
        "mean_word_length": " ".join(["the"] + ["extraordinarilylongwordsonly"] * 80),
        "symbol_ratio": good + " #" * 60,
        "non_alphabetic_words": good + " 123 456 789 000" * 40,
        "stop_words": " ".join(f"w{rng.randrange(9999)}" for _ in range(120)),
        "duplicate_lines": "\n".join([prose(rng, 20)] * 3 + [prose(rng, 20) for _ in range(3)]),
        "top_2gram": good + " the the" * 200,
        "bullet_lines": "\n".join(f"- {prose(rng, 12)}" for _ in range(12)),
    }
    for want, text in cases.items():
        assert prose_reason(text) == f"quality:{want}", want
    code = "import os\n\n\ndef main():\n    return os.getcwd()\n"
    assert code_reason(code) is None and quality_reason("pkg/mod.py", code) is None
    assert quality_reason("pkg/mod.py", code) != quality_reason("notes.txt", code)  # auto: prose rules for .txt
    assert code_reason("x = 1\n" + "y" * 2000) == "quality:long_line"
    assert code_reason("# Code generated by protoc. DO NOT EDIT.\nx = 1\n") == "quality:generated"
    assert code_reason("=" * 50 + "\n" + "-" * 50) == "quality:alphanumeric_fraction"


# ---- deduplication ----

def shingles(text: str, k: int = 5) -> set:
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def test_near_duplicates_found_and_distinct_documents_kept():
    rng = random.Random(3)
    originals = [prose(rng, 400) for _ in range(400)]
    copies, truth = [], []
    for i, text in enumerate(originals[:200]):
        words = text.split()
        for k in rng.sample(range(len(words)), rng.randint(1, 6)):  # edits keep Jaccard near 0.8-1
            words[k] = f"edit{rng.randrange(999)}"
        copy = " ".join(words)
        copies.append(copy)
        truth.append(jaccard(text, copy))
    docs = [(f"a{i:04d}.txt", t) for i, t in enumerate(originals)] + [(f"b{i:04d}.txt", t) for i, t in enumerate(copies)]
    cfg = MinHashConfig()
    perms = cfg.permutations()
    sigs = np.stack([signature(t, cfg, perms) for _, t in docs])
    dup = near_duplicates([d for d, _ in docs], sigs, cfg)
    planted = [i for i, j in enumerate(truth) if j >= 0.8]
    assert len(planted) >= 150, "planted pairs mostly above 0.8: a meaningful recall"
    found = sum(dup.get(400 + i) == i for i in planted)
    assert found / len(planted) >= 0.95, (found, len(planted))
    distinct = [i for i in range(200, 400)]  # originals with no copy
    false = sum(i in dup for i in distinct) + sum(1 for j in dup.values() if j in distinct)
    assert false / len(distinct) < 0.01
    assert all(docs[kept][0] < docs[gone][0] for gone, kept in dup.items())  # the first identity is kept


def test_output_does_not_depend_on_order_or_workers():
    rng = random.Random(4)
    base = [prose(rng, 150) for _ in range(60)]
    docs = [(f"d{i:03d}.txt", t) for i, t in enumerate(base)]
    docs += [(f"e{i:03d}.txt", base[i] + " appended words here") for i in range(0, 60, 3)]  # near copies
    docs += [(f"c{i:03d}.txt", base[i]) for i in range(0, 60, 7)]  # exact copies, sorting first
    docs += [("pii.txt", prose(rng, 100) + " mail x.y@example.com")]
    cfg = CleanConfig(quality="auto", hap_threshold=1.0, pii=True, dedup="both", workers=1)
    one, r1 = clean(docs, cfg)
    shuffled = docs[:]
    random.Random(5).shuffle(shuffled)
    two, r2 = clean(shuffled, CleanConfig(**{**cfg.__dict__, "workers": 2}))
    assert sorted(one) == sorted(two)
    assert [(s["stage"], s["documents_out"], s["bytes_out"]) for s in r1["stages"]] == \
           [(s["stage"], s["documents_out"], s["bytes_out"]) for s in r2["stages"]]
    kept = {d for d, _ in one}
    assert {f"c{i:03d}.txt" for i in range(0, 60, 7)} <= kept and not {f"d{i:03d}.txt" for i in range(0, 60, 7)} & kept
    assert r1["pii"] == {"email": 1}


# ---- stoker prepare ----

def test_prepare_with_cleaning_writes_the_report(tmp_path, capsys):
    rng = random.Random(6)
    src = tmp_path / "src"
    src.mkdir()
    texts = [prose(rng, 200) for _ in range(30)]
    for i, t in enumerate(texts):
        (src / f"doc{i:02d}.txt").write_text(t)
    (src / "dup.txt").write_text(texts[3])
    (src / "zz_near.txt").write_text(texts[4] + " one more")
    (src / "short.txt").write_text("hello there")
    (src / "secret.txt").write_text(prose(rng, 100) + ' token = "abcdef0123456789"')
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "data"), "--vocab-size", "300", "--clean",
                     "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "cleaning: 34 -> 31 documents" in out
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    by = {s["stage"]: s for s in report["stages"]}
    assert by["quality"]["removed"]["too_few_words"]["examples"][0]["document"] == "short.txt"
    assert by["exact_dedup"]["removed"]["copy"]["examples"][0]["document"] == "dup.txt"  # doc03.txt sorts first, stays
    assert by["near_dedup"]["removed"]["near copy"]["examples"][0]["document"] == "zz_near.txt"
    assert report["pii"] == {"secret": 1}
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["documents"] == 31 and meta["clean"]["documents_out"] == 31


def test_prepare_refuses_an_empty_result_in_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"t{i}.txt").write_text("too short to keep")
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "data"), "--quality", "prose"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no documents left after cleaning (quality removed 3)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "data").exists()
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "d2"), "--near-threshold", "1.5",
                     "--dedup", "near"]) == 2



# ---- engines and resume ----

def noisy_corpus(root, n: int = 40, seed: int = 7):
    """Prose documents with planted exact and near copies, PII, abuse and junk."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = [prose(rng, 250) for _ in range(n)]
    for i, t in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_text(t)
    for i in range(0, n, 5):
        (root / f"near{i:03d}.txt").write_text(texts[i] + " and a few more words")
        (root / f"copy{i:03d}.txt").write_text(texts[i])
    (root / "pii.txt").write_text(prose(rng, 100) + " write to a.b@example.com, call +1 (555) 234-5678")
    (root / "abuse.txt").write_text(prose(rng, 60) + " idiot bastard " * 10)
    (root / "junk.txt").write_text("#### ---- #### ----")
    return root


def shards(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".bin" or p.name == "tokenizer.json"}


def stage_counts(report):
    return [(s["stage"], s["documents_out"], s["bytes_out"], sorted(s["removed"])) for s in report["stages"]]


def test_local_and_ray_engines_write_identical_shards_and_report(tmp_path):
    from stoker.data.prepare import prepare

    ray = pytest.importorskip("ray")  # a test dependency (pyproject's test extra): present in `make test`
    src = noisy_corpus(tmp_path / "src")
    base = dict(quality="auto", hap_threshold=1.0, pii=True, dedup="both", batch_bytes=8_000)
    a = prepare([str(src)], tmp_path / "local", 400, 0.1, progress=False, clean=CleanConfig(**base, workers=2))
    try:
        b = prepare([str(src)], tmp_path / "ray", 400, 0.1, progress=False,
                    clean=CleanConfig(**base, workers=2, engine="ray"))
    finally:
        ray.shutdown()
    assert shards(tmp_path / "local") == shards(tmp_path / "ray") and len(shards(tmp_path / "local")) >= 3
    assert stage_counts(a["clean"]) == stage_counts(b["clean"])
    assert a["clean"]["pii"] == b["clean"]["pii"] == {"email": 1, "phone": 1}
    assert a["documents"] == b["documents"] == 41 and b["clean"]["engine"] == "ray"  # 40 originals and pii.txt


def test_a_killed_run_resumes_from_its_finished_batches(tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import time

    from stoker.data import clean as clean_mod
    from stoker.data.prepare import prepare

    src = noisy_corpus(tmp_path / "src", n=400)
    cfg = "CleanConfig(quality='auto', hap_threshold=1.0, pii=True, dedup='both', batch_bytes=4000, workers=1)"
    code = (f"from stoker.data.clean import CleanConfig; from stoker.data.prepare import prepare; "
            f"prepare([{str(src)!r}], {str(tmp_path / 'out')!r}, 400, 0.1, progress=False, clean={cfg})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"))
    work = tmp_path / ".out.clean"
    deadline = time.monotonic() + 120
    while len(list(work.glob("*.json"))) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "finished before the kill: give it more work"
    finished = len(list(work.glob("*.json")))
    assert finished >= 20 and not (tmp_path / "out").exists()

    calls = {"resumed": 0, "whole": 0}
    real = clean_mod._process
    run = ["resumed"]
    monkeypatch.setattr(clean_mod, "_process", lambda batch, c: calls.__setitem__(run[0], calls[run[0]] + 1)
                        or real(batch, c))
    kw = dict(quality="auto", hap_threshold=1.0, pii=True, dedup="both", batch_bytes=4000, workers=1)
    resumed = prepare([str(src)], tmp_path / "out", 400, 0.1, progress=False, clean=CleanConfig(**kw))
    run[0] = "whole"
    whole = prepare([str(src)], tmp_path / "whole", 400, 0.1, progress=False, clean=CleanConfig(**kw))
    assert calls["resumed"] == calls["whole"] - finished  # the finished batches were not computed again
    assert shards(tmp_path / "out") == shards(tmp_path / "whole")
    assert stage_counts(resumed["clean"]) == stage_counts(whole["clean"])
    assert not work.exists()  # removed once the data is written


def test_settings_from_a_prepare_toml_with_flags_over_them(tmp_path, capsys):
    src = noisy_corpus(tmp_path / "src", n=10)
    toml = tmp_path / "prepare.toml"
    toml.write_text('[clean]\nquality = "prose"\ndedup = "exact"\nworkers = 1\n')
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "a"), "--vocab-size", "300", "--config", str(toml),
                     "--dedup", "both"]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["quality", "exact_dedup", "near_dedup"]  # the flag won
    assert report["config"]["quality"] == "prose" and report["workers"] == 1
    assert (tmp_path / "a" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    toml.write_text('[clean]\nqualty = "prose"\n')
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "b"), "--config", str(toml)]) == 2
    assert "unknown [clean] key(s) qualty" in capsys.readouterr().err
