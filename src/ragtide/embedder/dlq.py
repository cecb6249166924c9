"""The dead-letter topic: list what was dead-lettered and why, and replay records to their source topic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ragtide.contracts.settings import KafkaSettings

REPLAY_GROUP = "ragtide-dlq-replay"


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered record."""

    offset: int
    timestamp_ms: int
    reason: str
    topic: str
    partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None


def _letter(msg: Any) -> DeadLetter:
    headers = {k: v.decode(errors="replace") for k, v in msg.headers or ()}
    return DeadLetter(
        offset=msg.offset,
        timestamp_ms=msg.timestamp,
        reason=headers.get("ragtide.reason", "?"),
        topic=headers.get("ragtide.topic", ""),
        partition=int(headers.get("ragtide.partition", "-1")),
        source_offset=int(headers.get("ragtide.offset", "-1")),
        key=msg.key,
        value=msg.value,
    )


async def _drain(consumer: AIOKafkaConsumer, tp: TopicPartition, limit: int) -> list[DeadLetter]:
    end = (await consumer.end_offsets([tp]))[tp]
    out: list[DeadLetter] = []
    while await consumer.position(tp) < end and len(out) < limit:
        batch = await consumer.getmany(tp, timeout_ms=2000, max_records=min(500, limit - len(out)))
        msgs = batch.get(tp, [])
        if not msgs:
            break
        out.extend(_letter(m) for m in msgs)
    return out


async def list_dead_letters(kafka: KafkaSettings, topic: str, limit: int = 100) -> list[DeadLetter]:
    """Every dead-lettered record, oldest first (up to `limit`)."""
    consumer = AIOKafkaConsumer(**kafka.client_config(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        if topic not in await consumer.topics():
            return []
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        return await _drain(consumer, tp, limit)
    finally:
        await consumer.stop()


async def replay_dead_letters(kafka: KafkaSettings, topic: str, limit: int = 10_000) -> list[DeadLetter]:
    """Send records not replayed before back to their source topic; remembers progress in a consumer group."""
    consumer = AIOKafkaConsumer(
        **kafka.client_config(), group_id=REPLAY_GROUP, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(**kafka.client_config(), linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        tp = TopicPartition(topic, 0)
        if topic not in await consumer.topics():
            return []
        consumer.assign([tp])
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
        letters = await _drain(consumer, tp, limit)
        for d in letters:
            if not d.topic:
                continue
            await producer.send_and_wait(
                d.topic,
                key=d.key,
                value=d.value,
                partition=max(d.partition, 0),
                headers=[("ragtide.replayed-from", str(d.offset).encode())],
            )
        if letters:
            await consumer.commit({tp: letters[-1].offset + 1})
        return letters
    finally:
        await producer.stop()
        await consumer.stop()
