"""Serving metrics: request latency per endpoint, time to first token, inter-token latency, tokens, tokens/s,
cost. Each goes to Prometheus (histograms, counters) and to a bounded window of exact samples, from which
`/v1/serving` and the dashboard read percentiles beside freshness."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from ragtide.contracts.freshness import summarize

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WINDOW_SAMPLES = 5000


class _Window:
    """The last samples of one series with their times (thread-safe, bounded)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=WINDOW_SAMPLES)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append((time.time(), value))

    def since(self, t: float) -> list[float]:
        with self._lock:
            return [v for at, v in self._samples if at >= t]


class ServingMetrics:
    """Registered once per app; `snapshot()` is what /v1/serving returns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.request_seconds = Histogram(
            "ragtide_request_seconds", "API request latency", ["endpoint"], registry=registry, buckets=_LATENCY_BUCKETS
        )
        self.ttft = Histogram(
            "ragtide_answer_ttft_seconds",
            "Time from request to the first generated token",
            ["endpoint"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "ragtide_answer_inter_token_seconds",
            "Time between streamed tokens",
            ["endpoint"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.tokens = Counter(
            "ragtide_answer_tokens",
            "Generator tokens by kind (prompt, completion)",
            ["kind", "tenant"],
            registry=registry,
        )
        self.tokens_per_s = Histogram(
            "ragtide_answer_tokens_per_second",
            "Completion tokens per second of generation (after the first token)",
            registry=registry,
            buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600),
        )
        self.cost = Counter(
            "ragtide_answer_cost", "Cost of answers in the configured currency units", ["tenant"], registry=registry
        )
        self.outcomes = Counter(
            "ragtide_answer_requests", "Answer requests by outcome", ["endpoint", "outcome"], registry=registry
        )
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        self._totals = {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}

    def _window(self, series: str, endpoint: str) -> _Window:
        with self._lock:
            return self._windows.setdefault((series, endpoint), _Window())

    def request(self, endpoint: str, seconds: float) -> None:
        """One finished request."""
        self.request_seconds.labels(endpoint).observe(seconds)
        self._window("latency", endpoint).add(seconds)

    def first_token(self, endpoint: str, seconds: float) -> None:
        """Time to first token."""
        self.ttft.labels(endpoint).observe(seconds)
        self._window("ttft", endpoint).add(seconds)

    def inter_token(self, endpoint: str, seconds: float) -> None:
        """Gap between two streamed tokens."""
        self.itl.labels(endpoint).observe(seconds)
        self._window("itl", endpoint).add(seconds)

    def rate(self, tokens_per_s: float) -> None:
        """Generation speed of one answer."""
        self.tokens_per_s.observe(tokens_per_s)
        self._window("tokens_per_s", "all").add(tokens_per_s)

    def account(self, tenant: str, prompt: int, completion: int, cost: float) -> None:
        """Tokens and cost of one answer."""
        self.tokens.labels("prompt", tenant).inc(prompt)
        self.tokens.labels("completion", tenant).inc(completion)
        self.cost.labels(tenant).inc(cost)
        with self._lock:
            self._totals["prompt_tokens"] += prompt
            self._totals["completion_tokens"] += completion
            self._totals["cost"] += cost

    def snapshot(self, window_s: float = 60.0) -> dict[str, Any]:
        """Percentiles over the last `window_s` seconds per series and endpoint, plus totals since start."""
        since = time.time() - window_s
        with self._lock:
            windows = dict(self._windows)
            totals = dict(self._totals)
        out: dict[str, Any] = {"window_s": window_s, "totals": totals}
        for (series, endpoint), window in sorted(windows.items()):
            values = window.since(since)
            stats: dict[str, Any] = summarize(values)
            if series == "latency":
                stats["per_s"] = round(len(values) / window_s, 3)
            out.setdefault(series, {})[endpoint] = stats
        return out
