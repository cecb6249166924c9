"""`encoder.backend: openai`: an `Encoder` over any OpenAI-compatible `POST /v1/embeddings` (OpenAI, TEI, vLLM,
Infinity, Ollama, llama.cpp's server, another ragtide's API).

- **Chunking stays here,** with a local tokenizer (`encoder.api.tokenizer_path`, default the packaged model's):
  chunks are cut to `encoder.api.max_tokens` of it, and requests are packed by its counts.
- **Requests** carry at most `batch_size` texts and `batch_tokens` tokens; `concurrency` of them are in flight.
- **Faults.** Connect errors, timeouts, 408, 429, 5xx and a short or malformed vector list are retried with
  exponential backoff, honouring the server's `Retry-After`. Past `retries`, or while the circuit breaker is open,
  the call raises `ProviderUnavailable`: an outage like a store's, so the worker retries the batch and commits
  nothing (never the dead-letter topic), and a query gets a 503 with Retry-After. A refused key (401, 403) or an
  unknown model (404) is an outage too, with the setting to fix in its message: every row would fail alike. Only
  a 400, 413 or 422 says *this input* is refused: it raises `ProviderRejected`, so the worker isolates the row
  and dead-letters it with the provider's reason.
- **Start-up refuses a mismatch** (ConfigError) with the cause: another dimension than `encoder.api.dim`, vectors
  that are not unit length (unless `encoder.api.normalize`), a refused probe. A provider that is down or answers
  fewer vectors than inputs stays an outage (ProviderUnavailable) after its retries.
- **Identity.** `provider` (the URL's host and port, or `encoder.api.provider`) and the model name are part of a
  generation's fingerprint: a switch of provider or model is a blue/green rebuild.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from ragtide.contracts.errors import ClientError, ConfigError, ProviderUnavailable
from ragtide.contracts.logging import PerRegistry
from ragtide.contracts.resilience import RETRYABLE_STATUS, CircuitBreaker, retry_after_s
from ragtide.contracts.settings import ProviderSettings, authorization
from ragtide.embedder.encoder import Vectors, default_model_path

log = logging.getLogger(__name__)

PROBE = ["ragtide start-up probe: does this provider embed?", "a second text, to count the vectors"]
UNIT_TOLERANCE = 1e-2  # |norm - 1| a provider's float rounding may leave
AUTH_STATUS = {401: "refused the key (401)", 403: "refused the key (403)", 404: "does not know the model (404)"}
REJECTED_STATUS = frozenset({400, 413, 422})


class ProviderRejected(ClientError):
    """The provider refused this input (400, 413, 422, for one text): not an outage. The worker retries the batch
    row by row and dead-letters the row it still refuses, with this message; a query gets a 422 with it."""


class ProviderMetrics(PerRegistry):
    """`ragtide_provider_*`: requests by outcome, retries by reason, tokens the provider billed, request time; one
    set per registry (`of`), whichever encoder of a process asks first, labelled by provider and model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        labels = ["provider", "model"]
        self.requests = Counter(
            "ragtide_provider_requests", "embeddings requests by outcome", [*labels, "outcome"], registry=reg
        )
        self.retries = Counter(
            "ragtide_provider_retries",
            "embeddings requests retried, by reason (429, 5xx, timeout, connect, short, malformed, open)",
            [*labels, "reason"],
            registry=reg,
        )
        self.tokens = Counter(
            "ragtide_provider_tokens", "tokens the provider reported (usage.prompt_tokens)", labels, registry=reg
        )
        self.texts = Counter("ragtide_provider_texts", "texts embedded by the provider", labels, registry=reg)
        self.seconds = Histogram(
            "ragtide_provider_request_seconds",
            "time of one successful embeddings request",
            labels,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=reg,
        )


PROVIDER_PREFIX = "openai:"


def provider_name(settings: ProviderSettings) -> str:
    """What names the provider in a generation's fingerprint: "openai:" and `encoder.api.provider`, else the URL's
    host:port."""
    if settings.provider:
        return PROVIDER_PREFIX + settings.provider
    netloc = urlsplit(settings.url or "").netloc
    return PROVIDER_PREFIX + (netloc.rsplit("@", 1)[-1] or (settings.url or ""))  # never a user:password@


