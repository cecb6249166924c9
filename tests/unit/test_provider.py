"""The OpenAI-compatible embeddings encoder against a scripted server (httpx MockTransport): what it sends,
how it packs requests, which faults it retries (honouring Retry-After), when it gives up as an outage (never a
dead letter), what it refuses at start-up, and the circuit breaker. The real server, with faults injected by a
proxy, is in tests/integration/test_provider.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ragtide.contracts.errors import ConfigError, ProviderUnavailable
from ragtide.contracts.settings import ProviderSettings
from ragtide.embedder.provider import OpenAIEmbeddingsEncoder, ProviderRejected
from ragtide.embedder.worker import is_transient

DIM = 8


def unit(text: str) -> np.ndarray:
    v = np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class Server:
    """A scripted provider: answers each request with the next fault, or with unit vectors per text."""

    def __init__(self, faults: list[Callable[[list[str]], httpx.Response]] | None = None, scale: float = 1.0) -> None:
        self.faults = list(faults or [])
        self.bodies: list[dict[str, Any]] = []
        self.scale = scale

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        texts = body["input"]
        if self.faults:
            return self.faults.pop(0)(texts)
        data = [
            {"object": "embedding", "index": i, "embedding": encoded(unit(t) * self.scale, body["encoding_format"])}
            for i, t in enumerate(texts)
        ]
        data.reverse()  # servers may answer out of order: `index` says which is which
        return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 3 * len(texts)}})

    @property
    def inputs(self) -> list[list[str]]:
        return [b["input"] for b in self.bodies[1:]]  # after the start-up probe


def encoded(v: np.ndarray, fmt: str) -> Any:
    return base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()


def status(code: int, retry_after: str | None = None) -> Callable[[list[str]], httpx.Response]:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return lambda texts: httpx.Response(code, text=f"status {code}", headers=headers)


def short(texts: list[str]) -> httpx.Response:
    return httpx.Response(200, json={"data": [{"index": 0, "embedding": unit(texts[0]).tolist()}]})


def timeout(texts: list[str]) -> httpx.Response:
    raise httpx.ReadTimeout("slow")


def make(server: Server, registry: CollectorRegistry | None = None, **overrides: Any) -> tuple[Any, list[float]]:
    settings = ProviderSettings(url="http://provider.test/v1", model="m", api_key="sk-test", **overrides)
    sleeps: list[float] = []
    enc = OpenAIEmbeddingsEncoder(settings, registry, transport=httpx.MockTransport(server), sleep=sleeps.append)
    return enc, sleeps


def test_it_embeds_in_input_order_with_the_key_the_model_and_base64() -> None:
    server = Server()
    enc, _ = make(server)
    texts = ["alpha", "beta", "gamma"]
    got = enc.encode(texts)
    assert enc.dim == DIM and enc.model_name == "m" and enc.provider == "openai:provider.test"
    np.testing.assert_allclose(got, np.stack([unit(t) for t in texts]), atol=1e-6)
    assert server.bodies[-1] == {"model": "m", "input": texts, "encoding_format": "base64"}
    assert enc.encode([]).shape == (0, DIM)


def test_requests_are_packed_by_count_and_by_tokens() -> None:
    server = Server()
    enc, _ = make(server, batch_size=3, batch_tokens=40)
    enc.encode([f"text {i}" for i in range(7)])  # two tokens each: count-bound
    assert sorted(len(b) for b in server.inputs) == [1, 3, 3]  # sent concurrently: in any order
    server.bodies[1:] = []
    long = " ".join(["word"] * 30)  # 30 tokens: two do not fit 40
    enc.encode([long, long, "short one"])
    assert sorted(len(b) for b in server.inputs) == [1, 2]


def test_429_with_retry_after_500_a_timeout_and_a_short_list_are_retried_and_counted() -> None:
    registry = CollectorRegistry()
    server = Server()
    enc, sleeps = make(server, registry, retries=4, backoff_s=0.1)
    server.faults = [status(429, "7"), status(500), timeout, short]
    got = enc.encode(["one", "two"])
    np.testing.assert_allclose(got, np.stack([unit("one"), unit("two")]), atol=1e-6)
    assert sleeps == [7.0, 0.2, 0.4, 0.8]  # Retry-After over the backoff, then the doubling backoff
    for reason in ("429", "5xx", "timeout", "short"):
        labels = {"provider": enc.provider, "model": "m", "reason": reason}
        assert registry.get_sample_value("ragtide_provider_retries_total", labels) == 1
    ok = registry.get_sample_value(
        "ragtide_provider_requests_total", {"provider": enc.provider, "model": "m", "outcome": "ok"}
    )
    assert ok == 2  # the probe and this one
    assert registry.get_sample_value("ragtide_provider_tokens_total", {"provider": enc.provider, "model": "m"}) == 12


def test_past_its_retries_it_is_an_outage_the_worker_retries_never_a_dead_letter() -> None:
    server = Server()
    enc, sleeps = make(server, retries=2, backoff_s=1, max_retry_after_s=5)
    server.faults = [status(503, "600")] * 3
    with pytest.raises(ProviderUnavailable, match="after 3 attempt") as err:
        enc.encode(["x"])
    assert is_transient(err.value) and sleeps == [5, 5]  # Retry-After capped by max_retry_after_s


def test_a_refused_key_is_an_outage_that_names_the_setting_and_a_refused_input_is_the_rows() -> None:
    server = Server()
    enc, _ = make(server, retries=0)
    server.faults = [status(401)]
    with pytest.raises(ProviderUnavailable, match=r"encoder.api.api_key"):
        enc.encode(["x"])
    server.faults = [status(404)]
    with pytest.raises(ProviderUnavailable, match=r"encoder.api.model"):
        enc.encode(["x"])
    server.faults = [status(400)]
    with pytest.raises(ProviderRejected, match="refused the input") as err:
        enc.encode(["x"])
    assert not is_transient(err.value)  # the worker isolates the row and dead-letters it with the reason


def test_the_breaker_opens_and_then_fails_fast_without_calling() -> None:
    server = Server()
    enc, _ = make(server, retries=0, breaker_failures=2, breaker_reset_s=30)
    server.faults = [status(502), status(502)]
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            enc.encode(["x"])
    calls = len(server.bodies)
    with pytest.raises(ProviderUnavailable, match="circuit open"):
        enc.encode(["x"])
    assert len(server.bodies) == calls


def test_start_up_refuses_a_provider_that_does_not_fit() -> None:
    with pytest.raises(ConfigError, match=r"encoder.api.dim: .* 8 dimensions, not 384"):
        make(Server(), dim=384)
    with pytest.raises(ConfigError, match="RAGTIDE_ENCODER__API__NORMALIZE=true"):
        make(Server(scale=3.0))
    enc, _ = make(Server(scale=3.0), normalize=True)
    assert np.allclose(np.linalg.norm(enc.encode(["a", "b"]), axis=1), 1.0)
    with pytest.raises(ProviderUnavailable, match="answered 1 vectors for 2 inputs"):
        make(Server([short] * 5), retries=1)  # maybe a provider under load: an outage, with its cause
    with pytest.raises(ConfigError, match="ENCODING_FORMAT=float"):
        make(Server([status(400)]))
    with pytest.raises(ConfigError, match=r"encoder.api.model"):
        OpenAIEmbeddingsEncoder(ProviderSettings(url="http://provider.test/v1"))


def test_floats_on_the_wire_and_dimensions_when_asked() -> None:
    server = Server()
    enc, _ = make(server, encoding_format="float", dim=DIM, send_dimensions=True)
    enc.encode(["a"])
    assert server.bodies[-1]["encoding_format"] == "float" and server.bodies[-1]["dimensions"] == DIM


def test_a_refused_request_of_several_texts_is_halved_down_to_the_text_refused() -> None:
    server = Server()
    enc, _ = make(server, retries=0)

    def too_many_or_bad(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["input"]
        if len(texts) > 2 or "BAD" in texts:
            server.bodies.append(json.loads(request.content))
            return httpx.Response(413, text="batch too large")
        return server(request)

    enc._client._transport = httpx.MockTransport(too_many_or_bad)  # a provider with a cap of 2 inputs
    got = enc.encode(["a", "b", "c", "d", "e"])
    np.testing.assert_allclose(got, np.stack([unit(t) for t in "abcde"]), atol=1e-6)
    with pytest.raises(ProviderRejected, match="413"):
        enc.encode(["a", "BAD"])


def test_retries_stop_at_give_up_s_and_a_malformed_usage_is_retried_not_a_crash() -> None:
    server = Server()
    enc, sleeps = make(server, retries=10, backoff_s=1, give_up_s=5)
    server.faults = [status(503, "3")] * 10
    with pytest.raises(ProviderUnavailable, match="after 2 attempt"):
        enc.encode(["x"])  # 3 s waited, the next 3 s would pass give_up_s: the batch goes back to the worker
    assert sleeps == [3.0]

    def odd_usage(texts: list[str]) -> httpx.Response:
        data = [{"index": i, "embedding": unit(t).tolist()} for i, t in enumerate(texts)]
        return httpx.Response(200, json={"data": data, "usage": ["not", "a", "dict"]})

    server.faults = [odd_usage]
    enc2, _ = make(server, retries=1)
    server.faults = [odd_usage]
    assert enc2.encode(["y"]).shape == (1, DIM)
