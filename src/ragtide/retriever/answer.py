"""Answering: retrieve fresh chunks, prompt the generator with them as numbered untrusted sources, and return
(or stream) the answer with citations. `POST /v1/answer` is ragtide's own shape; `POST /v1/chat/completions`
is the OpenAI shape, so existing OpenAI clients get retrieval-augmented answers unchanged.

Both go through the gateway (tenant filter, rate limit, quota) and charge prompt + completion tokens to the
tenant when the answer ends, including answers the client abandoned halfway.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from ragtide.embedder.encoder import query_prefix
from ragtide.embedder.generations import encoder_identity
from ragtide.embedder.index.base import Filter, Hit
from ragtide.gateway.gateway import Caller
from ragtide.generator.client import Delta, GenerationParams, GeneratorUnavailable, Message
from ragtide.generator.client import Usage as GenUsage
from ragtide.generator.prompt import Source, build_messages, cited_numbers, fit
from ragtide.retriever.cache import ALL_TENANTS, CachedAnswer, scope_key, sources_of
from ragtide.retriever.openai_compat import OpenAIRoute
from ragtide.retriever.schemas import (
    GATEWAY_RESPONSES,
    AnswerRequest,
    AnswerResponse,
    CacheInfo,
    ChatCompletionRequest,
    Citation,
    ErrorBody,
    OpenAIErrorBody,
    Usage,
)
from ragtide.retriever.services import (
    CallerDep,
    Services,
    ServicesDep,
    build_filter,
    check_query,
    query_tokens,
    retrieve,
    to_hit,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Answering:
    """One answer in progress: its sources, the generator stream, and the accounting."""

    svc: Services
    caller: Caller
    endpoint: str
    citations: list[Citation]
    deltas: AsyncIterator[Delta]
    first: Delta
    prompt_chars: int
    t0: float
    ttft: float
    question: str = ""
    cached: CachedAnswer | None = None
    lookup: CacheLookup | None = None
    text: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None
    cost: float = 0.0
    _charged: bool = False

    @property
    def cache_info(self) -> CacheInfo:
        """Whether this answer came from the cache, how old and how close it is."""
        if self.cached is None:
            return CacheInfo(hit=False)
        now = self.svc.cache.clock() if self.svc.cache is not None else time.time()
        return CacheInfo(hit=True, age_s=round(self.cached.age_s(now), 3), similarity=self.cached.similarity)

    async def tokens(self) -> AsyncIterator[str]:
        """The completion's text pieces; records inter-token latency; ends with usage set."""
        serving = self.svc.serving
        last = time.perf_counter()
        delta: Delta | None = self.first
        while delta is not None:
            if delta.text:
                self.text.append(delta.text)
                yield delta.text
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
                self._settle(delta)
            delta = await anext(self.deltas, None)
            now = time.perf_counter()
            if delta is not None and delta.text:
                serving.inter_token(self.endpoint, now - last)
                last = now
        generating = time.perf_counter() - self.t0 - self.ttft
        if self.usage and self.usage.completion_tokens > 1 and generating > 0:
            serving.rate((self.usage.completion_tokens - 1) / generating)

    def _settle(self, last: Delta) -> None:
        u = last.usage
        prompt = u.prompt_tokens if u and u.prompt_tokens else math.ceil(self.prompt_chars / 4)
        completion = u.completion_tokens if u else len(self.text)
        estimated = not (u and u.prompt_tokens)
        self.usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            estimated=estimated,
        )

    async def finish(self, outcome: str = "ok") -> None:
        """Charge the tenant, record metrics and cache the answer, once (also for an abandoned stream)."""
        if self._charged:
            return
        self._charged = True
        if self.usage is None:
            self._settle(Delta())
        assert self.usage is not None
        used = set(cited_numbers(self.answer, len(self.citations)))
        for c in self.citations:
            c.cited = c.n in used
        g = self.svc.settings.generator
        self.cost = round(
            self.usage.prompt_tokens / 1000 * g.price_per_1k_prompt
            + self.usage.completion_tokens / 1000 * g.price_per_1k_completion,
            8,
        )
        serving = self.svc.serving
        serving.account(self.caller.label, self.usage.prompt_tokens, self.usage.completion_tokens, self.cost)
        serving.outcomes.labels(self.endpoint, outcome).inc()
        serving.request(self.endpoint, time.perf_counter() - self.t0)
        # a hit used no generator: it costs what a search costs
        charged = query_tokens(self.question) if self.cached else self.usage.total_tokens
        if self.caller.tenant is not None:  # only tenants have a quota
            await asyncio.to_thread(self.svc.gateway.charge, self.caller, charged)
        if self.lookup is not None and self.cached is None and outcome == "ok" and self.answer:
            await asyncio.to_thread(self._remember)

    def _remember(self) -> None:
        assert self.lookup is not None and self.svc.cache is not None and self.usage is not None
        self.svc.cache.store(
            self.lookup.vector,
            self.lookup.tenant,
            self.lookup.scope,
            self.lookup.since_seq,
            self.question,
            self.answer,
            [c.model_dump(exclude={"age_s", "cited"}) for c in self.citations],
            self.finish_reason,
            time.perf_counter() - self.t0,
            self.usage.prompt_tokens,
            self.usage.completion_tokens,
            self.lookup.sources,
        )

    async def complete(self) -> None:
        """Generate to the end (a non-streamed answer) and finish; 503 when the generator breaks off."""
        try:
            async for _ in self.tokens():
                pass
        except GeneratorUnavailable as exc:
            await self.finish("broken")
            raise HTTPException(503, f"the generator failed mid-answer: {exc}") from exc
        await self.finish()

    async def aclose(self) -> None:
        """Stop the generator stream (a client that went away must not keep the generator busy)."""
        closer = getattr(self.deltas, "aclose", None)
        if closer is not None:
            await closer()

    @property
    def answer(self) -> str:
        """The text so far."""
        return "".join(self.text).strip()

    @property
    def took_ms(self) -> float:
        """Request to now."""
        return round((time.perf_counter() - self.t0) * 1000, 2)


