"""The rest of the OpenAI-compatible surface (chat completions live in answer.py, on this module's OpenAIRoute):
`GET /v1/models` lists what this API serves, and `POST /v1/embeddings` embeds texts with the live generation's
own encoder, so clients built for OpenAI (its SDK, LangChain's OpenAIEmbeddings, Open WebUI, LibreChat) work
against ragtide unchanged.

Embeddings share the query path with search: the gateway (key, rate limit, quota, charged as search is, at 4
characters a token), admission, and the micro-batched forward passes. Only the served model's name is accepted:
vectors of another model would not be comparable with the index. The errors raised in these routes come in
OpenAI's shape (`error`) with ragtide's `detail` beside it, the query path's 503s included (request validation
errors keep FastAPI's 422 shape).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Coroutine, Mapping, Set
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ragtide.embedder.encoder import Encoder, Vectors, unprompted
from ragtide.gateway.asgi import ASGIApp
from ragtide.retriever.queries import REFUSED, Shed, ShedAnswer, plain_shed, refusal
from ragtide.retriever.schemas import (
    GATEWAY_RESPONSES,
    QUERY_RESPONSES,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorBody,
)
from ragtide.retriever.services import CallerDep, Services, ServicesDep, get_caller, query_tokens


class OpenAIStatus(HTTPException):
    """An error answered in OpenAI's shape by the OpenAI-compatible routes (elsewhere: FastAPI's `detail`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        error = OpenAIError(message=message, type="invalid_request_error", param=param, code=code)
        self.body = OpenAIErrorBody(error=error, detail=message)


def openai_error(status: int, message: str, kind: str, code: str | None, headers: Mapping[str, str] | None) -> Response:
    """OpenAI's error body (with ragtide's `detail`), keeping headers such as Retry-After."""
    body = OpenAIErrorBody(error=OpenAIError(message=message, type=kind, code=code), detail=message)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def shed_answer(openai_paths: Set[str]) -> ShedAnswer:
    """Admission's 503 for a request shed on arrival (`AdmissionEdge`): OpenAI's shape on `openai_paths` (what
    OpenAIRoute answers there), FastAPI's elsewhere."""

    def answer(path: str, exc: Shed) -> ASGIApp:
        return refused(exc) if path in openai_paths else plain_shed(path, exc)

    return answer


def refused(exc: Exception) -> Response:
    """A query turned away "not now" (`REFUSED`), in OpenAI's shape: the one mapping's detail, code and headers."""
    detail, code, headers = refusal(exc)
    return openai_error(503, detail, "server_error", code, headers)


class OpenAIRoute(APIRoute):
    """A route whose errors come in OpenAI's shape (a router cannot add an exception handler): its own
    OpenAIStatus, and what the shared query path raises through it: admission's 503 (the bound is full), a request
    dropped past its deadline (503), an index that is down (503). Each keeps its Retry-After, which OpenAI's SDK
    honours when it retries."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIStatus as exc:
                return JSONResponse(exc.body.model_dump(), status_code=exc.status_code)
            except REFUSED as exc:
                return refused(exc)
            except HTTPException as exc:  # the gateway's and FastAPI's own
                kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
                return openai_error(exc.status_code, str(exc.detail), kind, None, exc.headers)

        return run


NOT_SERVED: dict[int | str, dict[str, Any]] = {
    404: {"model": OpenAIErrorBody, "description": "the model is not served here (the message names what is)"},
}


def served_models(svc: Services, created: int) -> list[ModelCard]:
    """The generator's model (chat completions) and the live embedding model (embeddings)."""
    _, encoder = svc.active.current()
    ids = ([svc.generator.model] if svc.generator is not None else []) + [encoder.model_name]
    return [ModelCard(id=name, created=created) for name in dict.fromkeys(ids)]


def check_embedding_request(svc: Services, body: EmbeddingRequest, encoder: Encoder) -> list[str]:
    """The texts to embed; 404 for another model, 422 for what the served model or the limits do not allow."""
    if body.model != encoder.model_name:
        raise OpenAIStatus(
            404,
            f"model: {body.model!r} is not served here; /v1/embeddings serves {encoder.model_name!r}, the model "
            f"of the live index (GET /v1/models lists what is served)",
            param="model",
            code="model_not_found",
        )
    if body.dimensions is not None and body.dimensions != encoder.dim:
        raise OpenAIStatus(
            422,
            f"dimensions: {encoder.model_name} makes {encoder.dim}-dimensional vectors and cannot shorten them; "
            f"leave dimensions out or set it to {encoder.dim}",
            param="dimensions",
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    api = svc.settings.api
    if len(texts) > api.max_embedding_inputs:
        raise OpenAIStatus(
            422,
            f"input: {len(texts)} texts; at most {api.max_embedding_inputs} per request "
            f"(api.max_embedding_inputs): send them in several requests",
            param="input",
        )
    for i, text in enumerate(texts):
        if len(text) > api.max_query_chars:
            raise OpenAIStatus(
                422, f"input[{i}]: longer than {api.max_query_chars} characters (api.max_query_chars)", param="input"
            )
    return texts


def encoded(vector: Vectors, encoding_format: Literal["float", "base64"]) -> list[float] | str:
    """A vector as JSON floats, or as base64 of its little-endian float32 bytes (what OpenAI clients decode)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    floats: list[float] = vector.tolist()
    return floats


def openai_router() -> APIRouter:
    """GET /v1/models and POST /v1/embeddings."""
    router = APIRouter(tags=["openai"], route_class=OpenAIRoute)
    created = int(time.time())

    @router.get("/v1/models", response_model=ModelList, dependencies=[Depends(get_caller)], responses=GATEWAY_RESPONSES)
    async def models(svc: ServicesDep) -> ModelList:
        """What this API serves, in OpenAI's list format: the generator's model (/v1/chat/completions) and the
        live index's embedding model (/v1/embeddings)."""
        return ModelList(data=served_models(svc, created))

    @router.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        dependencies=[Depends(get_caller)],
        responses={**NOT_SERVED, **GATEWAY_RESPONSES},
    )
    async def model(model_id: str, svc: ServicesDep) -> ModelCard:
        """One served model; 404 for any other."""
        cards = served_models(svc, created)
        for card in cards:
            if card.id == model_id:
                return card
        served = [card.id for card in cards]
        raise OpenAIStatus(404, f"model: {model_id!r} is not served here; served: {served}", code="model_not_found")

    @router.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses={**NOT_SERVED, **QUERY_RESPONSES},
    )
    async def embeddings(
        body: EmbeddingRequest, request: Request, svc: ServicesDep, caller: CallerDep
    ) -> EmbeddingResponse:
        """OpenAI-compatible embeddings from the live index's own model (L2-normalised, the vectors search
        compares). Text input only; `encoding_format: base64` as the OpenAI clients send by default."""
        t0 = time.perf_counter()
        _, live = svc.active.current()
        encoder = unprompted(live)  # the client brings its own prompt, if its model wants one
        texts = check_embedding_request(svc, body, encoder)
        vectors = await svc.embed(encoder, texts, request)
        tokens = sum(query_tokens(text) for text in texts)
        if caller.tenant is not None:  # only tenants have a quota
            await asyncio.to_thread(svc.gateway.charge, caller, tokens)
        svc.serving.request("embeddings", time.perf_counter() - t0)
        return EmbeddingResponse(
            data=[Embedding(index=i, embedding=encoded(v, body.encoding_format)) for i, v in enumerate(vectors)],
            model=encoder.model_name,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    return router
