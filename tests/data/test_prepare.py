import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from stoker import cli
from stoker.data.prepare import default_sources, dtype_for, load_meta, load_split, prepare
from stoker.data.tokenizer import EOT, Tokenizer, bounded_runs

WORDS = ("alpha beta gamma delta return import class def self value index table while yield "
         "the of and to in is for with on data model token shard über naïve 数据").split()


def make_corpus(root, n=40) -> dict[str, str]:
    """n small .py/.txt/.md documents plus one non-UTF-8 file and one other file type."""
    rng = np.random.default_rng(0)
    docs = {}
    for i in range(n):
        ext = [".py", ".txt", ".md"][i % 3]
        body = "\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(6))
        if ext == ".py":
            text = f"def f{i}(x):\n    return x * {i}  # ✓\n\n\nclass C{i}:\n\tpass\n{body}\n"
        elif ext == ".md":
            text = f"# Title {i}\n\n- {body}\n\n```\ncode\n```\r\n"
        else:
            text = f"{body}\n  trailing spaces   \n\n"
        (root / f"d{i:03d}{ext}").write_bytes(text.encode("utf-8"))
        docs[f"d{i:03d}{ext}"] = text
    (root / "sub").mkdir()
    (root / "sub" / "bad.py").write_bytes(b"\xff\xfe\x00bad SECRETBYTES")
    (root / "sub" / "image.png").write_bytes(b"\x89PNG")
    return docs


def decode_docs(out, split) -> list[str]:
    tok = Tokenizer.load(out)
    ids = np.concatenate([np.asarray(s) for s in load_split(out, split)] + [np.empty(0, np.int64)]).tolist()
    assert not ids or ids[-1] == tok.eot_id
    return tok.decode(ids).split(EOT)[:-1]


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return src, make_corpus(src)


