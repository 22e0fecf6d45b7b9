"""Every Prometheus metric the server exports, on one per-app registry.

A registry per app (not the global default) lets tests build many apps in one process.
Label values are bounded: endpoints are route templates, stages and decisions are enums.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PROBE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("neuronguard_requests", "HTTP requests by route template and status.", ["endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "neuronguard_request_duration_seconds", "Request time until the last byte (streams included).",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "neuronguard_time_to_first_token_seconds", "Arrival to the first released token (queue + prefill + probe).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "neuronguard_inter_token_latency_seconds", "Time between released tokens.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("neuronguard_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("neuronguard_generation_tokens", "Tokens generated.", registry=r)
        self.guard_decisions = Counter(
            "neuronguard_guard_decisions", "Guard decisions on chat completions.", ["stage", "decision"], registry=r
        )
        self.probe_score = Histogram("neuronguard_probe_score", "Probe scores.", ["stage"], buckets=_SCORE_BUCKETS, registry=r)
        self.probe_latency = Histogram(
            "neuronguard_probe_latency_seconds", "Time to score one probe call.", buckets=_PROBE_BUCKETS, registry=r
        )
        self.patched_tokens = Counter("neuronguard_patched_tokens", "Positions whose neurons were live-patched.", registry=r)
        self.queue_depth = Gauge("neuronguard_queue_depth", "Jobs waiting for the serial model worker.", registry=r)
        self.running = Gauge("neuronguard_running_requests", "Jobs running on the serial worker or in flight on the batching engine.", registry=r)
        self.registered_hooks = Gauge(
            "neuronguard_registered_hooks", "Forward hooks on the served model and patch source beyond the batching engine's own (0 between jobs).", registry=r
        )
        self.batch_size = Gauge(
            "neuronguard_batch_size", "Requests in the batching engine's latest step (0 with --engine serial).", registry=r
        )
        self.kv_cache_usage = Gauge(
            "neuronguard_kv_cache_usage", "Fraction of the batching engine's paged KV cache in use.", registry=r
        )
        self.engine_restarts = Counter(
            "neuronguard_engine_restarts", "Batching engines started in place of one that a failed step stopped.", registry=r
        )
        self.ready = Gauge("neuronguard_ready", "1 once model, bundle and patch source are loaded.", registry=r)
        self.model_info = Gauge("neuronguard_model_info", "The served model and guard bundle.", ["model", "bundle"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
