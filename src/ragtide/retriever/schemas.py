"""Request and response models of the retrieval API."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, field_validator

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

FilterScalar = str | int | bool


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: a number with no fraction (117.0 is fine), never a boolean or a numeric string."""
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


_JSON_INT = BeforeValidator(_json_integer)
# constraints before the validator: that order keeps minimum/maximum in the JSON schema
SearchK = Annotated[int, Field(ge=1, le=1000), _JSON_INT]
AnswerK = Annotated[int, Field(ge=1, le=50), _JSON_INT]
Tokens = Annotated[int, Field(ge=1, le=32_768), _JSON_INT]
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]


class SearchRequest(BaseModel):
    """POST /v1/search."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=2000, description="natural-language query")
    k: SearchK | None = Field(None, description="number of hits (default from settings)")
    filter: dict[str, FilterScalar | list[FilterScalar]] | None = Field(
        None, description="metadata column -> value (or list of values, any of); 'table' filters by source table"
    )

    @field_validator("query")
    @classmethod
    def _clean(cls, value: str) -> str:
        return clean_text(value, "query")


class SearchHit(BaseModel):
    """One retrieved chunk."""

    id: str
    score: float
    text: str
    table: str
    key: dict[str, Any]
    row_id: str
    chunk_no: int
    chunk_count: int
    metadata: dict[str, Any]
    source_commit_ts: str | None = Field(description="when the row version was committed in Postgres (UTC)")
    indexed_at: str | None = Field(description="when this chunk was written to the index (UTC)")
    age_s: float | None = Field(description="seconds since the row version was committed")


class SearchResponse(BaseModel):
    """POST /v1/search response."""

    query: str
    k: int
    hits: list[SearchHit]
    took_ms: float


class Health(BaseModel):
    """GET /healthz and /readyz."""

    status: str
    checks: dict[str, str] = {}


class TableStats(BaseModel):
    """Indexed rows and chunks of one table."""

    rows: int
    chunks: int


class IndexStats(BaseModel):
    """GET /v1/index/stats."""

    points: int
    tables: dict[str, TableStats]
    generation: dict[str, Any] | None = Field(
        None, description="the live generation (model, chunking) and the one being built, with its progress"
    )


def clean_text(value: str, what: str) -> str:
    """Strip control characters and surrounding whitespace; empty afterwards is an error naming `what`."""
    value = _CONTROL.sub("", value).strip()
    if not value:
        raise ValueError(f"{what} is empty after removing whitespace and control characters")
    return value


class AnswerRequest(BaseModel):
    """POST /v1/answer."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=2000, description="the question")
    k: AnswerK | None = Field(None, description="retrieved chunks put into the prompt (default from settings)")
    filter: dict[str, FilterScalar | list[FilterScalar]] | None = Field(None, description="as in /v1/search")
    stream: StrictBool = Field(False, description="Server-Sent Events: citations first, then tokens, then done")
    max_tokens: Tokens | None = Field(None, description="completion length (default from settings)")
    temperature: Temperature | None = None
    cache: StrictBool = Field(True, description="false: never answer from the semantic cache (nor store)")

    @field_validator("query")
    @classmethod
    def _clean(cls, value: str) -> str:
        return clean_text(value, "query")


class Citation(BaseModel):
    """One numbered source of an answer: where it came from and how old that row version is."""

    n: int = Field(description="the number the answer cites as [n]")
    table: str
    key: dict[str, Any]
    row_id: str
    chunk_no: int
    score: float
    text: str = Field(description="the chunk text the generator saw (possibly shortened to the prompt budget)")
    source_commit_ts: str | None
    indexed_at: str | None
    age_s: float | None = Field(description="seconds since that row version was committed in Postgres")
    cited: bool = Field(False, description="the answer cites it")


class Usage(BaseModel):
    """Generator tokens of one answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = Field(False, description="the generator reported no usage; counted from the stream")


class CacheInfo(BaseModel):
    """Whether an answer came from the semantic cache."""

    hit: bool
    age_s: float | None = Field(None, description="seconds since the cached answer was generated")
    similarity: float | None = Field(None, description="cosine between this question and the cached one")


class AnswerResponse(BaseModel):
    """POST /v1/answer (stream: false)."""

    query: str
    answer: str
    citations: list[Citation]
    model: str
    finish_reason: str
    usage: Usage
    cost: float
    ttft_ms: float
    took_ms: float
    cache: CacheInfo


class ChatMessageIn(BaseModel):
    """One message of an OpenAI chat request."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=8000)

    @field_validator("content")
    @classmethod
    def _clean(cls, value: str) -> str:
        return _CONTROL.sub("", value).strip()


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI request; the last user message is the retrieval query."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=200, description="ignored: the configured generator answers")
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=50)
    stream: StrictBool = False
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Temperature | None = None
    n: Annotated[int, _JSON_INT] = Field(1, ge=1, le=1, description="only 1 is supported")
    cache: StrictBool = Field(True, description="ragtide extension: false bypasses the semantic cache")


def _texts_only(value: Any) -> Any:
    """Token ids (a list of ints, or of lists of ints) get a message that says what is accepted instead of
    pydantic's 'not a valid string'."""
    if isinstance(value, list) and any(isinstance(v, int | list) and not isinstance(v, bool) for v in value):
        raise ValueError(
            "token ids are not supported: send text, a string or a list of strings (ragtide tokenizes with the "
            "served model's own tokenizer)"
        )
    return value


EmbeddingText = Annotated[str, Field(min_length=1)]
EmbeddingTexts = Annotated[list[EmbeddingText], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: OpenAI's request, for text input."""

    model_config = ConfigDict(extra="ignore")

    input: Annotated[EmbeddingText | EmbeddingTexts, BeforeValidator(_texts_only)] = Field(
        description="a text or a list of texts (at most api.max_embedding_inputs, each at most api.max_query_chars)"
    )
    model: str = Field(max_length=200, description="the served embedding model (GET /v1/models lists it)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded"
    )
    dimensions: Annotated[int, Field(ge=1), _JSON_INT] | None = Field(
        None, description="only the model's own dimension is supported"
    )
    user: str | None = Field(None, max_length=200, description="ignored")


class Embedding(BaseModel):
    """One input's vector (L2-normalised)."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens of an embeddings request (estimated at 4 characters a token, as search's quota charge)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """POST /v1/embeddings response, in OpenAI's shape."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    """One model this API serves, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragtide"


class ModelList(BaseModel):
    """GET /v1/models response."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """An error of the OpenAI-compatible routes: OpenAI's `error` object, and ragtide's `detail` (the same
    message)."""

    error: OpenAIError
    detail: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx that ragtide raises itself: what is wrong, in words."""

    detail: str


class ValidationErrorBody(BaseModel):
    """422: a request that does not validate. `detail` is pydantic's list of errors (each with `loc` and `msg`)
    for a malformed body, or one sentence naming the field for a rule checked after parsing."""

    detail: str | list[dict[str, Any]]


GATEWAY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body could not be parsed (not UTF-8 JSON)"},
    401: {"model": ErrorBody, "description": "no, unknown or revoked API key"},
    413: {"model": ErrorBody, "description": "request body larger than gateway.max_body_bytes"},
    429: {"model": ErrorBody, "description": "rate limit or daily token quota; see Retry-After"},
}
# the query routes (search, embeddings, answer, chat) also shed load
QUERY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **GATEWAY_RESPONSES,
    503: {
        "model": ErrorBody,
        "description": "overloaded (api.max_in_progress query requests in progress, or this one waited past "
        "api.queue_timeout_s), or a store is unavailable; see Retry-After",
    },
}
