"""Prometheus metrics of `moin-hub serve` (``GET /metrics``): counters, histograms, the engine's gauges."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..hub.registry import Registry
from .engine import EngineStats

#: Route-latency histogram buckets (seconds) of ``/metrics``.
ROUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); thread-safe."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            self.counts[index] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {total}", f"{name}_count {running}"]
        return out


@dataclass
class ServerMetrics:
    """What the server counts besides the engine's own :class:`~moin_hub.serving.engine.EngineStats`."""

    route_seconds: Histogram = field(default_factory=lambda: Histogram(ROUTE_BUCKETS))
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    expert_requests: dict[str, int] = field(default_factory=dict)
    registry_updates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def count_expert(self, expert: str) -> None:
        with self.lock:
            self.expert_requests[expert] = self.expert_requests.get(expert, 0) + 1

    def count_refresh(self) -> None:
        with self.lock:
            self.registry_updates += 1


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsSource(Protocol):
    """What ``/metrics`` reads besides the server's own counters: an
    :class:`~moin_hub.serving.engine.ExpertEngine`, or the vLLM backend (same counters, its upstreams' cache)."""

    stats: EngineStats

    @property
    def registry(self) -> Registry: ...

    def cache_info(self) -> dict[str, Any]: ...


def render_metrics(engine: MetricsSource, metrics: ServerMetrics, pending: int, extra: Sequence[str] = ()) -> str:
    """The Prometheus text exposition of the server's and the engine's counters, then ``extra`` lines."""
    stats = engine.stats.snapshot()
    cache = engine.cache_info()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    with metrics.lock:
        requests = sorted(metrics.requests.items())
        experts = sorted(metrics.expert_requests.items())
        updates = metrics.registry_updates
    metric("moin_requests_total", "counter", "HTTP requests by path and status.",
           [(f'{{path="{_label(p)}",status="{s}"}}', n) for (p, s), n in requests])
    metric("moin_expert_requests_total", "counter", "Generation requests by expert (base: the base model).",
           [(f'{{expert="{_label(e)}"}}', n) for e, n in experts])
    counters = [("moin_cache_hits_total", "cache_hits", "Requests whose expert adapter was already loaded."),
                ("moin_cache_misses_total", "cache_misses", "Requests that had to load their expert adapter."),
                ("moin_adapter_loads_total", "loads", "Adapters downloaded (verified) and loaded."),
                ("moin_adapter_load_seconds_total", "load_seconds", "Time spent loading adapters."),
                ("moin_adapter_evictions_total", "evictions", "Adapters evicted from the cache."),
                ("moin_prefetches_total", "prefetched", "Runner-up experts prefetched."),
                ("moin_mixtures_built_total", "mixtures", "Weighted mixtures of experts built."),
                ("moin_batches_total", "batches", "Generation batches run."),
                ("moin_generated_tokens_total", "generated_tokens", "Tokens generated."),
                ("moin_prompt_tokens_total", "prompt_tokens", "Prompt tokens processed."),
                ("moin_generation_seconds_total", "generation_seconds", "Time spent generating.")]
    for name, key, help_text in counters:
        metric(name, "counter", help_text, [("", stats[key])])
    rate = stats["generated_tokens"] / stats["generation_seconds"] if stats["generation_seconds"] else 0.0
    metric("moin_tokens_per_second", "gauge", "Generated tokens per second of generation time, since start.",
           [("", round(rate, 3))])
    metric("moin_registry_updates_total", "counter", "Times the server moved to a new registry commit.",
           [("", updates)])
    metric("moin_registry_experts", "gauge", "Experts in the registry commit served.", [("", len(engine.registry))])
    metric("moin_loaded_adapters", "gauge", "Expert adapters loaded on the base model.", [("", len(cache["loaded"]))])
    metric("moin_loaded_adapter_bytes", "gauge", "Bytes of loaded adapter weights.", [("", cache["bytes"])])
    metric("moin_cache_capacity", "gauge", "Adapters the cache may hold.", [("", cache["capacity"])])
    metric("moin_pending_requests", "gauge", "Requests waiting for a batch.", [("", pending)])
    lines += metrics.route_seconds.lines("moin_route_latency_seconds", "Routing latency (embedding included).")
    lines += metrics.batch_sizes.lines("moin_batch_size", "Requests per generation batch.")
    lines += extra
    return "\n".join(lines) + "\n"
