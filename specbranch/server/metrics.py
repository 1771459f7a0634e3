"""Prometheus metrics of the server (``GET /metrics``, text format).

One registry per app, so several servers in one process (tests) do not collide. Request counts
and latency are measured by an ASGI middleware around the whole response, streaming included;
token and speculation counters are added per finished generation from its ``Metrics``.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engines import GenerationResult

# Counters copied from Metrics (DESIGN.md §2.6; vLLM names where one exists).
SPECULATIVE_COUNTERS = (
    ("num_drafts", "draft blocks submitted for verification"),
    ("num_draft_tokens", "drafted tokens submitted for verification"),
    ("num_accepted_tokens", "drafted tokens accepted by the target"),
    ("drafted_tokens", "tokens the draft produced outside unselected branches"),
    ("rollback_tokens", "drafted tokens discarded (unselected branches not counted)"),
    ("branch_rollback_tokens", "tokens of branches that were not selected"),
    ("num_branch_points", "branch points (k candidates forked)"),
    ("num_branch_hits", "branch points where the target's token was one of the candidates"),
    ("target_forwards", "target forward passes, prefill included"),
    ("draft_forwards", "single-row draft forward passes, prefill included"),
    ("branch_forwards", "batched draft forward passes over branch rows"),
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self, known_paths: set[str]) -> None:
        self.registry = CollectorRegistry()
        self.known_paths = known_paths
        r = self.registry
        self.requests = Counter("specbranch_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("specbranch_request_latency_seconds", "time from request to the end of the response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("specbranch_time_to_first_token_seconds",
                              "time from request to the first generated token (queueing included)",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("specbranch_queue_wait_seconds", "time a request waited for the engine",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("specbranch_prompt_tokens", "prompt tokens processed", ["engine"], registry=r)
        self.generation_tokens = Counter("specbranch_generation_tokens", "tokens generated", ["engine"], registry=r)
        self.finished = Counter("specbranch_generations", "generations by engine and finish reason",
                                ["engine", "finish_reason"], registry=r)
        self.speculative = {
            name: Counter(f"specbranch_{name}", text, ["engine"], registry=r) for name, text in SPECULATIVE_COUNTERS
        }
        self.waiting = Gauge("specbranch_requests_waiting", "requests waiting for the engine", registry=r)
        self.running = Gauge("specbranch_requests_running", "requests being generated", registry=r)

    def track_queue(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.waiting.set_function(waiting)
        self.running.set_function(running)

    def endpoint(self, path: str) -> str:
        # Unknown paths share one label so scanners cannot blow up the series count.
        return path if path in self.known_paths else "other"

    def observe(self, endpoint: str, engine: str, result: GenerationResult, submitted_at: float,
                started_at: float | None, first_token_at: float | None) -> None:
        m = result.metrics
        self.prompt_tokens.labels(engine).inc(m.prompt_tokens)
        self.generation_tokens.labels(engine).inc(len(result.tokens))
        self.finished.labels(engine, result.finish_reason).inc()
        for name, counter in self.speculative.items():
            counter.labels(engine).inc(getattr(m, name))
        if started_at is not None:
            self.queue_wait.observe(started_at - submitted_at)
        if first_token_at is not None:
            self.ttft.labels(endpoint).observe(first_token_at - submitted_at)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every response by endpoint and status and times it to its last byte (pure ASGI, so
    streaming responses and client disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.metrics.endpoint(scope["path"])
        status = 500  # if the app fails before it starts a response
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
