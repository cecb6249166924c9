"""GET /v1/models and POST /v1/embeddings over the hash encoder and the echo generator: OpenAI's shapes, the
encoder's own vectors through the shared query path, the refusals that say what is supported, the gateway; and
the real clients (the openai SDK, LangChain) driven against the app in-process."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx2
import numpy as np
import openai
import psycopg
import pytest
from fastapi.testclient import TestClient
from langchain_openai import OpenAIEmbeddings
from openai.types.chat import ChatCompletionMessageParam
from pydantic import SecretStr

from ragtide.contracts.errors import StoreUnavailable
from ragtide.retriever.services import query_tokens
from tests.doubles import EchoGenerator, HashEncoder
from tests.unit.test_answer import ADMIN, Api, make_api

MODEL = HashEncoder().model_name
TEXTS = ["kafka topics are partitioned logs", "postgres replication slots", "kafka topics are partitioned logs"]


@pytest.fixture
def api() -> Iterator[Api]:
    yield from make_api(EchoGenerator(), api={"max_embedding_inputs": 4, "max_query_chars": 60})


def embed(api: Api, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return api.client.post("/v1/embeddings", json={"model": MODEL, **body}, headers=headers or {})


def expected(texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
    return HashEncoder().encode(texts)


def test_models_lists_the_generator_and_the_live_embedding_model(api: Api) -> None:
    resp = api.client.get("/v1/models")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        ("echo", "model", "ragtide"),
        (MODEL, "model", "ragtide"),
    ]
    assert all(isinstance(m["created"], int) and m["created"] > 1_700_000_000 for m in body["data"])
    assert api.client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    missing = api.client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and "'echo'" in missing.json()["error"]["message"]


def test_embeddings_are_the_live_encoders_vectors_in_openais_shape(api: Api) -> None:
    resp = embed(api, input=TEXTS)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert got.shape == (3, 64) and np.array_equal(got, expected(TEXTS))
    tokens = sum(query_tokens(t) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    one = embed(api, input="postgres replication slots", dimensions=64).json()
    assert len(one["data"]) == 1 and np.array_equal(np.float32(one["data"][0]["embedding"]), got[1])


def test_base64_is_little_endian_float32_of_the_same_vectors(api: Api) -> None:
    body = embed(api, input=TEXTS, encoding_format="base64").json()
    raw = [base64.b64decode(d["embedding"]) for d in body["data"]]
    assert all(len(r) == 64 * 4 for r in raw)
    assert np.array_equal(np.stack([np.frombuffer(r, dtype="<f4") for r in raw]), expected(TEXTS))


def test_embeddings_go_through_the_shared_query_path(api: Api) -> None:
    """Remembered query vectors and micro-batched passes: a text search embedded is not embedded again, and the
    texts are counted by the query batcher's metric."""
    encoder = api.client.app.state.services.active.current()[1]  # type: ignore[attr-defined]
    api.client.post("/v1/search", json={"query": TEXTS[1]})
    before = encoder.encoded
    assert embed(api, input=TEXTS).status_code == 200
    assert encoder.encoded - before == 2  # TEXTS[1] came from memory: only the two copies of TEXTS[0] were embedded
    metrics = api.client.get("/metrics").text
    assert "ragtide_query_embedded_texts_total 3.0" in metrics  # search's 1 + the 2 new texts
    assert 'ragtide_request_seconds_count{endpoint="embeddings"} 1.0' in metrics


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"input": [101, 2023, 102]}, 422, "token ids are not supported"),
        ({"input": [[101, 2023], [102]]}, 422, "token ids are not supported"),
        ({"input": "x", "dimensions": 32}, 422, "64-dimensional vectors and cannot shorten them"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, f"serves '{MODEL}'"),
        ({"input": ["a", "b", "c", "d", "e"]}, 422, "at most 4 per request (api.max_embedding_inputs)"),
        ({"input": ["short", "x" * 61]}, 422, "input[1]: longer than 60 characters (api.max_query_chars)"),
        ({"input": ["ok", ""]}, 422, "at least 1 character"),
        ({"input": []}, 422, "input"),
        ({"input": "x", "encoding_format": "int8"}, 422, "base64"),
    ],
)
def test_what_is_not_supported_is_refused_with_what_is(
    api: Api, body: dict[str, Any], status: int, needle: str
) -> None:
    resp = embed(api, **body)
    assert resp.status_code == status and needle in resp.text, resp.text
    if resp.status_code != 422 or isinstance(resp.json()["detail"], str):  # raised by the route, not by pydantic
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] == resp.json()["detail"]


def test_a_model_request_without_model_is_a_422(api: Api) -> None:
    resp = api.client.post("/v1/embeddings", json={"input": "x"})
    assert resp.status_code == 422 and "model" in resp.text


