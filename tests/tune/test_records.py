import json

import pytest
import torch

from stoker.data.loader import DataLoader
from stoker.data.tokenizer import Tokenizer
from stoker.models.gpt import IGNORE_INDEX, linear_cross_entropy
from stoker.tune.records import RecordError, RecordRows, read_records, split


@pytest.fixture(scope="module")
def tok(small_data) -> Tokenizer:
    return Tokenizer.load(small_data)


def lines(tmp_path, *recs) -> str:
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return p


GOOD = {"prompt": "x = ", "completion": "1"}


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"prompt": "a"}, "needs prompt and completion, or messages"),
    ({"prompt": "a", "completion": ""}, "completion is empty"),
    ({"prompt": "a", "completion": 3}, "completion must be a string"),
    ({"prompt": "a", "completion": "b", "label": 1}, "unknown field(s) label"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}, "must be the assistant's"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "role must be"),
    ({"prompt": "word " * 200, "completion": "b"}, "raise train.seq_len"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, tok, bad, needle):
    path = lines(tmp_path, GOOD, "", bad)  # line 2 blank, the bad record on line 3
    with pytest.raises(RecordError) as e:
        read_records(path, tok, max_tokens=65)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and needle in msg and "\n" not in msg


def test_only_completion_tokens_are_targets_and_rows_pack(tmp_path, tok):
    recs = [{"prompt": f"value_{i} = ", "completion": f"{i} + {i}"} for i in range(6)]
    examples, tasks = read_records(lines(tmp_path, *recs), tok, max_tokens=65)
    assert tasks == [""]
    for e, r in zip(examples, recs):
        assert e.ids[:e.n_prompt] == tok.encode(r["prompt"])
        assert e.ids[e.n_prompt:] == tok.encode(r["completion"]) + [tok.eot_id]  # it learns to stop
    packed, single = RecordRows(examples, 64, tok.eot_id, pack=True), RecordRows(examples, 64, tok.eot_id, pack=False)
    assert len(single) == 6 and len(packed) < 6  # short records share rows
    for rows in (packed, single):
        loader = DataLoader(rows, batch_size=len(rows), seed=0, shuffle=False)
        x, y = loader.batch(0)
        # The targets are exactly the completions' tokens, each once, in order.
        got = [int(t) for t in y.flatten() if t != IGNORE_INDEX]
        # (a target at position j is token j + 1: a row's first token is never a target, and no
        # record starts with its completion)
        assert got == [t for e in examples for t in e.ids[e.n_prompt:]]
        assert torch.equal(x[:, 1:][y[:, :-1] != IGNORE_INDEX], y[:, :-1][y[:, :-1] != IGNORE_INDEX])


def test_prompt_tokens_get_no_gradient(tmp_path, tok):
    """The loss through the model's chunked head against float64 cross entropy over the
    completion positions alone, and a zero gradient at every prompt position."""
    examples, _ = read_records(lines(tmp_path, *[{"prompt": f"a{i} = ", "completion": f"b{i}"} for i in range(4)]),
                               tok, max_tokens=33)
    _, y = DataLoader(RecordRows(examples, 32, tok.eot_id, pack=False), 4, 0, shuffle=False).batch(0)
    torch.manual_seed(0)
    h = torch.randn(*y.shape, 16, requires_grad=True)
    w = torch.randn(tok.vocab_size, 16)
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    keep = y != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy((h.double() @ w.double().t())[keep], y[keep])
    assert abs(loss.item() - ref.item()) < 1e-5  # fp32 against float64 on logits of scale ~10
    assert (h.grad[~keep] == 0).all() and (h.grad[keep].abs().sum(-1) > 0).all()


def test_validation_split_is_seeded_and_disjoint(tmp_path, tok):
    examples, _ = read_records(lines(tmp_path, *[{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]), tok, 65)
    train, val = split(examples, 0.25, seed=3)
    again, val2 = split(examples, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15 and val == val2 and train == again
    assert not set(map(id, train)) & set(map(id, val))
    with pytest.raises(RecordError, match="at least 2"):
        split(examples[:1], 0.1, 0)
