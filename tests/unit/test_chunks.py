"""Deterministic point ids and content fingerprints (invariant 1 and 4)."""

from __future__ import annotations

import uuid

from ragtide.contracts.chunks import content_hash, point_id, row_key


def test_point_id_is_uuid5_of_table_key_chunk() -> None:
    pid = point_id("public.docs", "42", 3)
    assert uuid.UUID(pid).version == 5
    assert pid == point_id("public.docs", "42", 3)
    # Golden value: changing the namespace or the name format would orphan every stored point.
    assert pid == str(uuid.uuid5(uuid.UUID("5b1f7c2e-3d4a-4f6b-9a8e-7c6d5e4f3a2b"), "public.docs:42:3"))


def test_point_ids_differ_by_table_key_and_chunk() -> None:
    ids = {point_id(t, k, n) for t in ("public.a", "public.b") for k in ("1", "2", "1|2") for n in range(3)}
    assert len(ids) == 2 * 3 * 3


def test_content_hash_and_row_key() -> None:
    assert content_hash("hello") == content_hash("hello") != content_hash("hello!")
    assert row_key("public.docs", "7") == "public.docs:7"
