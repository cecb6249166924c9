"""Replaying the source topics from offset zero leaves the index exactly as it was (same ids, same payloads)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from ragtide.embedder.worker import EMBEDDER_GROUP
from tests.e2e.conftest import LiveStack, live_index, poll

VOLATILE = {"indexed_at_ms"}  # when a point was (re)written: the only field a replay may change


def index_state(live: LiveStack) -> dict[str, dict[str, Any]]:
    idx = live_index(live.settings)
    try:
        return {
            p.id: {k: v for k, v in p.payload.items() if k not in VOLATILE}
            for p in idx.scroll({"table": "public.docs"}, limit=1_000_000)
        }
    finally:
        idx.close()


async def rewind(bootstrap: str, topic: str, timeout_s: float) -> int:
    """Commit offset 0 for the embedder's group on every partition of `topic`; returns the end offset. The stopped
    node was a static member (group.instance.id), which does not leave the group: Kafka takes a commit from outside
    the group only once that member's session has expired and the group is empty."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=EMBEDDER_GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
        consumer.assign(parts)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await consumer.commit(dict.fromkeys(parts, 0))
                break
            except KafkaError:  # CommitFailedError (unknown member) until the group is empty
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


def test_replay_from_zero_rebuilds_an_identical_index(live: LiveStack) -> None:
    s = live.settings
    topic = f"{s.connect.topic_prefix}.public.docs"
    node = live.stack.daemon("node")
    assert node.stop(timeout=60)
    try:
        before = index_state(live)
        end = asyncio.run(rewind(s.kafka.bootstrap, topic, s.kafka.session_timeout_s + 30))
    finally:
        live.stack.start_node()
    # the topic really holds the history: at least one record per indexed row (snapshot + later changes)
    assert end >= len({v["row_id"] for v in before.values()}) > 400

    def caught_up() -> bool:
        try:
            return (
                live.metric("ragtide_consumer_lag_records", topic=topic) == 0
                and live.metric("ragtide_events_total", table="public.docs") > 0
            )
        except KeyError:  # no batch of the replay applied yet: the series do not exist
            return False

    poll(caught_up, "the replay to reach the end of the topic", timeout=600)
    rows = len({v["row_id"] for v in before.values()})
    assert live.metric("ragtide_events_total", table="public.docs") >= rows  # the history really was re-read
    # ...and cost (almost) no embeddings: unchanged chunks are recognised by their fingerprints
    assert live.metric("ragtide_chunks_skipped_total", table="public.docs") >= len(before) * 0.9
    live.stack.wait_ready()
    assert node.stop(timeout=60)
    try:
        after = index_state(live)
    finally:
        live.stack.start_node()
        live.stack.wait_ready()
    assert after.keys() == before.keys()
    changed = {
        pid: {
            k: (before[pid].get(k), after[pid].get(k))
            for k in before[pid].keys() | after[pid].keys()
            if before[pid].get(k) != after[pid].get(k)
        }
        for pid in before
        if after[pid] != before[pid]
    }
    assert not changed, f"{len(changed)} points changed, e.g. {list(changed.items())[:3]}"
