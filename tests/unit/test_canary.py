"""The canary's row per replica: a stable slot per host name, and a search for exactly its own row."""

from __future__ import annotations

from typing import Any, cast

import pytest

from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import CanarySettings
from ragtide.embedder.index.base import FixedIndex
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.writer import IndexWriter
from ragtide.ingest.sources import CANARY_TABLE, SourcesConfig, SourceTable
from ragtide.retriever.canary import Canary, canary_slot
from tests.doubles import HashEncoder, word_chunker

pytestmark = pytest.mark.unit
DOCS = SourceTable(table="public.docs", key=("id",), text="{body}")


def test_slots_are_stable_per_host_and_distinct_between_replicas() -> None:
    pods = [f"ragtide-retriever-7d9f8c6b5-{s}" for s in ("x2k4p", "q8w1n", "m3z7r")]
    slots = [canary_slot(p) for p in pods]
    assert slots == [canary_slot(p) for p in pods]
    assert len(set(slots)) == 3
    assert all(0 <= s < 2**31 for s in slots)  # the canary table's id is a Postgres int
    assert canary_slot() == canary_slot()  # this host's


def test_each_canary_finds_only_its_own_row() -> None:
    index, encoder = MemoryIndex(), HashEncoder()
    writer = IndexWriter(index, encoder, word_chunker(), SourcesConfig(sources=(DOCS,)).with_canary())
    a, b = (
        Canary("postgresql://unused", FixedIndex(index, encoder), cast(Any, None), CanarySettings(), slot=s)
        for s in (canary_slot("pod-a"), canary_slot("pod-b"))
    )

    def committed(slot: int, nonce: str, lsn: int) -> None:
        body = {"id": slot, "body": f"ragtide canary {nonce}"}
        writer.apply([ChangeEvent(CANARY_TABLE, Op.UPDATE, {"id": slot}, body, SourcePosition(lsn, lsn))])

    committed(a.slot, "aaaa", 10)
    assert a._found("aaaa") and not b._found("aaaa")
    # b's newer row is at least as close to the query as a's; a must still find its own
    committed(b.slot, "bbbb", 11)
    assert a._found("aaaa") and b._found("bbbb")
    assert not a._found("bbbb")
