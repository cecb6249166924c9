"""The split topology under a steady write load (inserts, text and metadata updates, deletes on `public.faults`):
embedders added, SIGKILLed and stopped; a Qdrant node SIGKILLed; a Kafka broker SIGKILLed; a blue/green rebuild
whose leading embedder is SIGKILLed mid-build; an embedder, a retriever and a broker SIGKILLed and started again by
the supervisor (`up --cluster --supervise`). After each: the consumer group has caught up with every record,
then Postgres against search row by row (0 lost, 0 stale, 0 ghosts), `verify` through a retriever (0 drift, the
leader answers it), an empty dead-letter topic. And two retrievers share one answer cache: a hit on one for an
answer the other stored, never a hit once a cited row changed, and one size bound over both.

The rebalance test also counts, from the embedders' ack logs, the records applied twice in each step (goal: at most
one batch per moved partition), and so shows whether faust-streaming's known rebalance failures happen here:
#216 (offsets skipped on resume) and #221 (out-of-order after a rebalance) would show as lost or stale rows,
#318 and #502 (offsets not committed, duplicates) as records applied again, #532 (consumers that stop) as a group
that never catches up. Counts are printed and bounded, timings never asserted.

`RAGTIDE_SCALE_STEP_S` (default 12) is how long each step runs under load; CI runs the default.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psycopg

from ragtide.bench.faults import SOURCE, WriteLoad, audit
from ragtide.bench.scale import read_ack_logs, reprocessed
from ragtide.embedder.dlq import list_dead_letters
from ragtide.embedder.lease import PostgresLease
from ragtide.embedder.liveness import consumed, end_offsets
from ragtide.ingest.connector import source_topics
from ragtide.ingest.sources import sources_of
from ragtide.stack.cluster import Cluster
from ragtide.stack.process import wait_until
from ragtide.stack.supervise import Supervisor

STEP_S = float(os.environ.get("RAGTIDE_SCALE_STEP_S", "12"))
RATE = 10.0  # changes per second: steady, and within what 2 shared cores embed while everything else runs


@dataclass
class SearchProbe:
    """Searches every retriever in turn, four times a second, from a thread; remembers each failure."""

    urls: list[str]
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SearchProbe:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        with httpx.Client() as client:
            n = 0
            while not self._stop.wait(0.25):
                url = self.urls[n % len(self.urls)]
                n += 1
                try:
                    resp = client.post(f"{url}/v1/search", json={"query": "fault row", "k": 3}, timeout=10)
                    if resp.status_code == 200:
                        self.answered += 1
                        continue
                    self.failures.append(f"{url}: {resp.status_code} {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{url}: {exc!r}")

    def stop(self) -> None:
        self._stop.set()


def kill(c: Cluster, name: str) -> None:
    pid = c.daemon(name).pid()
    assert pid is not None, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: c.daemon(name).pid() is None, f"{name} to die", 10)


def leader_url(c: Cluster) -> str | None:
    s = c.settings
    return PostgresLease(s.postgres.state(), f"embedder:{s.index.collection}").leader()


def admin(c: Cluster, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Through the second retriever (forwarded to whichever embedder leads)."""
    url = f"{c.retriever_urls()[-1]}/v1/admin/{path}"
    resp = httpx.request(method, url, json=body, timeout=600)
    assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text}"
    out: dict[str, Any] = resp.json()
    return out


def exact(c: Cluster, load: WriteLoad) -> dict[str, Any]:
    """Stop the load; wait until the group committed every record written; compare Postgres with search."""
    load.stop()
    s = c.settings
    topics = source_topics(s, sources_of(s))
    settled: list[dict[tuple[str, int], int]] = []

    def shipped() -> bool:  # Debezium has put every committed change in Kafka: the end offsets stop moving
        settled.append(asyncio.run(end_offsets(s.kafka, topics)))
        time.sleep(1.5)
        return len(settled) > 1 and settled[-1] == settled[-2]

    wait_until(shipped, "Debezium to ship the last changes", 120)
    targets = settled[-1]
    wait_until(lambda: asyncio.run(consumed(s.kafka, s.kafka.group, targets)), "the group to catch up", 600)
    found = audit(c.retriever_urls()[0], s.postgres.dsn(), load.ever)
    drift = admin(c, "POST", "verify", {"table": SOURCE["table"]})["drift"]
    dead = len(asyncio.run(list_dead_letters(s.kafka, s.dlq_topic)))
    report = {"changes": dict(load.counts), "audit": asdict(found), "verify_drift": drift, "dead_letters": dead}
    print(report)
    assert load.errors == [] and sum(load.counts.values()) > RATE * STEP_S / 2  # the load really ran
    assert found.live_rows > 0
    assert (found.lost, found.stale, found.ghosts) == ([], [], [])
    assert drift == 0 and dead == 0
    return report