class _Retry(Exception):
    """One failed attempt worth another: the reason (a metric label) and the server's Retry-After."""

    def __init__(self, label: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.label = label
        self.retry_after = retry_after


class OpenAIEmbeddingsEncoder:
    """Embeds through an OpenAI-compatible embeddings API; probes it once at construction (see the module)."""

    precision = "float"

    def __init__(
        self,
        settings: ProviderSettings,
        registry: CollectorRegistry | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not settings.url:
            raise ConfigError("encoder.api.url: encoder.backend openai needs the provider's base URL (…/v1)")
        if not settings.model:
            raise ConfigError("encoder.api.model: encoder.backend openai needs the model name to request")
        self.settings = settings
        self._model = settings.model
        self.provider = provider_name(settings)
        self.url = settings.url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers=authorization(settings.api_key),
            transport=transport,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
        )
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_reset_s,
            name=f"embeddings provider {self.url}",
            error=ProviderUnavailable,
        )
        self.metrics = ProviderMetrics.of(registry) if registry is not None else ProviderMetrics()
        self._labels = {"provider": self.provider, "model": self._model}
        self._sleep = sleep
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        path = settings.tokenizer_path or default_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._dim = 0  # the probe sets it, after checking it against encoder.api.dim
        self._probe()

    # -- the Encoder protocol ------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """The vectors' size (checked at start-up)."""
        return self._dim

    @property
    def max_tokens(self) -> int:
        """`encoder.api.max_tokens`: the chunker's window, in its tokenizer's tokens."""
        return self.settings.max_tokens

    @property
    def tokenizer(self) -> Any:
        """The local tokenizer chunks are cut with."""
        return self._tokenizer

    @property
    def model_name(self) -> str:
        """The provider's model name."""
        return self._model

    def encode(self, texts: Sequence[str]) -> Vectors:
        """One unit vector per text, in order: requests of at most batch_size texts and batch_tokens tokens,
        `concurrency` at a time; raises ProviderUnavailable (retry the batch) or ProviderRejected (one input)."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        groups = self._requests(texts)
        if len(groups) == 1:
            return self._post_splitting(groups[0])
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="ragtide-provider")
        parts = list(self._pool.map(self._post_splitting, groups))
        return np.concatenate(parts, axis=0)

    def _post_splitting(self, texts: list[str]) -> Vectors:
        """`_post`, halving a request the provider refuses (a 400, 413 or 422 often means "too many texts" or "too
        large a body": TEI's default cap is 32 inputs), down to the one text it refuses (ProviderRejected)."""
        try:
            return self._post(texts)
        except ProviderRejected:
            if len(texts) == 1:
                raise
            half = len(texts) // 2
            self.metrics.retries.labels(**self._labels, reason="split").inc()
            return np.concatenate([self._post_splitting(texts[:half]), self._post_splitting(texts[half:])], axis=0)

    def close(self) -> None:
        """Close the connections and the request threads."""
        self._client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # -- internals -------------------------------------------------------------------------------------------------

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in the chunking tokenizer's tokens."""
        ids = self._tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    def _requests(self, texts: Sequence[str]) -> list[list[str]]:
        """The texts cut into requests within batch_size and batch_tokens (a text alone may exceed the latter)."""
        s = self.settings
        groups: list[list[str]] = [[]]
        tokens = 0
        for text, n in zip(texts, self.token_counts(texts), strict=True):
            if groups[-1] and (len(groups[-1]) >= s.batch_size or tokens + n > s.batch_tokens):
                groups.append([])
                tokens = 0
            groups[-1].append(text)
            tokens += n
        return groups

    def _post(self, texts: list[str]) -> Vectors:
        """One request, retried; the vectors, unit length."""
        s = self.settings
        attempts = s.retries + 1
        last: _Retry | None = None
        # Past give_up_s the batch goes back to the worker as an outage, which /healthz reports as degraded (the
        # worker's wait between tries is not a stall); a stall would get the process restarted.
        start, slept = time.monotonic(), 0.0
        for attempt in range(attempts):
            self.breaker.check()
            try:
                vectors = self._attempt(texts)
            except _Retry as exc:
                last = exc
                self.breaker.failure(str(exc))
                self.metrics.retries.labels(**self._labels, reason=exc.label).inc()
                delay = s.backoff_s * (2**attempt)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, s.max_retry_after_s))
                spent = max(time.monotonic() - start, slept)
                if attempt + 1 >= attempts or self.breaker.state == "open" or spent + delay > s.give_up_s:
                    break
                log.warning(
                    "embeddings request failed; retrying",
                    extra={"attempt": attempt + 1, "of": attempts, "reason": str(exc), "delay_s": round(delay, 2)},
                )
                self._sleep(delay)
                slept += delay
                continue
            self.breaker.success()
            return vectors
        self.metrics.requests.labels(**self._labels, outcome="unavailable").inc()
        raise ProviderUnavailable(
            f"embeddings provider {self.url} (model {self._model}) unavailable after {attempt + 1} attempt(s): {last}"
        )

    def _attempt(self, texts: list[str]) -> Vectors:
        body: dict[str, Any] = {"model": self._model, "input": texts, "encoding_format": self.settings.encoding_format}
        if self.settings.send_dimensions and self.settings.dim:
            body["dimensions"] = self.settings.dim
        t0 = time.perf_counter()
        try:
            response = self._client.post("/embeddings", json=body)
        except httpx.TimeoutException as exc:
            raise _Retry("timeout", f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retry("connect", f"cannot reach it: {exc or type(exc).__name__}") from exc
        except httpx.HTTPError as exc:  # a body that cannot be decoded, redirects: the answer was not usable
            raise _Retry("malformed", f"answered unreadably: {exc or type(exc).__name__}") from exc
        status = response.status_code
        if status >= 400:
            detail = response.text[:300]
            if status in RETRYABLE_STATUS:
                label = "5xx" if status >= 500 else str(status)
                raise _Retry(label, f"answered {status}: {detail}", retry_after_s(response.headers))
            if status in AUTH_STATUS:
                field = "encoder.api.model" if status == 404 else "encoder.api.api_key"
                raise _Retry("auth", f"{field}: the provider {AUTH_STATUS[status]}: {detail}")
            if status in REJECTED_STATUS:
                self.metrics.requests.labels(**self._labels, outcome="rejected").inc()
                raise ProviderRejected(f"embeddings provider {self.url} refused the input ({status}): {detail}")
            raise _Retry(str(status), f"answered {status}: {detail}")
        vectors, tokens = self._parse(response, len(texts))
        if self.settings.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)
        self.metrics.seconds.labels(**self._labels).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(**self._labels, outcome="ok").inc()
        self.metrics.texts.labels(**self._labels).inc(len(texts))
        if tokens:
            self.metrics.tokens.labels(**self._labels).inc(tokens)
        return vectors

    def _parse(self, response: httpx.Response, n: int) -> tuple[Vectors, int]:
        """The vectors in input order (by each item's `index`) and the reported tokens; a short, malformed or
        wrongly sized answer is a fault worth a retry (a provider under load may truncate)."""
        try:
            doc = response.json()
            data = sorted(doc["data"], key=lambda d: int(d.get("index", 0)))
            rows = [_vector(d["embedding"]) for d in data]
            usage = doc.get("usage") or {}
            tokens = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Retry("malformed", f"answered something that is not an embeddings list: {exc}") from exc
        if len(rows) != n:
            raise _Retry("short", f"answered {len(rows)} vectors for {n} inputs")
        dims = {r.shape[0] if r.ndim == 1 else -1 for r in rows}
        if self._dim and dims != {self._dim}:
            raise _Retry("malformed", f"answered vectors of size {sorted(dims)}, not {self._dim} (encoder.api.dim)")
        if len(dims) != 1 or -1 in dims:
            raise _Retry("malformed", f"answered vectors of different sizes {sorted(dims)}")
        return np.stack(rows).astype(np.float32, copy=False), tokens

    def _probe(self) -> None:
        """Embed two texts once; refuse a provider that does not fit (ConfigError naming the setting). An outage
        stays one (ProviderUnavailable, after the retries): where a generation is opened mid-stream the batch is
        retried; at start-up the process stops with it, and its supervisor starts it again."""
        try:
            vectors = self._post(list(PROBE))
        except ProviderRejected as exc:
            hint = (
                " (a server that refuses base64 takes RAGTIDE_ENCODER__API__ENCODING_FORMAT=float)"
                if self.settings.encoding_format == "base64"
                else ""
            )
            raise ConfigError(f"encoder.api.url: the provider refused the start-up probe: {exc}{hint}") from exc
        dim = int(vectors.shape[1])
        if self.settings.dim and dim != self.settings.dim:
            raise ConfigError(f"encoder.api.dim: the provider's vectors have {dim} dimensions, not {self.settings.dim}")
        norms = np.linalg.norm(vectors, axis=1)
        if not self.settings.normalize and np.any(np.abs(norms - 1.0) > UNIT_TOLERANCE):
            raise ConfigError(
                f"encoder.api.normalize: {self._model} at {self.url} returns vectors of length "
                f"{', '.join(f'{n:.3g}' for n in norms)}, not 1, and search compares by cosine; set "
                "RAGTIDE_ENCODER__API__NORMALIZE=true if the model is meant for cosine similarity"
            )
        self._dim = dim
        log.info("embeddings provider ready", extra={"provider": self.provider, "model": self._model, "dim": dim})


def _vector(item: Any) -> Vectors:
    """An embedding: base64 of little-endian float32 (what OpenAI's SDK asks for by default), or a JSON list."""
    if isinstance(item, str):
        return np.frombuffer(base64.b64decode(item), dtype="<f4").astype(np.float32)
    return np.asarray(item, dtype=np.float32)
