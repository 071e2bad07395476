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