def test_embedders_join_die_and_leave_under_load_and_lose_nothing(cluster: Cluster) -> None:
    c = cluster
    load = WriteLoad(c.settings.postgres.dsn(), rate=RATE, seed=1, first_id=1)
    load.start()
    windows: list[tuple[str, float, float]] = []

    def step(name: str, action: Callable[[], object]) -> None:
        t0 = time.time()
        action()
        time.sleep(STEP_S)
        windows.append((name, t0, time.time()))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)

    step("1 embedder", lambda: None)
    step("2nd embedder joins", lambda: c.start_embedder(1))
    step("3rd embedder joins", lambda: c.start_embedder(2))
    step("SIGKILL embedder 0", lambda: kill(c, "embedder-0"))
    step("embedder 1 stops (SIGTERM)", lambda: c.daemon("embedder-1").stop(timeout=60))
    exact(c, load)
    counts = reprocessed(read_ack_logs(c.ack_log(i) for i in range(3)), windows)
    print({"reprocessed_records": counts})
    one_batch_per_partition = c.settings.batch.events_per_batch(False) * c.settings.cluster.partitions
    assert all(n <= one_batch_per_partition for n in counts.values()), counts


def test_a_qdrant_node_dies_search_keeps_answering_and_it_catches_up(cluster: Cluster) -> None:
    c = cluster
    c.start_embedder(0)  # two embedders write (the first test left one)
    load = WriteLoad(c.settings.postgres.dsn(), rate=RATE, seed=2, first_id=100_000)
    load.start()
    probe = SearchProbe(c.retriever_urls()).start()
    time.sleep(3)
    kill(c, "qdrant-0")  # the node every process talks to first: each fails over to the next
    time.sleep(STEP_S)
    c.qdrant_node(0).start(timeout=90)
    node = f"http://127.0.0.1:{c.port('qdrant', 0)}"

    def replicas_active() -> bool:
        names = [x["name"] for x in httpx.get(f"{node}/collections", timeout=5).json()["result"]["collections"]]
        for name in names:
            info = httpx.get(f"{node}/collections/{name}/cluster", timeout=5).json()["result"]
            shards = info["local_shards"] + info["remote_shards"]
            if any(sh["state"] != "Active" for sh in shards) or info["shard_transfers"]:
                return False
        return True

    wait_until(replicas_active, "every replica on the restarted node to be active again", 300)
    time.sleep(2)
    probe.stop()
    exact(c, load)
    print({"searches": probe.answered, "failed": len(probe.failures), "first_failures": probe.failures[:3]})
    assert probe.answered > 0 and probe.failures == []


def test_a_kafka_broker_dies_under_load_and_nothing_is_lost(cluster: Cluster) -> None:
    c = cluster
    load = WriteLoad(c.settings.postgres.dsn(), rate=RATE, seed=3, first_id=200_000)
    load.start()
    time.sleep(3)
    kill(c, "kafka-1")
    time.sleep(STEP_S)
    broker = c.broker(1)
    broker.launch()
    broker.wait(timeout=120)
    time.sleep(3)
    exact(c, load)


def test_a_rebuild_survives_its_leader_dying(cluster: Cluster) -> None:
    c = cluster
    for i in (0, 1):
        c.start_embedder(i)
    load = WriteLoad(c.settings.postgres.dsn(), rate=RATE, seed=4, first_id=300_000)
    load.start()
    time.sleep(3)
    before = admin(c, "GET", "generations")
    building = admin(c, "POST", "reindex", {})["building"]["fingerprint"]
    leader = leader_url(c)
    assert leader is not None
    victim = next(f"embedder-{i}" for i in range(8) if leader.endswith(f":{c.port('embedder', i)}"))
    time.sleep(1)
    kill(c, victim)
    wait_until(lambda: leader_url(c) not in (None, leader), "another embedder to take the lease", 60)

    def switched() -> bool:
        status = admin(c, "GET", "generations")
        return bool(status["live"]["fingerprint"] == building and status["building"] is None)

    wait_until(switched, f"the new leader to finish building {building} and switch to it", 600)
    old = before["live"]["fingerprint"]
    node = f"http://127.0.0.1:{c.port('qdrant', 1)}"

    def old_dropped() -> bool:
        names = [x["name"] for x in httpx.get(f"{node}/collections", timeout=5).json()["result"]["collections"]]
        return not any(name.endswith(old) for name in names)

    wait_until(old_dropped, f"the retired generation {old} to be dropped after its grace period", 120)
    exact(c, load)