def test_embeddings_charge_the_tenants_quota_and_need_a_key_in_prod() -> None:
    for api in make_api(EchoGenerator(), gateway={"mode": "prod"}):
        assert embed(api, input="kafka").status_code == 401
        assert embed(api, {"Authorization": "Bearer sk-no-key"}, input="kafka").status_code == 401
        assert api.client.get("/v1/models").status_code == 401
        assert api.client.get("/v1/models", headers={"X-API-Key": ADMIN}).status_code == 200
        acme = api.key("acme")
        resp = embed(api, acme, input=TEXTS)
        assert resp.status_code == 200, resp.text
        tokens = resp.json()["usage"]["total_tokens"]
        assert int(resp.headers["X-Quota-Remaining"]) == int(resp.headers["X-Quota-Limit"]) - tokens
        day = next(iter(api.store.used))[1]
        assert api.store.usage("acme", day) == tokens


def test_dev_mode_serves_a_placeholder_key_as_it_serves_no_key(api: Api) -> None:
    placeholder = {"Authorization": "Bearer sk-no-key"}
    assert embed(api, placeholder, input="kafka").status_code == 200
    assert api.client.get("/v1/models", headers=placeholder).status_code == 200
    hits = api.client.post("/v1/search", json={"query": "kafka consumer lag", "k": 10}, headers=placeholder)
    assert {h["row_id"] for h in hits.json()["hits"]} >= {"10", "11"}  # every tenant, as without a key
    wrong = {"Authorization": "Bearer rtk_000000000000_" + "A" * 43}
    assert embed(api, wrong, input="kafka").status_code == 401


# --- the real clients, in-process ----------------------------------------------------------------------------


def bridge(client: TestClient) -> httpx2.Client:
    """An httpx2 client (what the openai SDK uses) whose requests go to the app through the TestClient."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        resp = client.request(request.method, request.url.raw_path.decode(), content=request.read(), headers=headers)
        return httpx2.Response(resp.status_code, headers=list(resp.headers.multi_items()), content=resp.content)

    return httpx2.Client(transport=httpx2.MockTransport(handle), base_url="http://ragtide")


def sdk(api: Api) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://ragtide/v1", api_key="sk-no-key", http_client=bridge(api.client), max_retries=0
    )


def test_the_openai_sdk_lists_models_embeds_and_chats(api: Api) -> None:
    client = sdk(api)
    assert [m.id for m in client.models.list()] == ["echo", MODEL]
    default = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    for result in (default, floats):
        assert np.array_equal(np.array([d.embedding for d in result.data], dtype=np.float32), expected(TEXTS))
    assert default.usage.total_tokens == sum(query_tokens(t) for t in TEXTS)
    with pytest.raises(openai.NotFoundError, match=f"serves '{MODEL}'"):
        client.embeddings.create(model="text-embedding-3-small", input="x")

    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "how are kafka topics stored?"}]
    reply = client.chat.completions.create(model="echo", messages=question)
    assert reply.choices[0].message.content == "According to [1]."
    chunks = list(client.chat.completions.create(model="echo", messages=question, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "According to [1]. "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_langchain_openai_embeddings_match_the_encoder(api: Api) -> None:
    lc = OpenAIEmbeddings(
        openai_api_base="http://ragtide/v1",
        openai_api_key=SecretStr("sk-no-key"),
        model=MODEL,
        check_embedding_ctx_length=False,
        http_client=bridge(api.client),
        max_retries=0,
    )
    assert np.allclose(lc.embed_query(TEXTS[1]), expected([TEXTS[1]])[0])
    assert np.allclose(lc.embed_documents(TEXTS[:2]), expected(TEXTS[:2]))


@pytest.mark.parametrize(
    "down", [StoreUnavailable("qdrant at :6333 refused"), psycopg.OperationalError("postgres at :5432 refused")]
)
def test_a_store_that_is_down_is_the_same_503_on_every_route(
    api: Api, down: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One mapping of "not now": ragtide's routes and the OpenAI-compatible ones answer a store outage with the
    same 503 and Retry-After (OpenAI's shape on the latter, whose SDK retries after it), never a 500."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise down

    monkeypatch.setattr(api.writer.index, "search", refuse)
    search = api.client.post("/v1/search", json={"query": "kafka topics"})
    assert (search.status_code, search.headers["retry-after"]) == (503, "5")
    assert search.json()["detail"] == str(down)
    question = {"model": "echo", "messages": [{"role": "user", "content": "how are kafka topics stored?"}]}
    chat = api.client.post("/v1/chat/completions", json=question)
    assert (chat.status_code, chat.headers["retry-after"]) == (503, "5"), chat.text
    assert chat.json()["error"] == {
        "message": str(down),
        "type": "server_error",
        "param": None,
        "code": "index_unavailable",
    }
