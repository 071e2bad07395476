import numpy as np
import pytest

from stoker.data.loader import DataLoader, TokenWindows


def windows(n_tokens=1000, seq_len=8, shards=3):
    data = np.arange(n_tokens, dtype=np.uint16)
    return TokenWindows(np.array_split(data, shards), seq_len)


def test_windows_stay_inside_shards_and_have_seq_len_plus_one():
    w = windows()
    for i in range(len(w)):
        x = w[i]
        assert len(x) == 9
        assert np.all(np.diff(x) == 1)  # contiguous, so never spans a shard boundary


def test_no_sample_repeats_within_an_epoch_and_all_are_visited():
    w = windows()
    loader = DataLoader(w, batch_size=4, seed=1)
    n = len(w)
    seen = [i for step in range(n // 4) for i in loader.global_indices(step)]
    assert len(seen) == len(set(seen)) == (n // 4) * 4
    # The next epoch is a different order of the same windows.
    nxt = [i for step in range(n // 4, 2 * (n // 4)) for i in loader.global_indices(step)]
    assert nxt != seen


def test_batches_identical_across_resume():
    w = windows()
    a = DataLoader(w, batch_size=4, seed=7)
    run = [next(a) for _ in range(10)]
    b = DataLoader(w, batch_size=4, seed=7)
    for _ in range(6):
        next(b)
    c = DataLoader(w, batch_size=4, seed=7)
    c.load_state_dict(b.state_dict())
    for i in range(6, 10):
        x, y = next(c)
        assert np.array_equal(x, run[i][0]) and np.array_equal(y, run[i][1])


def test_samples_depend_on_step_not_process_count():
    w = windows()
    one = DataLoader(w, batch_size=8, seed=3)
    for step in (0, 5, 40):
        x1, _ = one.batch(step)
        parts = [DataLoader(w, batch_size=8, seed=3, dp_rank=r, dp_world=4).batch(step)[0] for r in range(4)]
        assert np.array_equal(np.concatenate(parts), x1)


def test_resume_refuses_a_different_stream():
    w = windows()
    state = DataLoader(w, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(w, batch_size=8, seed=1).load_state_dict(state)


def test_too_little_data():
    with pytest.raises(ValueError, match="too few"):
        TokenWindows([np.arange(5)], 8)


def test_too_little_data_names_the_shard(tmp_path):
    # The trainer's message: which split is short, and what to do about it.
    f = tmp_path / "val_00000.bin"
    np.arange(5, dtype="<u2").tofile(f)
    with pytest.raises(ValueError, match=r"/val_00000.bin holds 5 tokens: .*seq_len 8 \+ 1; use a shorter seq_len"):
        TokenWindows([np.memmap(f, dtype="<u2", mode="r")], 8)