def ask(url: str, question: str) -> dict[str, Any]:
    resp = httpx.post(f"{url}/v1/answer", json={"query": question, "k": 2, "max_tokens": 16}, timeout=180)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_two_retrievers_share_the_cache_and_never_serve_an_answer_whose_row_changed(cluster: Cluster) -> None:
    c = cluster
    a, b = c.retriever_urls()[:2]
    dsn = c.settings.postgres.dsn()
    row = 900_001
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.faults (id, rid, body, label) VALUES (%s, %s, %s, 'cache')",
            (row, row, "The zq harbour master rings the copper bell at dawn."),
        )

    def searchable(url: str, words: str) -> bool:
        body = {"query": "harbour master", "k": 1, "filter": {"rid": row}}
        hits = httpx.post(f"{url}/v1/search", json=body, timeout=10).json()["hits"]
        return bool(hits and words in hits[0]["text"])

    wait_until(lambda: searchable(b, "copper bell"), "the row to be searchable", 120)
    question = "What does the zq harbour master ring at dawn?"
    first = ask(a, question)
    assert first["cache"]["hit"] is False and any(x["row_id"] == str(row) for x in first["citations"])
    again = ask(b, question)  # stored by a, found by b
    assert again["cache"]["hit"] is True and again["answer"] == first["answer"]

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE public.faults SET body = %s WHERE id = %s", ("The zq harbour master fires a brass cannon.", row)
        )
    wait_until(lambda: searchable(a, "brass cannon") and searchable(b, "brass cannon"), "the update", 120)
    fresh = ask(b, question)  # the answer built on the old text is not served: it is generated again
    assert fresh["cache"]["hit"] is False
    assert any("brass cannon" in x["text"] for x in fresh["citations"] if x["row_id"] == str(row))
    other = ask(a, question)  # a may serve b's new answer from the cache, never the old one
    assert any("brass cannon" in x["text"] for x in other["citations"] if x["row_id"] == str(row))
    assert not other["cache"]["hit"] or other["answer"] == fresh["answer"]

    topics = ["copper kettles", "glacier hiking", "tax forms", "violin strings"]
    for n, topic in enumerate(topics):  # more distinct questions than cache.max_entries, half through each
        assert ask((a, b)[n % 2], f"How do I care for {topic}?")["cache"]["hit"] is False
    node = f"http://127.0.0.1:{c.port('qdrant', 1)}"
    cache = f"{c.settings.index.collection}-cache"
    count = httpx.post(f"{node}/collections/{cache}/points/count", json={"exact": True}, timeout=10).json()
    assert count["result"]["count"] <= c.settings.cache.max_entries


def test_a_supervised_cluster_restarts_what_dies_and_loses_nothing(cluster: Cluster) -> None:
    """`up --cluster --supervise`: an embedder, a retriever and a broker SIGKILLed under load are each started
    again by the supervisor alone (new pids, restart times printed), search keeps answering through the other
    retriever, and nothing is lost."""
    c = cluster
    for i in (0, 1):
        c.start_embedder(i)  # the rebuild test left one of them dead
    load = WriteLoad(c.settings.postgres.dsn(), rate=RATE, seed=5, first_id=400_000)
    load.start()
    probe = SearchProbe(c.retriever_urls()[:1]).start()
    supervisor = Supervisor(c, interval_s=0.5)  # watches what runs now
    assert {"embedder-0", "embedder-1", "retriever-1", "kafka-2", "qdrant-0"} <= set(supervisor.watched)
    victims = ["embedder-0", "retriever-1", "kafka-2"]
    before = {name: c.daemon(name).pid() for name in victims}
    time.sleep(3)
    for name in victims:
        kill(c, name)  # each seen dead before the supervisor runs: it alone starts them again
    stop = threading.Event()
    watcher = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    watcher.start()
    try:

        def restarted() -> bool:
            return all(c.daemon(n).pid() not in (None, before[n]) for n in victims)

        wait_until(restarted, "the supervisor to start every killed process again", 300)
        time.sleep(STEP_S)
    finally:
        stop.set()
        watcher.join(timeout=30)
        probe.stop()
    exact(c, load)
    took = {r.name: round(r.took_s, 1) for r in supervisor.restarts if r.ok}
    print({"restarted_in_s": took, "failed_starts": [r.error for r in supervisor.restarts if not r.ok]})
    assert set(took) == set(victims)  # each started once, by the supervisor, and nothing else was
    assert probe.answered > 0 and probe.failures == []
    # The broker first (they need it); then the embedder and the retriever side by side: each began before the
    # other had finished.
    ok = {r.name: r for r in supervisor.restarts if r.ok}
    embedder, retriever, broker = ok["embedder-0"], ok["retriever-1"], ok["kafka-2"]
    assert broker.found_at + broker.took_s <= min(embedder.found_at, retriever.found_at)
    assert embedder.found_at < retriever.found_at + retriever.took_s
    assert retriever.found_at < embedder.found_at + embedder.took_s
