"""The embedder's liveness: stalled only when records wait with no commit, never while a store is retried, and
blocked when the checks stop; served at /healthz beside the metrics."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry

from ragtide.embedder.liveness import Watchdog, health_app, serve_health
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.stack.process import free_port

TP = ("ragtide.public.docs", 0)
OTHER = ("ragtide.public.tickets", 2)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_records_waiting_with_no_commit_past_the_limit_is_a_stall_and_a_commit_clears_it() -> None:
    clock = Clock()
    dog = Watchdog(stall_s=60, clock=clock)
    assert dog.verdict().ok and dog.verdict().reason == "starting"
    dog.observe({TP: (100, 100), OTHER: (5, 5)})
    assert dog.verdict().reason == "ok" and dog.verdict().backlog == 0

    clock.t = 1000.0  # idle for a long time, then records arrive: the wait starts now, not at the last commit
    dog.observe({TP: (140, 100), OTHER: (5, 5)})
    assert dog.verdict().ok and dog.verdict().backlog == 40
    clock.t = 1050.0
    dog.observe({TP: (180, 100), OTHER: (5, 5)})
    assert dog.verdict().ok  # 50 s < 60 s
    clock.t = 1061.0
    dog.observe({TP: (200, 100), OTHER: (5, 5)})
    stalled = dog.verdict()
    assert not stalled.ok and stalled.partitions == ["ragtide.public.docs/0"] and stalled.backlog == 100
    assert stalled.reason == "stalled: 100 records waiting on ragtide.public.docs/0 with no commit for 61 s"

    dog.outage.begin("embedded index: disk full (ENOSPC)")  # a store is down and the batch is retried: alive
    assert dog.verdict().ok and dog.verdict().status == "ok" and "ENOSPC" in dog.verdict().reason
    clock.t = 1061.0 + dog.degraded_s + 1  # and degraded once it lasts, still not a restart
    degraded = dog.verdict()
    assert degraded.ok and degraded.degraded and degraded.status == "degraded"
    assert degraded.as_dict()["status"] == "degraded" and "unavailable for 31 s" in degraded.reason
    dog.outage.end()
    assert not dog.verdict().ok and dog.verdict().status == "stalled"

    clock.t = 1100.0
    dog.observe({TP: (200, 150), OTHER: (5, 5)})  # a commit: progress, even with records still waiting
    assert dog.verdict().ok and dog.verdict().waiting_s == 0


def test_checks_that_stop_mean_a_blocked_loop_and_an_unreadable_kafka_is_not_a_stall() -> None:
    clock = Clock()
    dog = Watchdog(stall_s=30, clock=clock)
    dog.observe({TP: (10, 0)})
    clock.t = 31.0
    dog.unknown(ConnectionError("kafka down"))
    assert dog.verdict().ok and dog.checks == 2  # progress unknown, not stalled
    clock.t = 62.0
    blocked = dog.verdict()
    assert not blocked.ok and blocked.reason == "blocked: no liveness check for 31 s"


def test_healthz_and_metrics_are_served_from_one_port() -> None:
    clock, registry = Clock(), CollectorRegistry()
    EmbedderMetrics(registry).stalled.set(1)
    dog = Watchdog(stall_s=10, clock=clock)
    port = free_port()
    server = serve_health(health_app(registry, dog), "127.0.0.1", port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").json()["reason"] == "starting"
        dog.observe({TP: (10, 0)})
        clock.t = 11.0
        dog.observe({TP: (10, 0)})
        resp = httpx.get(f"{base}/healthz")
        assert resp.status_code == 503 and resp.json()["partitions"] == ["ragtide.public.docs/0"]
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200 and "ragtide_embedder_stalled 1.0" in metrics.text
    finally:
        server.shutdown()


def test_one_partition_that_stops_while_the_others_commit_is_sought_back() -> None:
    """faust-streaming can lose a partition's records in flight at a rebalance: its fetch position is past them,
    so nothing reaches the worker and its commit never moves, while the other partitions go on committing. The
    worker as a whole is alive (a restart is for a worker that commits nothing); that partition is sought back."""
    clock = Clock()
    dog = Watchdog(stall_s=60, clock=clock)
    a, b = ("ragtide.public.docs", 0), ("ragtide.public.docs", 1)
    dog.observe({a: (100, 10), b: (50, 20)})
    for t in range(1, 5):  # b moves on every check; a never does
        clock.t = 20.0 * t
        dog.observe({a: (100 + t, 10 + t), b: (50, 20)})
    assert dog.verdict().ok
    assert dog.stuck({b: 5.0}, after_s=30, pending={b}) == {}  # its records wait in the buffer: not lost
    assert dog.stuck({b: 5.0}, after_s=30) == {b: 20}  # seek back to the committed offset
    assert dog.stuck({b: 5.0}, after_s=30) == {}  # once per after_s
    assert dog.stuck({a: clock.t}, after_s=30) == {}  # a is moving


def test_a_partition_is_sought_back_on_the_consumers_own_thread() -> None:
    """faust's Consumer.seek calls aiokafka from the caller's thread, racing its fetcher (a KeyError crashed the
    worker in bench scale); the seek goes through the consumer thread's seek_wait instead."""
    import asyncio

    from faust.transport.consumer import ThreadDelegateConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.types import TP

    from ragtide.embedder.worker import seek_back

    sought: list[dict[TP, int]] = []

    class Consumer:
        async def seek_wait(self, partitions: dict[TP, int]) -> None:  # faust: through the consumer's thread
            sought.append(dict(partitions))

        async def seek(self, tp: TP, offset: int) -> None:
            raise AssertionError("Consumer.seek runs aiokafka on the caller's thread")

    tp = TP("ragtide.public.docs", 3)
    asyncio.run(seek_back(Consumer(), tp, 42))
    assert sought == [{tp: 42}]
    # the real consumer delegates seek_wait to its thread, which runs it there (call_thread)
    assert callable(getattr(ThreadDelegateConsumer, "seek_wait", None))
    assert callable(getattr(AIOKafkaConsumerThread, "seek_wait", None))
