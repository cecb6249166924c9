"""The OpenAPI document says what this deployment accepts: the filterable fields of its sources, its tables,
its limits (k, query length, completion tokens, texts to embed), and the live embedding model and its dimension
(as of the document: a generation switch to another model makes the runtime checks disagree with it). A request
that validates against the document is one the API accepts, so clients (and schemathesis) can rely on it; the
runtime checks stay as the authority."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ragtide.contracts.settings import RagtideSettings

# Text must contain at least one character that is neither whitespace nor a control character.
HAS_TEXT = r"[^\s\u0000-\u001f\u007f]"
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}]}


def _one_or_many(item: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1}]}


def filter_schema(tables: list[str], metadata: list[str]) -> dict[str, Any]:
    """An object whose keys are exactly the filterable fields."""
    properties = {"table": _one_or_many({"type": "string", "enum": tables})}
    properties.update({name: _one_or_many(_SCALAR) for name in metadata if name != "table"})
    obj = {"type": "object", "properties": properties, "additionalProperties": False}
    return {"anyOf": [obj, {"type": "null"}], "title": "Filter", "description": "field -> value or values (any of)"}


def tailored_openapi(
    app: FastAPI, settings: RagtideSettings, tables: list[str], metadata: list[str]
) -> Callable[[], dict[str, Any]]:
    """A replacement for `app.openapi` that patches the request schemas with this deployment's rules."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.get("components", {}).get("schemas", {})
        api, gen = settings.api, settings.generator
        for name, k_max in (("SearchRequest", api.max_k), ("AnswerRequest", min(50, api.max_k))):
            props = schemas.get(name, {}).get("properties")
            if not props:
                continue
            props["filter"] = filter_schema(tables, metadata)
            props["query"].update(
                pattern=HAS_TEXT, maxLength=min(props["query"].get("maxLength", 2000), api.max_query_chars)
            )
            _set_max(props["k"], k_max)
            if "max_tokens" in props:
                _set_max(props["max_tokens"], gen.max_tokens_limit)
        chat = schemas.get("ChatCompletionRequest", {}).get("properties")
        if chat:
            for field in ("max_tokens", "max_completion_tokens"):
                _set_max(chat[field], gen.max_tokens_limit)
            chat["messages"]["contains"] = {
                "type": "object",
                "properties": {"role": {"const": "user"}, "content": {"type": "string", "pattern": HAS_TEXT}},
                "required": ["role", "content"],
            }
        embeddings = schemas.get("EmbeddingRequest", {}).get("properties")
        if embeddings:
            _, encoder = app.state.services.active.current()  # the live model, as of this document
            _limit_texts(embeddings["input"], api.max_query_chars, api.max_embedding_inputs)
            embeddings["model"]["enum"] = [encoder.model_name]
            for variant in embeddings["dimensions"]["anyOf"]:
                if variant.get("type") == "integer":
                    variant["minimum"] = variant["maximum"] = encoder.dim
        app.openapi_schema = doc
        return doc

    return openapi


def _set_max(prop: dict[str, Any], maximum: int) -> None:
    """Lower `maximum` on an integer property (plain or Optional)."""
    for variant in prop.get("anyOf", [prop]):
        if variant.get("type") == "integer":
            variant["maximum"] = min(variant.get("maximum", maximum), maximum)


def _limit_texts(prop: dict[str, Any], max_chars: int, max_items: int) -> None:
    """Bound a text-or-list-of-texts property: characters per text, texts per list."""
    for variant in prop.get("anyOf", [prop]):
        text = variant.get("items", variant)
        if text.get("type") == "string":
            text["maxLength"] = max_chars
        if variant.get("type") == "array":
            variant["maxItems"] = max_items