@dataclass(frozen=True)
class CacheLookup:
    """What a miss needs to store its answer later."""

    vector: npt.NDArray[np.float32]
    tenant: str
    scope: str
    since_seq: int
    sources: list[str]


async def _replay(cached: CachedAnswer) -> AsyncIterator[Delta]:
    yield Delta(text=cached.answer)
    yield Delta(finish_reason=cached.finish_reason, usage=GenUsage(prompt_tokens=0, completion_tokens=0))


def _from_cache(cached: CachedAnswer, now: float) -> list[Citation]:
    """Stored citations with their ages brought up to now."""
    out = []
    for c in cached.citations:
        ts = c.get("source_commit_ts")
        age = round(now - datetime.fromisoformat(ts).timestamp(), 3) if ts else None
        out.append(Citation(**c, age_s=age))
    return out


async def start_answer(
    svc: Services,
    caller: Caller,
    endpoint: str,
    query: str,
    k: int | None,
    flt: Filter,
    params: GenerationParams,
    history: Sequence[Message] = (),
    use_cache: bool = True,
    request: Request | None = None,
) -> Answering:
    """Answer from the cache, or retrieve, build the prompt, and start the generator; 503 with the reason when
    it cannot answer.

    The first delta is awaited here, before any response is sent, so an unreachable generator is a clean 503
    even for a streamed answer (and the time to first token is exact).
    """
    t0 = time.perf_counter()
    if svc.generator is None:
        svc.serving.outcomes.labels(endpoint, "unavailable").inc()
        raise HTTPException(503, "answering is off: no generator is configured (generator.url); /v1/search works")
    k = check_query(svc, query, k or svc.settings.generator.context_chunks)
    index, encoder = svc.active.current()
    lookup: CacheLookup | None = None
    if svc.cache is not None and use_cache:
        since = svc.cache.seq  # before retrieval: a change after this point keeps the answer out of the cache
        scope = scope_key(
            filter=flt,
            k=k,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            history=[(m.role, m.content) for m in history],
            encoder=f"{encoder_identity(encoder)}/{query_prefix(encoder)!r}",
            generator=svc.generator.model,
        )
        tenant = caller.tenant if caller.tenant is not None else ALL_TENANTS
        cache = svc.cache

        vector = (await svc.embed(encoder, [query], request))[0]

        def search_look_up() -> tuple[list[Hit], CachedAnswer | None, list[str]]:
            found = index.search(vector, k, flt)
            versions = sources_of(found)
            return found, cache.lookup(vector, tenant, scope, versions), versions

        hits, cached, versions = await asyncio.to_thread(search_look_up)  # one thread hop for both
        lookup = CacheLookup(vector, tenant, scope, since, versions)
        if cached is not None:
            ttft = time.perf_counter() - t0
            deltas = _replay(cached).__aiter__()
            return Answering(
                svc,
                caller,
                endpoint,
                _from_cache(cached, time.time()),
                deltas,
                await anext(deltas),
                prompt_chars=0,
                t0=t0,
                ttft=ttft,
                question=query,
                cached=cached,
            )
    else:
        hits = await retrieve(svc, query, k, flt, request)
    now = time.time()
    found = [to_hit(h, now) for h in hits]
    texts = fit([h.text for h in found], svc.settings.generator.max_context_chars)
    citations = [
        Citation(
            n=i + 1,
            table=h.table,
            key=h.key,
            row_id=h.row_id,
            chunk_no=h.chunk_no,
            score=h.score,
            text=text,
            source_commit_ts=h.source_commit_ts,
            indexed_at=h.indexed_at,
            age_s=h.age_s,
        )
        for i, (h, text) in enumerate(zip(found, texts, strict=False))
    ]
    sources = [Source(c.n, c.table, c.key, c.text) for c in citations]
    messages = build_messages(query, sources, history)
    deltas = svc.generator.stream(messages, params).__aiter__()
    try:
        first = await anext(deltas)
    except GeneratorUnavailable as exc:
        svc.serving.outcomes.labels(endpoint, "unavailable").inc()
        raise HTTPException(503, f"the generator is unavailable: {exc}; /v1/search still works") from exc
    ttft = time.perf_counter() - t0
    svc.serving.first_token(endpoint, ttft)
    return Answering(
        svc,
        caller,
        endpoint,
        citations,
        deltas,
        first,
        prompt_chars=sum(len(m.content) for m in messages),
        t0=t0,
        ttft=ttft,
        question=query,
        lookup=lookup,
    )


