"""Prometheus metrics with vLLM-style names (`unmask:` prefix, label `model_name`).

Engine-wide values (running / waiting, KV usage, steps, positions, tokens committed) are read from the engine's
stats at scrape time; per-request counters and histograms are recorded by the serving layer as requests end.
"""
from __future__ import annotations

from typing import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .engine_client import EngineClient

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0)
TPF_BUCKETS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class _EngineCollector:
    def __init__(self, model_name: str, engine: EngineClient) -> None:
        self.model_name, self.engine = model_name, engine

    def collect(self) -> Iterator[Metric]:
        s, label = self.engine.stats(), [self.model_name]

        def family(cls: type, name: str, doc: str, value: float) -> Metric:
            m = cls(name, doc, labels=["model_name"])
            m.add_metric(label, value)
            return m

        yield family(GaugeMetricFamily, "unmask:num_requests_running", "Requests in the running batch.", s.running)
        yield family(GaugeMetricFamily, "unmask:num_requests_waiting", "Requests queued in the scheduler.", s.waiting)
        yield family(GaugeMetricFamily, "unmask:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).",
                     s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0)
        yield family(CounterMetricFamily, "unmask:denoising_steps", "Engine steps (one batched forward each).",
                     s.steps)
        yield family(CounterMetricFamily, "unmask:positions_computed",
                     "Query positions fed through the network, over all requests.", s.positions_computed)
        yield family(CounterMetricFamily, "unmask:tokens_committed", "Tokens committed by the denoiser.",
                     s.tokens_committed)
        yield family(CounterMetricFamily, "unmask:prefix_cache_queries",
                     "Prefix cache queries, in prompt tokens looked up (block-causal models).", s.prefix_cache_queries)
        yield family(CounterMetricFamily, "unmask:prefix_cache_hits",
                     "Prefix cache hits, in prompt tokens found cached.", s.prefix_cache_hits)


class Metrics:
    def __init__(self, model_name: str, engine: EngineClient) -> None:
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.prompt_tokens = Counter("unmask:prompt_tokens", "Prompt tokens processed (per choice).", lab,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("unmask:generation_tokens", "Tokens generated (returned to clients).",
                                         lab, registry=r).labels(model_name)
        self._success = Counter("unmask:request_success", "Finished requests (per choice) by finish reason.",
                                lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("unmask:time_to_first_token_seconds", "Arrival to the first finished block.",
                              lab, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("unmask:e2e_request_latency_seconds", "Arrival to the final output.", lab,
                             buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("unmask:time_per_output_token_seconds",
                              "(e2e - ttft) / (generated tokens - 1), per request with 2+ tokens.", lab,
                              buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.tokens_per_forward = Histogram("unmask:tokens_per_forward", "Tokens committed per denoising step, "
                                            "per request.", lab, buckets=TPF_BUCKETS, registry=r).labels(model_name)
        self.model_name = model_name
        r.register(_EngineCollector(model_name, engine))

    def request_finished(self, reason: str, prompt_tokens: int, generated: int, e2e: float, ttft: float | None,
                         tokens_per_forward: float) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
            if generated > 1:
                self.tpot.observe(max(e2e - ttft, 0.0) / (generated - 1))
        if tokens_per_forward > 0:
            self.tokens_per_forward.observe(tokens_per_forward)

    def request_aborted(self) -> None:
        self._success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
