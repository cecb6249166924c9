"""Serving metrics of the answer path: time to first token, inter-token latency, tokens, tokens/s, cost."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """Registered once per app."""

    def __init__(self, registry: CollectorRegistry) -> None:
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