def _params(svc: Services, limits: dict[str, int | None], temperature: float | None) -> GenerationParams:
    """The generation's parameters: the first given of `limits` (field -> value, in order of precedence), each
    given one checked against the limit (one within it must not let another past it)."""
    g = svc.settings.generator
    for name, value in limits.items():
        if value is not None and value > g.max_tokens_limit:
            raise HTTPException(422, f"{name}: must be at most {g.max_tokens_limit}")
    wanted = next((v for v in limits.values() if v), None) or g.max_tokens
    if wanted > g.max_tokens_limit:  # the configured default past the limit, as before
        raise HTTPException(422, f"max_tokens: must be at most {g.max_tokens_limit}")
    return GenerationParams(max_tokens=wanted, temperature=g.temperature if temperature is None else temperature)


def _sse(event: str | None, data: Any) -> str:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}\n\n"


def _stream(
    run: Answering,
    first: Callable[[], str],
    token: Callable[[str], str],
    failed: Callable[[GeneratorUnavailable], list[str]],
    last: Callable[[str], list[str]],
) -> StreamingResponse:
    """One answer as Server-Sent Events, in either shape: `first()` (the citations), one event per token, `failed`'s
    events if the generator broke mid-answer, then `last(outcome)`. The run is settled (usage charged, the answer
    cached if it completed) whatever happened, including a client that went away ("abandoned")."""

    async def events() -> AsyncIterator[str]:
        outcome = "abandoned"
        try:
            yield first()
            async for text in run.tokens():
                yield token(text)
            outcome = "ok"
        except GeneratorUnavailable as exc:
            outcome = "broken"
            for event in failed(exc):
                yield event
        finally:
            await run.finish(outcome)
            await run.aclose()
        for event in last(outcome):
            yield event

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def answer_router() -> APIRouter:
    """POST /v1/answer and the OpenAI-compatible POST /v1/chat/completions."""
    router = APIRouter(tags=["answering"])

    @router.post(
        "/v1/answer",
        response_model=AnswerResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"},
            503: {"model": ErrorBody, "description": "no generator reachable (the reason is in detail)"},
            **GATEWAY_RESPONSES,
        },
    )
    async def answer(body: AnswerRequest, request: Request, svc: ServicesDep, caller: CallerDep) -> Any:
        """Answer from the freshest indexed rows, citing them; `stream: true` streams Server-Sent Events."""
        params = _params(svc, {"max_tokens": body.max_tokens}, body.temperature)
        flt = build_filter(svc, body.filter, caller)
        run = await start_answer(
            svc, caller, "answer", body.query, body.k, flt, params, use_cache=body.cache, request=request
        )
        if not body.stream:
            await run.complete()
            assert run.usage is not None
            return AnswerResponse(
                query=body.query,
                answer=run.answer,
                citations=run.citations,
                model=svc.generator.model if svc.generator else "",
                finish_reason=run.finish_reason,
                usage=run.usage,
                cost=run.cost,
                ttft_ms=round(run.ttft * 1000, 2),
                took_ms=run.took_ms,
                cache=run.cache_info,
            )

        def done(outcome: str) -> list[str]:
            assert run.usage is not None
            end = {
                "finish_reason": run.finish_reason,
                "usage": run.usage.model_dump(),
                "cost": run.cost,
                "cited": [c.n for c in run.citations if c.cited],
                "ttft_ms": round(run.ttft * 1000, 2),
                "took_ms": run.took_ms,
                "cache": run.cache_info.model_dump(),
            }
            return [_sse("done", end)]

        def first() -> str:
            citations = [c.model_dump() for c in run.citations]
            return _sse("citations", {"citations": citations, "cache": run.cache_info.model_dump()})

        return _stream(
            run,
            first,
            lambda text: _sse("token", {"text": text}),
            lambda exc: [_sse("error", {"detail": f"the generator failed mid-answer: {exc}"})],
            done,
        )

    async def chat_completions(
        body: ChatCompletionRequest, request: Request, svc: ServicesDep, caller: CallerDep
    ) -> Any:
        """OpenAI-compatible chat completions, answered with retrieval over the freshest index.

        The last user message is the query; earlier user/assistant turns are kept as history. Citations come as
        an extra `citations` field (in the first chunk when streaming)."""
        users = [i for i, m in enumerate(body.messages) if m.role == "user" and m.content]
        if not users:
            raise HTTPException(422, "messages: needs at least one non-empty user message")
        last = users[-1]
        query = body.messages[last].content[: svc.settings.api.max_query_chars]
        history = [Message(m.role, m.content) for m in body.messages[:last] if m.content]
        limits = {"max_completion_tokens": body.max_completion_tokens, "max_tokens": body.max_tokens}
        params = _params(svc, limits, body.temperature)
        flt = build_filter(svc, None, caller)
        run = await start_answer(
            svc, caller, "chat", query, None, flt, params, history, use_cache=body.cache, request=request
        )
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = svc.generator.model if svc.generator else ""
        base = {"id": cid, "created": created, "model": model}

        if not body.stream:
            await run.complete()
            assert run.usage is not None
            return {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": run.answer},
                        "finish_reason": run.finish_reason,
                    }
                ],
                "usage": run.usage.model_dump(exclude={"estimated"}),
                "citations": [c.model_dump() for c in run.citations],
                "cache": run.cache_info.model_dump(),
            }

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {**base, "object": "chat.completion.chunk", **extra}
            body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
            return _sse(None, body)

        def done(outcome: str) -> list[str]:
            assert run.usage is not None
            finish = run.finish_reason if outcome == "ok" else "error"
            return [chunk({}, finish, usage=run.usage.model_dump(exclude={"estimated"})), _sse(None, "[DONE]")]

        def opening() -> str:
            citations = [c.model_dump() for c in run.citations]
            return chunk({"role": "assistant"}, citations=citations, cache=run.cache_info.model_dump())

        return _stream(
            run,
            opening,
            lambda text: chunk({"content": text}),
            lambda _: [],  # OpenAI's stream has no error event: the last chunk's finish_reason says "error"
            done,
        )

    # OpenAI's clients parse OpenAI's error body: this route's errors come in that shape (with `detail` beside it).
    router.add_api_route(
        "/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "an OpenAI chat.completion, or chunks"},
            503: {"model": OpenAIErrorBody, "description": "no generator reachable"},
            **GATEWAY_RESPONSES,
        },
        route_class_override=OpenAIRoute,
    )
    return router
