"""A full disk under the embedded index is an outage that shows, not a silent retry and not a crash: on a
size-limited tmpfs, writes stop, /healthz says why ('degraded', disk full), nothing is acknowledged, and writing
resumes by itself once space is freed. The real Qdrant engine (qdrant-edge); the worker's batch processor."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.embedder.index.edge import EdgeIndex
from ragtide.embedder.liveness import Watchdog, health_app, serve_health
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.worker import BatchProcessor
from ragtide.embedder.writer import IndexWriter
from ragtide.ingest.sources import SourcesConfig
from ragtide.stack.process import free_port
from tests.doubles import HashEncoder, word_chunker

SOURCES = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})
RESERVE = 32 << 20


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB tmpfs (mounting needs root: CI and the developers' machines run as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = tmp_path / "volume"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def rows(first: int, n: int) -> list[ChangeEvent]:
    return [
        ChangeEvent(
            "public.docs", Op.CREATE, {"id": i}, {"id": i, "body": f"row {i} of the disk test"}, SourcePosition(i, 1)
        )
        for i in range(first, first + n)
    ]


def fill(volume: Path, leave_bytes: int) -> Path:
    """A file that takes all the free space but `leave_bytes`."""
    filler = volume / "filler"
    size = shutil.disk_usage(volume).free - leave_bytes
    with open(filler, "wb") as f:
        for _ in range(size >> 20):
            f.write(b"\0" * (1 << 20))
    return filler


def test_a_full_disk_stops_writes_says_why_and_resumes_when_space_is_freed(small_volume: Path) -> None:
    index = EdgeIndex(small_volume, "docs", min_free_bytes=RESERVE)
    encoder = HashEncoder()
    index.ensure_collection(encoder.dim)
    registry = CollectorRegistry()
    proc = BatchProcessor(IndexWriter(index, encoder, word_chunker(), SOURCES), EmbedderMetrics(registry), "ragtide")
    proc.base_delay_s = 0.05
    dog = Watchdog(stall_s=60, degraded_s=0.5)
    dog.outage = proc.outage
    port = free_port()
    server = serve_health(health_app(registry, dog), "127.0.0.1", port)

    async def scenario() -> None:
        assert await proc.apply(rows(1, 10)) == []
        filler = fill(small_volume, leave_bytes=RESERVE // 2)
        batch = asyncio.create_task(proc.apply(rows(11, 10)))
        for _ in range(200):  # until the outage has lasted past degraded_s
            await asyncio.sleep(0.05)
            if dog.verdict().degraded:
                break
        health = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/healthz")
        body = json.loads(health.text)
        assert health.status_code == 200 and body["status"] == "degraded"  # up, not restarted: it would not help
        assert "disk full" in body["reason"] and "index.min_free_mb" in body["reason"]
        assert not batch.done() and index.count({"chunk_no": 0}) == 10  # nothing written, nothing acknowledged
        outage = registry.get_sample_value("ragtide_store_outage_seconds")
        assert outage is not None and outage > 0.5

        filler.unlink()  # space freed: the retry goes through with no restart
        assert await asyncio.wait_for(batch, timeout=30) == []

    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()
    assert index.count({"chunk_no": 0}) == 20
    assert registry.get_sample_value("ragtide_store_outage_seconds") == 0
    assert dog.verdict().status != "degraded"
    retries = registry.get_sample_value("ragtide_store_retries_total")
    assert retries is not None and retries > 1
    index.close()
