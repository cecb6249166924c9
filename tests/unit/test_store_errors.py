"""Each backend's explicit mapping of "unavailable right now" onto StoreUnavailable, against the real clients: what
is mapped is retried by the worker, everything else is a bug or a poison row."""

from __future__ import annotations

import errno

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.pg import SerialConnection
from ragtide.embedder.index.base import IndexPoint
from ragtide.embedder.index.edge import edge_unavailable
from ragtide.embedder.index.remote import QdrantClientIndex, client_unavailable
from ragtide.stack.process import free_port


def test_a_qdrant_server_that_does_not_answer_is_unavailable_and_names_the_collection() -> None:
    index = QdrantClientIndex(
        QdrantClient(url=f"http://127.0.0.1:{free_port()}", timeout=2, check_compatibility=False), "docs"
    )
    with pytest.raises(StoreUnavailable, match=r"Qdrant collection docs: unreachable"):
        index.upsert([IndexPoint("00000000-0000-0000-0000-000000000001", np.ones(4, np.float32), {})])


def test_a_bad_request_to_qdrant_is_not_an_outage() -> None:
    """qdrant-client's local mode (no server): a write to a collection that does not exist is our bug."""
    index = QdrantClientIndex(QdrantClient(location=":memory:"), "missing")
    with pytest.raises(ValueError, match="Collection missing not found") as raised:
        index.upsert([IndexPoint("00000000-0000-0000-0000-000000000001", np.ones(4, np.float32), {})])
    assert not isinstance(raised.value, StoreUnavailable)


@pytest.mark.parametrize(
    ("status", "content", "outage"),
    [
        (503, b"", True),
        (429, b"", True),
        (504, b"", True),
        (500, b'{"status":{"error":"No space left on device (os error 28)"}}', True),
        (500, b'{"status":{"error":"panic"}}', False),
        (400, b'{"status":{"error":"Wrong input: vector dimension"}}', False),
        (404, b"", False),
    ],
)
def test_qdrant_server_answers_that_mean_not_now(status: int, content: bytes, outage: bool) -> None:
    exc = UnexpectedResponse(status, "reason", content, None)  # type: ignore[arg-type]
    assert (client_unavailable(exc) is not None) == outage


def test_only_transport_failures_wrapped_by_qdrant_client_are_an_outage() -> None:
    assert client_unavailable(ResponseHandlingException(httpx.ConnectTimeout("timed out")))
    assert client_unavailable(ResponseHandlingException(ValueError("response does not parse"))) is None


def test_the_embedded_engine_disk_full_errors_and_nothing_else() -> None:
    assert edge_unavailable(RuntimeError("Service internal error: No space left on device (os error 28)"))
    assert edge_unavailable(OSError(errno.ENOSPC, "No space left on device"))
    assert edge_unavailable(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert edge_unavailable(OSError(errno.EACCES, "Permission denied")) is None
    assert edge_unavailable(RuntimeError("Wrong input: vector dimension error")) is None


def test_postgres_unreachable_is_unavailable_and_names_the_store() -> None:
    db = SerialConnection(f"postgresql://ragtide@127.0.0.1:{free_port()}/ragtide", connect_timeout=2, name="gateway")
    with pytest.raises(StoreUnavailable, match=r"^gateway \(Postgres\) unavailable"):
        db.run("SELECT 1")