def test_deterministic_across_processes_and_round_trips(tmp_path, corpus):
    src, docs = corpus
    a = prepare([str(src)], tmp_path / "a", vocab_size=400, val_fraction=0.2, progress=False)
    # A second process: the Rust side's hash maps are seeded differently there.
    code = f"from stoker.data.prepare import prepare; prepare([{str(src)!r}], {str(tmp_path / 'b')!r}, 400, 0.2, progress=False)"
    subprocess.run([sys.executable, "-c", code], check=True)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"tokenizer.json", "meta.json", "train_00000.bin", "val_00000.bin"} <= set(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["skipped_non_utf8"] == 1 and a["ignored"] == 1 and a["files"] == 40 and a["documents"] == 40
    assert a["bytes"] == sum(len(t.encode()) for t in docs.values())
    train, val = decode_docs(tmp_path / "a", "train"), decode_docs(tmp_path / "a", "val")
    assert len(train) == a["splits"]["train"]["documents"] and len(val) == a["splits"]["val"]["documents"] >= 1
    # Every document appears exactly once, in one split, byte for byte.
    assert sorted(train + val) == sorted(docs.values())
    assert not set(train) & set(val)
    assert not any("SECRETBYTES" in d or "bad" in d for d in train + val)
    assert a["vocab_size"] == Tokenizer.load(tmp_path / "a").vocab_size <= 400
    assert a["tokens"] == sum(len(s) for sp in ("train", "val") for s in load_split(tmp_path / "a", sp))


def test_tokenizer_round_trips_any_string_and_keeps_eot_literal_as_text(tmp_path, corpus):
    src, _ = corpus
    prepare([str(src)], tmp_path / "o", vocab_size=300, val_fraction=0.2, progress=False)
    tok = Tokenizer.load(tmp_path / "o")
    assert tok.eot_id == 0 and 257 <= tok.vocab_size <= 300
    for s in ["", "never seen: ∮ E⋅da = Q 😀 \x00\t\r\n", "  lead", "x" * 1000, f"a {EOT} b"]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.eot_id not in tok.encode(f"quoted {EOT} inside")
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_document_quoting_eot_does_not_split(tmp_path):
    (tmp_path / "s").mkdir()
    texts = [f"doc {i} mentions {EOT} in its text " * 3 for i in range(5)]
    for i, t in enumerate(texts):
        (tmp_path / "s" / f"{i}.txt").write_text(t)
    s = prepare([str(tmp_path / "s")], tmp_path / "o", vocab_size=300, progress=False)
    ids = np.concatenate(load_split(tmp_path / "o", "train") + load_split(tmp_path / "o", "val"))
    assert int((ids == s["eot_id"]).sum()) == s["documents"] == 5


def test_shards_dtype_and_counts(tmp_path, corpus):
    src, _ = corpus
    s = prepare([str(src)], tmp_path / "o", vocab_size=300, val_fraction=0.2, shard_tokens=500, progress=False)
    shards = s["splits"]["train"]["shards"]
    assert len(shards) > 1 and s["dtype"] == "uint16"
    assert shards == [f"train_{i:05d}.bin" for i in range(len(shards))]
    sizes = [(tmp_path / "o" / f).stat().st_size for f in shards]
    assert sum(sizes) == 2 * s["splits"]["train"]["tokens"]  # 2 bytes a token
    assert all(sz == 2 * 500 for sz in sizes[:-1]) and 0 < sizes[-1] <= 2 * 500
    arrays = load_split(tmp_path / "o", "train")
    assert [len(a) for a in arrays] == [sz // 2 for sz in sizes] and arrays[0].dtype == np.dtype("<u2")
    assert not arrays[0].flags.writeable
    assert int(max(a.max() for a in arrays)) < s["vocab_size"]
    assert load_meta(tmp_path / "o") == {k: v for k, v in s.items() if k != "seconds"}
    # The same corpus in one big shard holds the same tokens.
    one = prepare([str(src)], tmp_path / "one", vocab_size=300, val_fraction=0.2, progress=False)
    assert one["splits"]["train"]["shards"] == ["train_00000.bin"]
    assert np.array_equal(np.concatenate(arrays), load_split(tmp_path / "one", "train")[0])


def test_dtype_for():
    assert dtype_for(8192) == np.uint16 and dtype_for(2**16) == np.uint16 and dtype_for(2**16 + 1) == np.uint32


def test_jsonl_documents_and_bad_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    lines = [json.dumps({"text": f"record {i}: " + " ".join(WORDS)}, ensure_ascii=False) for i in range(20)]
    lines[3] = json.dumps({"text": "has a raw \u2028 line separator"}, ensure_ascii=False)
    bad = ["{not json", json.dumps({"id": 3}), json.dumps({"text": 5}), json.dumps(["text"])]
    f.write_text("\n".join(lines[:10] + bad + [""] + lines[10:]) + "\n", encoding="utf-8")
    s = prepare([str(f)], tmp_path / "o", vocab_size=300, val_fraction=0.2, progress=False)
    assert s["documents"] == 20 and s["skipped_jsonl_lines"] == 4 and s["files"] == 1
    got = decode_docs(tmp_path / "o", "train") + decode_docs(tmp_path / "o", "val")
    assert sorted(got) == sorted(json.loads(l)["text"] for l in lines)


def test_split_keeps_one_val_and_one_train_document(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * 20)
    s = prepare([str(tmp_path / "0.txt"), str(tmp_path / "1.txt")], tmp_path / "o", vocab_size=300,
                val_fraction=1e-9, progress=False)
    assert s["splits"]["val"]["documents"] == 1 and s["splits"]["train"]["documents"] == 1


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare([str(tmp_path / "nowhere")], tmp_path / "o", progress=False)
    (tmp_path / "t.txt").write_text("hello")
    for bad in (100, 256, 2**32 + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            prepare([str(tmp_path / "t.txt")], tmp_path / "o", vocab_size=bad, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(tmp_path / "t.txt")], tmp_path / "o", val_fraction=1.0, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\x00")
    (tmp_path / "empty" / "y.txt").write_bytes(b"\xff\xff")
    with pytest.raises(ValueError, match="no documents"):
        prepare([str(tmp_path / "empty")], tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="stoker prepare"):
        load_meta(tmp_path / "empty")
    assert not (tmp_path / "o").exists()  # nothing half-written was left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "t.txt"]


def two_docs(root) -> list[str]:
    """The smallest corpus prepare accepts: one document for each split."""
    (root / "s").mkdir()
    for i in range(2):
        (root / "s" / f"{i}.txt").write_text(f"hello world {i} " * 50)
    return [str(root / "s")]


def test_replaces_only_prepared_data(tmp_path):
    src = two_docs(tmp_path)
    prepare(src, tmp_path / "o", vocab_size=300, progress=False)
    before = (tmp_path / "o" / "meta.json").read_bytes()
    with pytest.raises(ValueError):
        prepare(src, tmp_path / "o", vocab_size=100, progress=False)
    assert (tmp_path / "o" / "meta.json").read_bytes() == before
    (tmp_path / "o" / "stale.bin").write_bytes(b"x")
    prepare(src, tmp_path / "o", vocab_size=260, progress=False)
    assert not (tmp_path / "o" / "stale.bin").exists() and load_meta(tmp_path / "o")["vocab_size"] == 260
    with pytest.raises(ValueError, match="unknown split"):
        load_split(tmp_path / "o", "test")
    # A folder that is not a data directory is never deleted.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prepared data directory"):
        prepare(src, tmp_path / "mine", vocab_size=300, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_progress_goes_to_stderr(tmp_path, capsys):
    prepare(two_docs(tmp_path), tmp_path / "o", vocab_size=300, progress=True)
    assert capsys.readouterr().out == ""


def test_default_sources_is_the_stdlib():
    (src,) = default_sources()
    assert (src / "os.py").is_file() and "site-packages" not in str(src) and "dist-packages" not in str(src)


def test_cli_prepare_bad_source_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stoker", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_odd_jsonl_lines_are_skipped_and_odd_text_is_kept(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    good = [f"record {i}: " + " ".join(WORDS) for i in range(6)]
    lines = [json.dumps({"text": t}) for t in good]
    # Legal JSON that is no UTF-8 text (lone surrogates, which once aborted the whole run),
    # and nesting deep enough to exhaust the parser's recursion.
    bad = ['{"text": "a\\ud800b"}', '{"text": "\\udc80 low half"}', "[" * 100_000]
    (src / "x.jsonl").write_text("\ufeff" + "\n".join(lines[:3] + bad + lines[3:]) + "\n", encoding="utf-8")
    odd = "NUL \x00, BOM \ufeff, lone CR \r, noncharacter \uffff, private use \ue000, astral 😀\n"
    (src / "odd.txt").write_text(odd, encoding="utf-8")
    s = prepare([str(src)], tmp_path / "o", vocab_size=300, val_fraction=0.3, progress=False)
    assert s["skipped_jsonl_lines"] == 3 and s["documents"] == 7  # the BOM does not cost the first line
    got = decode_docs(tmp_path / "o", "train") + decode_docs(tmp_path / "o", "val")
    assert sorted(got) == sorted(good + [odd])


def longest_run(text: str) -> int:
    return max(map(len, re.findall(r"\S+|\s+", text)), default=0)


@pytest.mark.parametrize("text", [
    "a" * 10_001,
    " " * 777 + "x",
    "ab " * 100 + "z" * 333 + "\n" * 200 + "tail",
    "".join(("q" if i % 3 else " ") * int(n) for i, n in enumerate(np.random.default_rng(0).integers(1, 400, 60))),
])
def test_bounded_runs_cuts_long_runs_and_keeps_every_character(text):
    pieces = list(bounded_runs([text], block=50))
    assert "".join(pieces) == text
    assert longest_run(text) >= 100 and max(map(longest_run, pieces)) < 2 * 50


def test_bounded_runs_passes_ordinary_text_through():
    text = "def f(x):\n    return x  # " + "y" * 49 + "\n" * 3
    assert list(bounded_runs([text, ""], block=50)) == [text]


def test_a_long_line_without_spaces_prepares_quickly_and_exactly(tmp_path):
    (tmp_path / "s").mkdir()
    long = "a" * 300_000  # took 35 s (250 KB) when it reached the BPE trainer as one "word"
    (tmp_path / "s" / "long.txt").write_text(long)
    for i in range(4):
        (tmp_path / "s" / f"n{i}.txt").write_text(f"normal document {i} with some words in it\n" * 20)
    t0 = time.perf_counter()
    prepare([str(tmp_path / "s")], tmp_path / "o", vocab_size=400, val_fraction=0.2, progress=False)
    assert time.perf_counter() - t0 < 15  # 0.5 s measured; generous for a busy machine
    assert long in decode_docs(tmp_path / "o", "train")  # it did reach tokenizer training, and round-trips


def test_corpus_too_small_for_both_splits_is_refused_at_prepare(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single document " * 20)
    with pytest.raises(ValueError, match="only 1 document"):
        prepare([str(tmp_path / "one.txt")], tmp_path / "o", progress=False)
    # Both splits get documents, but one of them only empty ones: no window to train or evaluate on.
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["some real text " * 10] + [""] * 9))
    with pytest.raises(ValueError, match="split would hold no text.*val_fraction"):
        prepare([str(f)], tmp_path / "o", val_fraction=0.2, progress=False)
    assert not (tmp_path / "o").exists()
    assert cli.main(["prepare", str(tmp_path / "one.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.lstrip("\n")  # the finished progress bar leaves a blank line off a terminal
    assert err.startswith("stoker: error: only 1 document") and err.count("\n") == 1


def _truncate(d):
    with open(d / "train_00000.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)


def _old_meta_truncated(d):
    meta = json.loads((d / "meta.json").read_text())
    for sp in meta["splits"].values():
        del sp["shard_tokens"]
    (d / "meta.json").write_text(json.dumps(meta))
    _truncate(d)


def _id_beyond_vocab(d):
    a = np.memmap(d / "val_00000.bin", dtype="<u2", mode="r+")
    a[10] = 600  # the vocabulary holds 512


def _edit_meta(change):
    def damage(d):
        meta = json.loads((d / "meta.json").read_text())
        change(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    return damage


DAMAGE = {
    "truncated shard": (_truncate, ValueError, r"train_00000.bin: [\d,]+ bytes, but meta.json records"),
    "truncated, meta.json without shard counts": (_old_meta_truncated, ValueError, r"train shards .*train_00000.bin"),
    "token id beyond the vocabulary": (_id_beyond_vocab, ValueError, r"val_00000.bin: holds token id 600"),
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text('{"vocab_size": 5'), ValueError,
                           r"meta.json: not valid JSON"),
    "meta.json without vocab_size": (_edit_meta(lambda m: m.pop("vocab_size")), ValueError,
                                     r"meta.json: vocab_size must be a positive integer, missing"),
    "meta.json with a string count": (_edit_meta(lambda m: m["splits"]["train"].update(tokens="12")), ValueError,
                                      r"meta.json: splits.train.tokens must be"),
    "meta.json splits not an object": (_edit_meta(lambda m: m.update(splits=[])), ValueError, r"meta.json: splits"),
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), FileNotFoundError, r"tokenizer.json is missing"),
    "missing shard": (lambda d: (d / "val_00000.bin").unlink(), FileNotFoundError, r"val_00000.bin is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_data_is_refused_with_one_line_naming_the_file(small_data, tmp_path, capsys, case):
    damage, error, message = DAMAGE[case]
    d = tmp_path / "data"
    shutil.copytree(small_data, d)
    load_split(d, "train"), load_split(d, "val")  # the undamaged copy loads
    damage(d)
    with pytest.raises(error, match=message):
        load_split(d, "train"), load_split(d, "val")
    # `stoker train` reports it in one line, before building anything.
    rc = cli.main(["train", f"--data.dir={d}", f"--train.out_dir={tmp_path / 'run'}", "--train.steps=1",
                   "--train.seq_len=32", "--train.device=cpu", "--train.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("stoker: error: data.dir: "), err
    assert re.search(message, err)


def test_gzip_and_parquet_sources_and_unreadable_files_named_and_counted(tmp_path, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    words = WORDS
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(6)]
    (src / "a.txt.gz").write_bytes(gzip.compress(texts[0].encode()))
    (src / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps({"text": t}) for t in texts[1:3]).encode()))
    pq.write_table(pa.table({"text": [texts[3], None, texts[4]], "id": [1, 2, 3]}), src / "c.parquet")
    (src / "d.txt").write_text(texts[5])
    (src / "broken.txt.gz").write_bytes(gzip.compress(b"lost")[:-6])  # cut short
    (src / "fake.parquet").write_text("not parquet at all")
    pq.write_table(pa.table({"body": ["no text column"]}), src / "other.parquet")
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "data"), "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err  # one line each on stderr, as it skips them
    skipped = [l for l in err.splitlines() if l.startswith("stoker prepare: skipped")]
    assert len(skipped) == 3 and {l.split()[3].rstrip(":") for l in skipped} == {"broken.txt.gz", "fake.parquet",
                                                                                   "other.parquet"}
    meta = load_meta(tmp_path / "data")
    assert meta["documents"] == 6 and meta["files"] == 4 and meta["skipped_jsonl_lines"] == 1  # the null row
    assert len(meta["unreadable"]) == 3 and all(": " in u for u in meta["unreadable"])
    data = b"".join(p.read_bytes() for p in sorted((tmp_path / "data").glob("*.bin")))
    tok = Tokenizer.load(tmp_path / "data")
    ids = np.frombuffer(data, dtype=meta["dtype"])
    assert sorted(t for t in tok.decode(ids.tolist()).split(EOT) if t) == sorted(texts)  # every readable text, whole
