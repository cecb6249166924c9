"""The generator seam: any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, llama.cpp's server).

`Generator` is the small protocol the answer path needs: stream the deltas of one chat completion.
`OpenAIGenerator` is the real client: timeouts, retries with exponential backoff for failures before the
first token (a retry after tokens were sent would repeat them), and a circuit breaker so that a dead generator
costs a fast 503 instead of a timeout per request. The test double is in `tests/doubles.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from ragtide.contracts.errors import RagtideError
from ragtide.contracts.resilience import RETRYABLE_STATUS, CircuitBreaker
from ragtide.contracts.settings import GeneratorSettings, authorization

log = logging.getLogger(__name__)


class GeneratorUnavailable(RagtideError):
    """The generator could not be reached or failed; the message says why (the API answers 503 with it)."""


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass
class Usage:
    """Token counts of one completion (from the server's usage report, else counted from the stream)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """One streamed piece: text, and on the last one the finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class GenerationParams:
    """Per-request knobs, bounded by the settings."""

    max_tokens: int
    temperature: float
    stop: Sequence[str] = field(default_factory=tuple)


class Generator(Protocol):
    """Streams one chat completion; raises GeneratorUnavailable before the first delta when it cannot."""

    model: str

    def stream(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[Delta]:
        """The deltas of the completion, the last one carrying finish_reason and usage."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class OpenAIGenerator:
    """Streams from an OpenAI-compatible chat completions endpoint."""

    def __init__(self, settings: GeneratorSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if settings.endpoint is None:
            raise ValueError("generator.url: not set, and generator.local is off")
        self.settings = settings
        self.url = settings.endpoint
        self.model = settings.model
        headers = authorization(settings.api_key)
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
        )
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s, error=GeneratorUnavailable)

    def _body(self, messages: Sequence[Message], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def _open(self, body: dict[str, Any]) -> httpx.Response:
        """Send the request and return the streaming response, retrying what may succeed on a second try."""
        self.breaker.check()
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                request = self._client.build_request("POST", "/chat/completions", json=body)
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                reason = f"timed out connecting to {self.url} ({type(exc).__name__})"
            except httpx.TransportError as exc:
                reason = f"cannot reach {self.url}: {exc or type(exc).__name__}"
            else:
                if response.status_code < 400:
                    self.breaker.success()
                    return response
                detail = (await response.aread()).decode(errors="replace")[:300]
                await response.aclose()
                reason = f"generator answered {response.status_code}: {detail}"
                if response.status_code not in RETRYABLE_STATUS:
                    self.breaker.failure(reason)
                    raise GeneratorUnavailable(reason)
            if attempt + 1 < attempts:
                delay = self.settings.backoff_s * (2**attempt)
                log.warning(
                    "generator attempt %d/%d failed (%s); retrying in %.2f s", attempt + 1, attempts, reason, delay
                )
                await asyncio.sleep(delay)
        self.breaker.failure(reason)
        raise GeneratorUnavailable(reason)

    async def stream(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[Delta]:
        """Parse the server-sent events into deltas; usage comes from the server or is counted."""
        response = await self._open(self._body(messages, params))
        usage: Usage | None = None
        finish: str | None = None
        pieces = 0
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    log.warning("generator sent a line that is not JSON: %.200s", data)
                    continue
                if chunk.get("usage"):
                    u = chunk["usage"]
                    usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    if text:
                        pieces += 1
                        yield Delta(text=text)
        except httpx.HTTPError as exc:
            # Tokens were already sent: no retry (it would repeat them); the caller ends the answer with the error.
            self.breaker.failure(str(exc))
            raise GeneratorUnavailable(f"generator stream broke off: {exc or type(exc).__name__}") from exc
        finally:
            await response.aclose()
        yield Delta(finish_reason=finish or "stop", usage=usage or Usage(completion_tokens=pieces))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
