"""A Qdrant cluster's nodes, tried in turn: reads go to the next node whenever one is unavailable; writes only when
the first node was never reached (a timed-out write may still land there, after a newer one elsewhere)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from ragtide.contracts.errors import StoreUnavailable
from ragtide.embedder.index.remote import _Failover

pytestmark = pytest.mark.unit


class Node:
    def __init__(self, name: str, error: Exception | None = None) -> None:
        self.name = name
        self.error = error
        self.calls: list[str] = []

    def _call(self, what: str) -> str:
        self.calls.append(what)
        if self.error is not None:
            try:
                raise self.error
            except Exception as exc:
                raise StoreUnavailable(f"{self.name}: {exc!r}") from exc
        return self.name

    def search(self, *_: Any) -> str:
        return self._call("search")

    def upsert(self, *_: Any) -> str:
        return self._call("upsert")


def test_reads_fail_over_on_any_outage_and_stay_on_the_node_that_answered() -> None:
    down, up = Node("a", httpx.ReadTimeout("slow")), Node("b")
    nodes = _Failover([down, up])
    assert nodes.search() == "b"
    assert nodes.search() == "b" and down.calls == ["search"]  # the next call starts at the node that answered


def test_a_write_moves_on_only_when_the_node_was_never_reached() -> None:
    refused, up = Node("a", httpx.ConnectError("refused")), Node("b")
    assert _Failover([refused, up]).upsert() == "b"
    timed_out, other = Node("a", httpx.ReadTimeout("slow")), Node("b")
    with pytest.raises(StoreUnavailable):
        _Failover([timed_out, other]).upsert()
    assert other.calls == []  # not sent again elsewhere: the batch retry decides


def test_every_node_down_is_the_callers_outage() -> None:
    with pytest.raises(StoreUnavailable):
        _Failover([Node("a", httpx.ConnectError("x")), Node("b", httpx.ConnectError("y"))]).search()
