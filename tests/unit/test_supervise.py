"""The supervisor restarts dead processes in dependency order, backs off a start that fails, never dies itself, and
leaves alone what was not running when it began."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import RagtideSettings
from ragtide.stack.cluster import Cluster
from ragtide.stack.stack import TIERS
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

    tiers_: tuple[tuple[str, ...], ...] = TIERS

    def tiers(self) -> tuple[tuple[str, ...], ...]:
        return self.tiers_

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
    tiers = c.tiers()
    assert sorted(n for tier in tiers for n in tier) == sorted(names)  # every process in exactly one tier
    assert tiers[0] == ["postgres"] and tiers[2] == ["connect"] and "generator" in tiers[1]
    assert {"kafka-0", "qdrant-2"} <= set(tiers[1]) and {"embedder-0", "retriever-7"} <= set(tiers[3])
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


def test_the_dead_of_one_tier_start_side_by_side_and_one_kind_one_after_another() -> None:
    """An embedder and a retriever that died together start at the same time (each start here waits until the
    other has begun: one after the other, the first would time out); two dead brokers start one after the other;
    the tier after waits for both."""
    tiers = (("kafka-0", "kafka-1"), ("embedder-0", "retriever-0"))
    both_begun = threading.Barrier(2, timeout=5)
    running: dict[str, int] = {}
    overlap: list[str] = []
    lock = threading.Lock()

    class Concurrent(FakeStack):
        def start(self, name: str) -> None:
            kind = name.split("-")[0]
            with lock:
                running[kind] = running.get(kind, 0) + 1
                if running[kind] > 1:
                    overlap.append(name)
            try:
                if kind in ("embedder", "retriever"):
                    assert not {"kafka-0", "kafka-1"} - self.alive  # its tier waited for the brokers
                    both_begun.wait()
                super().start(name)
            finally:
                with lock:
                    running[kind] -= 1

    everything = {n for tier in tiers for n in tier}
    stack = Concurrent(alive=set(everything), tiers_=tiers)
    sup = Supervisor(stack, clock=Clock())  # type: ignore[arg-type]
    assert sup.names == ["kafka-0", "kafka-1", "embedder-0", "retriever-0"]
    stack.alive.clear()
    done = sup.check()
    assert [(r.name, r.ok, r.error) for r in done] == [(n, True, "") for n in sup.names]
    assert overlap == [] and stack.alive == everything


def test_a_start_that_brings_up_the_next_of_its_kind_is_not_repeated() -> None:
    """`kafka-0`'s start launches the other dead brokers of its quorum: `kafka-1` is then running and is skipped."""

    class Quorum(FakeStack):
        def start(self, name: str) -> None:
            super().start(name)
            self.alive |= {"kafka-0", "kafka-1"}

    stack = Quorum(alive={"kafka-0", "kafka-1"}, tiers_=(("kafka-0", "kafka-1"),))
    sup = Supervisor(stack, clock=Clock())  # type: ignore[arg-type]
    stack.alive.clear()
    assert [r.name for r in sup.check()] == ["kafka-0"] and stack.started == ["kafka-0"]


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """A port from Linux's ephemeral range (32768-60999) can be taken by an outgoing connection before the server
    binds it (CI saw a node's API port taken so); and two calls must not give the same not-yet-bound port."""
    from ragtide.contracts.settings import CLUSTER_PORT_SPAN
    from ragtide.stack.process import free_port, free_port_range

    ports = [free_port() for _ in range(200)]
    assert all(20_000 <= p < 32_000 for p in ports) and len(set(ports)) == len(ports)
    base = free_port_range(CLUSTER_PORT_SPAN)
    assert not set(ports) & set(range(base, base + CLUSTER_PORT_SPAN))


def test_the_backoff_grows_1_2_5_10_30_and_resets_after_a_success() -> None:
    clock = Clock()
    stack = FakeStack(alive={"postgres", "kafka", "node"})
    sup = Supervisor(stack, names=["kafka"], clock=clock)  # type: ignore[arg-type]
    stack.alive.discard("kafka")
    stack.failing = {"kafka": StackError("kafka exited")}
    tries = []
    for t in range(0, 49):
        clock.t = float(t)
        if sup.check():
            tries.append(t)
    assert tries[:6] == [0, 1, 3, 8, 18, 48]
    stack.failing = {}
    clock.t = 78.0
    assert sup.check()[0].ok
    stack.alive.discard("kafka")
    stack.failing = {"kafka": StackError("again")}
    clock.t = 79.0
    sup.check()
    clock.t = 80.0
    assert sup.check() != []  # after a success the next failure waits 1 s again, not 30
