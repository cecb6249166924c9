"""The clients people already have, against the real stack: the official `openai` SDK (models, embeddings in its
default base64 and in float, chat completions plain and streamed from the local generator) and LangChain
(OpenAIEmbeddings over /v1/embeddings, and the README's few-line retriever over /v1/search)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_openai import OpenAIEmbeddings
from openai.types.chat import ChatCompletionMessageParam
from pydantic import Field, SecretStr

from ragtide.compose import build_encoder
from ragtide.embedder.encoder import Encoder
from tests.e2e.conftest import LiveStack, poll
from tests.e2e.test_answer import new_key

TEXTS = ["How do I catch an exception in Python?", "Kafka topics are partitioned logs of records."]
PLACEHOLDER = "sk-no-key"


@pytest.fixture(scope="module")
def encoder(live: LiveStack) -> Encoder:
    """The configured encoder, loaded in this process: what ragtide's own vectors are."""
    return build_encoder(live.settings)


def sdk(live: LiveStack, api_key: str = PLACEHOLDER) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.settings.api.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def cosines(got: Any, want: Any) -> Any:
    a, b = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_openai_sdk_lists_models_and_embeds_with_ragtides_encoder(live: LiveStack, encoder: Encoder) -> None:
    client = sdk(live)
    assert [m.id for m in client.models.list()] == [live.settings.generator.model, encoder.model_name]
    assert client.models.retrieve(encoder.model_name).owned_by == "ragtide"

    raw = client.embeddings.with_raw_response.create(model=encoder.model_name, input=TEXTS)
    assert all(isinstance(d["embedding"], str) for d in raw.http_response.json()["data"])  # base64 on the wire
    default = raw.parse()  # ... decoded by the SDK
    floats = client.embeddings.create(model=encoder.model_name, input=TEXTS, encoding_format="float")
    want = encoder.encode(TEXTS)
    for result in (default, floats):
        assert result.model == encoder.model_name and [d.index for d in result.data] == [0, 1]
        got = [d.embedding for d in result.data]
        assert len(got[0]) == encoder.dim and cosines(got, want).min() > 0.999
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    with pytest.raises(openai.NotFoundError, match=encoder.model_name):
        client.embeddings.create(model="text-embedding-3-small", input=TEXTS[0])
    with pytest.raises(openai.AuthenticationError):  # a ragtide-shaped key that does not exist: 401 in dev mode too
        sdk(live, "rtk_000000000000_" + "A" * 43).models.list()


def test_the_openai_sdk_chats_plain_and_streamed_with_the_local_generator(live: LiveStack) -> None:
    client = sdk(live)
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How do I catch an exception?"}]
    reply = client.chat.completions.create(model=live.settings.generator.model, messages=question, max_tokens=16)
    assert reply.object == "chat.completion" and reply.model == live.settings.generator.model
    assert (reply.choices[0].message.content or "").strip() and reply.usage and reply.usage.completion_tokens >= 1

    stream = client.chat.completions.create(
        model=live.settings.generator.model, messages=question, max_tokens=12, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


def test_a_tenants_embeddings_are_charged_to_its_quota(live: LiveStack, encoder: Encoder) -> None:
    tenant = f"oai-{uuid.uuid4().hex[:8]}"
    key = new_key(live, tenant)["Authorization"].split()[1]
    raw = sdk(live, key).embeddings.with_raw_response.create(model=encoder.model_name, input=TEXTS)
    tokens = raw.parse().usage.total_tokens
    assert int(raw.headers["X-Quota-Remaining"]) == int(raw.headers["X-Quota-Limit"]) - tokens
    used = live.sql("SELECT tokens FROM ragtide_gateway.usage WHERE tenant = %s AND day = current_date", (tenant,))
    assert used == [(tokens,)]


class RagtideRetriever(BaseRetriever):
    """The README's retriever over /v1/search."""

    url: str = "http://localhost:28000"
    k: int = 5
    headers: dict[str, str] = Field(default_factory=dict)  # prod mode: {"Authorization": "Bearer rtk_..."}

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        resp = httpx.post(f"{self.url}/v1/search", json={"query": query, "k": self.k}, headers=self.headers)
        resp.raise_for_status()
        return [Document(h.pop("text"), metadata=h) for h in resp.json()["hits"]]


def test_langchain_embeddings_and_retriever_over_the_real_api(live: LiveStack, encoder: Encoder) -> None:
    embeddings = OpenAIEmbeddings(
        openai_api_base=f"{live.settings.api.url}/v1",
        openai_api_key=SecretStr(PLACEHOLDER),
        model=encoder.model_name,
        check_embedding_ctx_length=False,
        chunk_size=32,
        max_retries=0,
    )
    assert cosines([embeddings.embed_query(TEXTS[0])], encoder.encode(TEXTS[:1]))[0] > 0.999
    assert cosines(embeddings.embed_documents(TEXTS), encoder.encode(TEXTS)).min() > 0.999

    marker = f"zq{uuid.uuid4().hex[:6]}"
    row_id = f"langchain-{marker}"
    live.sql(
        "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, 'Orchard', %s, 'e2e', 'e2e')",
        (row_id, f"The {marker} orchard keeper prunes the pear trees every March."),
    )
    query = f"When does the {marker} orchard keeper prune?"
    retriever = RagtideRetriever(url=live.settings.api.url, k=3)
    docs = poll(lambda: [d for d in retriever.invoke(query) if d.metadata["row_id"] == row_id], "the new row")
    assert marker in docs[0].page_content and "text" not in docs[0].metadata
    assert docs[0].metadata["table"] == "public.docs" and docs[0].metadata["key"] == {"id": row_id}
    assert docs[0].metadata["metadata"]["category"] == "e2e" and docs[0].metadata["age_s"] < 120
