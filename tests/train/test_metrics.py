"""The device-peak probe behind MFU."""

import json

import torch

from stoker.train import metrics


def test_cpu_peak_is_robust_to_busy_cores_and_cached(monkeypatch, tmp_path):
    cache = tmp_path / "peak_flops.json"
    monkeypatch.setattr(metrics, "CACHE", cache)
    monkeypatch.setattr(metrics.os, "cpu_count", lambda: 4)
    calls = []

    def probe(dtype, n=2048, seconds=1.0):
        calls.append(torch.get_num_threads())
        # Two of four cores busy elsewhere: all four threads get half the machine, while one
        # thread runs at full speed on a free core.
        return 2.0 if torch.get_num_threads() == 4 else 1.0

    monkeypatch.setattr(metrics, "measure_matmul_flops", probe)
    threads = torch.get_num_threads()
    assert metrics.peak_flops(torch.device("cpu"), "fp32") == 4.0  # one core x 4, not the busy all-core 2.0
    assert torch.get_num_threads() == threads  # restored
    assert sorted(calls) == [1, 4]
    assert list(json.loads(cache.read_text()).values()) == [4.0]
    assert metrics.peak_flops(torch.device("cpu"), "fp32") == 4.0 and len(calls) == 2  # from the cache
    metrics.peak_flops(torch.device("cpu"), "bf16", cache=False)
    assert len(json.loads(cache.read_text())) == 1  # cache=False: used, not kept


def test_probe_stays_short_where_a_dtype_is_emulated(monkeypatch):
    """A CPU without bf16 instructions took 64 s per 2048 product; the probe must not wait on that."""
    import time

    def slow_mm(a, b):  # 1000x below a real peak: 2048^3 would take ~31 s
        time.sleep((a.shape[0] / 256) ** 3 * 0.06)

    monkeypatch.setattr(metrics.torch, "mm", slow_mm)
    t0 = time.perf_counter()
    flops = metrics.measure_matmul_flops(torch.bfloat16)
    assert time.perf_counter() - t0 < 5
    # It stopped at 512 (0.48 s a product); the figure is that size's rate, within sleep jitter.
    assert 0.8 < flops / (2 * 512**3 / 0.48) <= 1.01
