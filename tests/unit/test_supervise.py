"""The supervisor restarts dead processes in dependency order, backs off a start that fails, never dies itself, and
leaves alone what was not running when it began."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import RagtideSettings
from ragtide.stack.cluster import Cluster
from ragtide.stack.stack import ORDER
from ragtide.stack.supervise import Supervisor


@dataclass
class FakeDaemon:
    stack: FakeStack
    name: str

    def pid(self) -> int | None:
        return 100 if self.name in self.stack.alive else None


@dataclass
class FakeStack:
    alive: set[str]
    failing: dict[str, Exception] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)

    def processes(self) -> tuple[str, ...]:
        return ORDER

    def daemon(self, name: str) -> FakeDaemon:
        return FakeDaemon(self, name)

    def start(self, name: str) -> None:
        self.started.append(name)
        if name in self.failing:
            raise self.failing[name]
        self.alive.add(name)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_dead_processes_come_back_in_dependency_order_and_unwatched_ones_are_left_alone() -> None:
    stack = FakeStack(alive={"postgres", "kafka", "connect", "node"})  # no local generator
    sup = Supervisor(stack, clock=Clock())  # type: ignore[arg-type]
    assert sup.watched == ["postgres", "kafka", "connect", "node"]
    assert sup.check() == []
    stack.alive -= {"node", "postgres"}
    done = sup.check()
    assert [r.name for r in done] == ["postgres", "node"] and all(r.ok for r in done)
    assert stack.started == ["postgres", "node"] and "generator" not in stack.started


def test_a_failing_start_backs_off_and_an_unexpected_error_does_not_stop_the_supervisor() -> None:
    clock = Clock()
    stack = FakeStack(alive={"postgres", "kafka", "node"})
    sup = Supervisor(stack, names=["postgres", "kafka", "node"], clock=clock)  # type: ignore[arg-type]
    stack.alive -= {"kafka", "node"}
    stack.failing = {"kafka": StackError("kafka exited"), "node": KeyError("unexpected")}
    first = sup.check()
    assert [(r.name, r.ok) for r in first] == [("kafka", False), ("node", False)]
    assert first[1].error == "KeyError: 'unexpected'"
    clock.t = 0.5
    assert sup.check() == []  # backing off: 1 s after the first failure
    clock.t = 1.5
    stack.failing = {}
    assert [(r.name, r.ok) for r in sup.check()] == [("kafka", True), ("node", True)]
    assert stack.started == ["kafka", "node", "kafka", "node"] and len(sup.restarts) == 4


def test_a_cluster_is_supervised_member_by_member_in_dependency_order(tmp_path: Path) -> None:
    """`up --cluster --supervise`: the cluster names its processes in start order, and a name starts exactly that
    member (the index parsed from it); an unknown name is refused with the names it could be."""
    c = Cluster(RagtideSettings(data_dir=tmp_path, cluster={"qdrant_nodes": 3, "brokers": 3}))
    names = c.processes()
    assert names[:8] == ["postgres", "qdrant-0", "qdrant-1", "qdrant-2", "kafka-0", "kafka-1", "kafka-2", "connect"]
    assert names[8:11] == ["generator", "embedder-0", "embedder-1"] and names[-1] == "retriever-7"
    calls: list[tuple[str, int]] = []
    c.start_embedder = lambda i: calls.append(("embedder", i))  # type: ignore[method-assign]
    c.start_retriever = lambda i: calls.append(("retriever", i))  # type: ignore[method-assign]
    c.start_connect = lambda: calls.append(("connect", 0))  # type: ignore[method-assign]
    for name in ("embedder-3", "retriever-1", "connect"):
        c.start(name)
    assert calls == [("embedder", 3), ("retriever", 1), ("connect", 0)]
    for bad in ("qdrant-3", "kafka-x", "embedder-8", "node"):
        with pytest.raises(ValueError, match=r"no process .* in the cluster .*embedder-0"):
            c.start(bad)

    stopped = FakeStack(alive=set())
    sup = Supervisor(stopped, names=["node", "kafka"])  # type: ignore[arg-type]
    assert sup.names == ["kafka", "node"]  # dependency order, whatever order was asked


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """A port from Linux's ephemeral range (32768-60999) can be taken by an outgoing connection before the server
    binds it (CI saw a node's API port taken so); and two calls must not give the same not-yet-bound port."""
    from ragtide.stack.process import free_port, free_port_range

    ports = [free_port() for _ in range(200)]
    assert all(20_000 <= p < 32_000 for p in ports) and len(set(ports)) == len(ports)
    base = free_port_range(51)
    assert not set(ports) & set(range(base, base + 51))
