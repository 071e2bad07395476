"""Prometheus metrics of a server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stoker.serve.engine import EngineMetrics

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 10.0


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stoker_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.queue = Gauge("stoker_queue_depth", "requests waiting to join the batch", ["model"], registry=r)
        self.running = Gauge("stoker_running_sequences", "sequences in the running batch", ["model"], registry=r)
        self.batch = Histogram("stoker_batch_size", "sequences per decode step", ["model"], buckets=BATCH_BUCKETS,
                               registry=r)
        self.generated = Counter("stoker_generated_tokens", "tokens generated", ["model"], registry=r)
        self.tps = Gauge("stoker_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:.0f} s",
                         ["model"], registry=r)
        self.ttft = Histogram("stoker_time_to_first_token_seconds", "from submission to the first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("stoker_request_latency_seconds", "from submission to the last generated token",
                                 ["model", "finish_reason"], buckets=LATENCY_BUCKETS, registry=r)
        self.loaded = Gauge("stoker_model_loaded", "1 while the model is resident", ["model"], registry=r)
        self.loads = Counter("stoker_model_loads", "times the model was loaded", ["model"], registry=r)
        self.memory = Gauge("stoker_model_memory_bytes", "memory a loaded model holds: weights, kv_cache (the "
                            "running sequences' keys and values), prefix_cache, adapters (the loaded ones' tensors)", ["model", "kind"],
                            registry=r)
        self.adapter_loads = Counter("stoker_adapter_loads", "times an adapter was loaded into one of its model's "
                                     "slots", ["model", "adapter"], registry=r)
        self.prefix_tokens = Counter("stoker_prefix_cache_hit_tokens", "prompt tokens whose keys and values came "
                                     "from the prefix cache", ["model"], registry=r)
        self.prompt_tokens = Counter("stoker_prompt_tokens", "prompt tokens admitted", ["model"], registry=r)

    def for_model(self, name: str) -> "ModelMetrics":
        return ModelMetrics(self, name)


class ModelMetrics(EngineMetrics):
    """The engine's hooks for one model, with a sliding window for tokens/s."""

    def __init__(self, m: ServeMetrics, name: str):
        self.m, self.name = m, name
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        m.tps.labels(name).set_function(self._rate)

    def _rate(self) -> float:
        with self._lock:
            now = time.monotonic()
            while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                self._window.popleft()
            return sum(n for _, n in self._window) / RATE_WINDOW_S

    def queue_depth(self, n: int) -> None:
        self.m.queue.labels(self.name).set(n)

    def batch_size(self, n: int) -> None:
        self.m.batch.labels(self.name).observe(n)

    def running(self, n: int) -> None:
        self.m.running.labels(self.name).set(n)

    def tokens(self, n: int) -> None:
        self.m.generated.labels(self.name).inc(n)
        with self._lock:
            self._window.append((time.monotonic(), n))

    def first_token(self, seconds: float) -> None:
        self.m.ttft.labels(self.name).observe(seconds)

    def finished(self, seconds: float, reason: str) -> None:
        self.m.latency.labels(self.name, reason).observe(seconds)

    def memory(self, kind: str, nbytes: int) -> None:
        self.m.memory.labels(self.name, kind).set(nbytes)

    def adapter_load(self, name: str) -> None:
        self.m.adapter_loads.labels(self.name, name).inc()

    def prefix_hit(self, tokens: int, of: int) -> None:
        self.m.prefix_tokens.labels(self.name).inc(tokens)
        self.m.prompt_tokens.labels(self.name).inc(of)
