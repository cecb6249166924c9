"""Chunks and their deterministic point ids and payload schema."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, NotRequired, TypedDict

# Fixed namespace: the same (table, key, chunk_no) maps to the same point id in every process, forever.
POINT_NAMESPACE = uuid.UUID("5b1f7c2e-3d4a-4f6b-9a8e-7c6d5e4f3a2b")
_NAMESPACE_BYTES = POINT_NAMESPACE.bytes


def point_id(table: str, row_id: str, chunk_no: int) -> str:
    """Invariant 1: uuid5(namespace, "table:primary key:chunk_no"), as `str(uuid.uuid5(...))` spells it. Computed
    here without the UUID object (a third of the cost on the write path; the same string, tested)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{table}:{row_id}:{chunk_no}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def content_hash(text: str) -> str:
    """Fingerprint of a chunk's text; equal hash means no re-embedding."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class PointPayload(TypedDict):
    """What every point stores beside its vector."""

    table: str
    row_key: str  # "table:row_id": one keyword field to find/delete all chunks of a row
    row_id: str
    key: dict[str, Any]
    chunk_no: int
    chunk_count: int
    text: str
    hash: str
    tenant: str
    metadata: dict[str, Any]
    # The text columns' values, to fill Debezium's unchanged-TOAST placeholder later: on the row's first chunk
    # (chunk_no 0) only.
    columns: NotRequired[dict[str, Any]]
    lsn: int
    source_ts_ms: int
    indexed_at_ms: int


def row_key(table: str, row_id: str) -> str:
    """The payload value that groups all chunks of one row."""
    return f"{table}:{row_id}"
