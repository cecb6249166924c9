"""One contract suite, every VectorIndex: the embedded Qdrant engine, qdrant-client in local mode and against a real
Qdrant server (skipped, loudly, where the binary was never built), and the double.

Like qdrant-client's congruence tests: the same assertions against each backend.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from qdrant_client import QdrantClient

from ragtide.contracts.chunks import point_id
from ragtide.contracts.errors import ClientError
from ragtide.embedder.index.base import IndexPoint, Range, VectorIndex
from ragtide.embedder.index.edge import EdgeIndex
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.index.remote import QdrantClientIndex
from ragtide.stack.process import Daemon, free_port
from ragtide.stack.qdrant import QDRANT_VERSION, QdrantServer, qdrant_binary

DIM = 8


def vec(*hot: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    for h in hot:
        v[h] = 1.0
    return v / np.linalg.norm(v)


def point(row: str, n: int, v: np.ndarray, table: str = "public.docs", tenant: str = "", **meta: object) -> IndexPoint:
    return IndexPoint(
        point_id(table, row, n),
        v,
        {
            "table": table,
            "row_key": f"{table}:{row}",
            "row_id": row,
            "chunk_no": n,
            "text": f"{row}-{n}",
            "tenant": tenant,
            "metadata": dict(meta),
            "hash": "h",
            "lsn": 1,
        },
    )


@pytest.fixture(scope="module")
def qdrant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QdrantServer]:
    """A real Qdrant server (built from source by infra/scripts/build-qdrant.sh), one for the module."""
    if qdrant_binary() is None:
        pytest.skip(f"no Qdrant {QDRANT_VERSION} binary: build it once with `make qdrant`")
    root = tmp_path_factory.mktemp("qdrant-server")
    server = QdrantServer(Daemon("qdrant", root / "run", root / "logs"), root, free_port(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.daemon.stop(timeout=30)


@pytest.fixture(params=["edge", "qdrant-client", "qdrant-server", "memory"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    idx: VectorIndex
    if request.param == "edge":
        idx = EdgeIndex(tmp_path / "qdrant", "contract")
    elif request.param == "qdrant-client":
        idx = QdrantClientIndex(QdrantClient(location=":memory:"), "contract")
    elif request.param == "qdrant-server":
        server = request.getfixturevalue("qdrant_server")
        idx = QdrantClientIndex(QdrantClient(url=server.url, timeout=10), f"contract-{uuid.uuid4().hex[:12]}")
    else:
        idx = MemoryIndex()
    idx.ensure_collection(DIM)
    yield idx
    idx.close()


def seed_points() -> list[IndexPoint]:
    return [
        point("1", 0, vec(0), category="a"),
        point("1", 1, vec(0, 1), category="a"),
        point("2", 0, vec(2), category="b", tenant="t1"),
        point("3", 0, vec(3), table="public.other", category="a"),
    ]


def seed(index: VectorIndex) -> None:
    index.upsert(seed_points())


def test_upsert_is_idempotent_by_id(index: VectorIndex) -> None:
    seed(index)
    seed(index)
    assert index.count() == 4
    assert isinstance(index, VectorIndex)


def test_search_ranks_by_cosine_and_filters(index: VectorIndex) -> None:
    seed(index)
    hits = index.search(vec(0), 2)
    assert [h.payload["text"] for h in hits] == ["1-0", "1-1"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].id == point_id("public.docs", "1", 0)
    assert [h.payload["text"] for h in index.search(vec(0), 5, {"metadata.category": "b"})] == ["2-0"]
    assert {h.payload["row_id"] for h in index.search(vec(0), 5, {"table": ["public.other"]})} == {"3"}
    assert [h.payload["text"] for h in index.search(vec(0), 5, {"tenant": "t1"})] == ["2-0"]
    assert index.search(vec(0), 5, {"tenant": "nobody"}) == []


def test_a_tenant_scope_is_its_rows_plus_the_shared_ones(index: VectorIndex) -> None:
    """The gateway's filter: tenant in [caller, ''] ('' = a table without a tenant column)."""
    seed(index)
    index.upsert([point("4", 0, vec(2), category="b", tenant="t2")])
    scoped = {h.payload["row_id"] for h in index.search(vec(2), 10, {"tenant": ["t1", ""]})}
    assert scoped == {"1", "2", "3"}
    assert index.count({"tenant": ["t2", ""], "table": ["public.docs"]}) == 3


def test_set_payload_keeps_vector(index: VectorIndex) -> None:
    seed(index)
    pid = point_id("public.docs", "2", 0)
    index.set_payload([pid], {"metadata": {"category": "z"}, "lsn": 9})
    [hit] = index.search(vec(2), 1)
    assert hit.id == pid and hit.score == pytest.approx(1.0, abs=1e-5)
    assert hit.payload["metadata"] == {"category": "z"} and hit.payload["lsn"] == 9 and hit.payload["text"] == "2-0"


def test_delete_by_id_and_by_filter(index: VectorIndex) -> None:
    seed(index)
    index.delete([point_id("public.docs", "2", 0)])
    assert index.count() == 3
    index.delete_where({"row_key": ["public.docs:1"]})
    assert index.count({"table": "public.docs"}) == 0
    index.delete_where({"table": "public.other"})
    assert index.count() == 0
    with pytest.raises(ValueError, match="empty filter"):
        index.delete_where({})


def test_scroll_and_count_by_row(index: VectorIndex) -> None:
    seed(index)
    rows = index.scroll({"row_key": ["public.docs:1", "public.docs:2"]})
    assert sorted(p.payload["text"] for p in rows) == ["1-0", "1-1", "2-0"]
    assert index.count({"row_key": "public.docs:1"}) == 2
    assert index.count({"table": "public.docs", "chunk_no": 0}) == 2
    assert len(index.scroll(limit=2)) == 2


def test_a_range_selects_by_number_and_combines_with_the_other_conditions(index: VectorIndex) -> None:
    """What a truncate deletes: its table's points written from before its WAL position (LSN-sized numbers)."""
    base = 0x1_6B4F_2A10  # a WAL position ~6 GB in
    pts = [point(str(i), 0, vec(i % DIM)) for i in range(6)] + [point("9", 0, vec(1), table="public.other")]
    index.upsert(pts)
    for i in range(6):
        index.set_payload([point_id("public.docs", str(i), 0)], {"lsn": base + i})
    index.set_payload([point_id("public.other", "9", 0)], {"lsn": base})
    older = {"table": "public.docs", "lsn": Range(lt=base + 3)}
    assert sorted(p.payload["row_id"] for p in index.scroll(older)) == ["0", "1", "2"]
    assert index.count({"lsn": Range(gte=base + 2, lt=base + 4)}) == 2
    assert index.count({"lsn": Range(gte=base + 5)}) == 1
    nearest = index.search(vec(4), 3, {"lsn": Range(gte=base + 4)})
    assert [h.payload["row_id"] for h in nearest][:1] == ["4"] and len(nearest) == 2
    index.delete_where(older)
    assert sorted(p.payload["row_id"] for p in index.scroll({"table": "public.docs"})) == ["3", "4", "5"]
    assert index.count({"table": "public.other"}) == 1  # the other table, at an older position, is untouched
    with pytest.raises(ValueError, match="at least one bound"):
        Range()


def test_invalid_filter_is_rejected(index: VectorIndex) -> None:
    with pytest.raises(ClientError, match="filter value"):
        index.count({"metadata.category": {"nested": 1}})  # type: ignore[dict-item]


def test_concurrent_reads_and_writes(index: VectorIndex) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(50):
                index.upsert([point(str(i), 0, vec(i % DIM))])
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                index.search(vec(1), 3)
                index.count()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and index.count() == 50


def test_edge_index_persists_across_reopen(tmp_path: Path) -> None:
    idx = EdgeIndex(tmp_path, "persist")
    idx.ensure_collection(DIM)
    seed(idx)
    idx.close()
    again = EdgeIndex(tmp_path, "persist")
    again.ensure_collection(DIM)
    assert again.count() == 4 and again.search(vec(2), 1)[0].payload["text"] == "2-0"
    again.close()


def test_optimize_reports_and_search_still_answers(index: VectorIndex) -> None:
    seed(index)
    report = index.optimize()
    assert report["points"] == 4 and isinstance(report["optimized"], bool)
    assert [h.payload["text"] for h in index.search(vec(0), 1)] == ["1-0"]


def test_optimize_builds_hnsw_on_a_corpus_past_the_indexing_threshold(tmp_path: Path) -> None:
    """qdrant indexes a segment once it holds ~10 MB of vectors: 8,000 of dimension 384 pass that, and after
    optimize the engine reports them indexed (before it, none are)."""
    idx = EdgeIndex(tmp_path, "hnsw")
    idx.ensure_collection(384)
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((8_000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for start in range(0, len(vectors), 1_000):
        idx.upsert(
            [
                IndexPoint(point_id("t", str(i), 0), vectors[i], {"row_key": f"t:{i}", "table": "t"})
                for i in range(start, start + 1_000)
            ]
        )
    assert idx.shard.info()["indexed_vectors_count"] == 0  # plain segments until asked
    report = idx.optimize()
    assert report["points"] == 8_000 and report["indexed_vectors"] > 0, report
    assert idx.search(vectors[123], 1)[0].payload["row_key"] == "t:123"
    idx.close()


@pytest.mark.parametrize("backend", ["edge", "qdrant-server"])
def test_a_lowered_indexing_threshold_builds_hnsw_on_a_small_index(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """index.indexing_threshold_kb: 300 vectors of 384 floats (~450 KB) stay a scanned segment under the default,
    and get a graph past a threshold of 100 KB (set on the collection; a server builds it in the background)."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((300, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    points = [
        IndexPoint(point_id("t", str(i), 0), v, {"row_key": f"t:{i}", "table": "t"}) for i, v in enumerate(vectors)
    ]

    def indexed(threshold: int | None) -> int:
        if backend == "edge":
            edge = EdgeIndex(tmp_path / str(threshold), "small", indexing_threshold_kb=threshold)
            edge.ensure_collection(384)
            edge.upsert(points)
            try:
                return int(edge.optimize()["indexed_vectors"])
            finally:
                edge.close()
        server = request.getfixturevalue("qdrant_server")
        client = QdrantClient(url=server.url, timeout=10)
        name = f"small-{uuid.uuid4().hex[:12]}"
        remote = QdrantClientIndex(client, name, indexing_threshold_kb=threshold)
        remote.ensure_collection(384)
        remote.upsert(points)
        if threshold is not None:
            assert client.get_collection(name).config.optimizer_config.indexing_threshold == threshold
        deadline = time.monotonic() + (30 if threshold else 3)
        count = 0
        while time.monotonic() < deadline and not count:
            count = client.get_collection(name).indexed_vectors_count or 0
            time.sleep(0.2)
        client.delete_collection(name)
        return count

    assert indexed(None) == 0
    assert indexed(100) > 0


def test_a_shard_written_by_the_qdrant_edge_py_wheel_opens_here_and_back(tmp_path: Path) -> None:
    """Our binding (native/ragtide-edge) and the upstream wheel run the same qdrant-edge 0.9.0 engine: an index
    written before the switch opens with every point, payload, filter and ranking, and the wheel reads ours."""
    import qdrant_edge as qe

    shard = qe.EdgeShard.create(
        str(tmp_path / "old"), qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine))
    )
    shard.update(qe.UpdateOperation.create_field_index("table", qe.PayloadSchemaType.Keyword))
    written = seed_points()
    shard.update(
        qe.UpdateOperation.upsert_points([qe.Point(p.id, p.vector.tolist(), dict(p.payload)) for p in written])
    )
    shard.flush()
    shard.close()

    ours = EdgeIndex(tmp_path, "old")
    ours.ensure_collection(DIM)  # adds the indexes the old shard lacks
    assert {p.id: p.payload for p in ours.scroll()} == {p.id: p.payload for p in written}
    assert [h.payload["text"] for h in ours.search(vec(0), 2)] == ["1-0", "1-1"]
    assert [h.payload["text"] for h in ours.search(vec(0), 5, {"metadata.category": "b"})] == ["2-0"]
    assert ours.count({"table": "public.other"}) == 1
    ours.upsert([point("5", 0, vec(4), category="c")])
    ours.close()

    back = qe.EdgeShard.load(str(tmp_path / "old"))
    assert back.count(qe.CountRequest(exact=True)) == 5
    assert set(back.info().payload_schema) == {"table", "row_key", "chunk_no", "tenant"}
    back.close()


def test_an_upsert_leaves_the_gil_to_other_threads(tmp_path: Path) -> None:
    """The engine parses and writes a batch with the GIL released: a Python thread spinning beside one large
    upsert call keeps a good part of its solo rate. (The qdrant-edge-py wheel's `update` held the GIL for the whole
    call: the same spinner beside it got 0-2% of its solo rate.)"""
    idx = EdgeIndex(tmp_path, "gil")
    idx.ensure_collection(384)
    rng = np.random.default_rng(3)
    n = 20_000
    ids = [point_id("t", str(i), 0) for i in range(n)]
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    payloads = orjson.dumps([{"row_key": f"t:{i}", "table": "t", "text": "x" * 200} for i in range(n)])
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    def rate(call: Callable[[], object]) -> float:
        before, t0 = ticks[0], time.perf_counter()
        call()
        return (ticks[0] - before) / (time.perf_counter() - t0)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        solo = rate(lambda: time.sleep(0.5))
        during = rate(lambda: idx.shard.upsert(ids, vectors, payloads))
    finally:
        stop.set()
        spinner.join()
    assert idx.count() == n
    idx.close()
    assert during > 0.2 * solo, f"spinner ran at {during / solo:.1%} of its solo rate during the upsert"


def test_payload_values_come_back_exactly(index: VectorIndex) -> None:
    """Floats to the last bit, integers at the 64-bit edges, unicode, nesting, booleans and nulls: `verify`
    compares stored metadata with the source exactly, so any change here would be drift."""
    rng = np.random.default_rng(11)
    floats = [float(x) for x in rng.standard_normal(50)] + [1e-300, 1.7976931348623157e308, 0.1, -0.0]
    meta = {"floats": floats, "big": 2**63 - 1, "small": -(2**63), "text": 'naïve ☃ "q" \\ \n', "flag": True}
    meta["nested"] = {"none": None, "list": [1, "two", 3.5]}
    p = point("9", 0, vec(5), **meta)
    index.upsert([p])
    (stored,) = index.scroll({"row_id": "9"})
    assert stored.payload == dict(p.payload)
    assert [h.payload for h in index.search(vec(5), 1)] == [dict(p.payload)]


def test_edge_stores_a_decimal_as_a_float_and_refuses_what_json_cannot_hold(tmp_path: Path) -> None:
    from decimal import Decimal

    idx = EdgeIndex(tmp_path, "types")
    idx.ensure_collection(DIM)
    idx.upsert([point("1", 0, vec(0), price=Decimal("12.50"))])
    assert idx.scroll()[0].payload["metadata"] == {"price": 12.5}
    with pytest.raises(TypeError, match="cannot be stored"):
        idx.upsert([point("2", 0, vec(1), when=object())])
    idx.close()


def test_edge_close_waits_for_a_call_in_flight(tmp_path: Path) -> None:
    """The engine runs with the GIL released, so a call can still be running on another thread when the index is
    closed (or dropped, which deletes its folder): close returns only after it. A read is the case to prove: a write
    holds the engine's log lock, which close's flush waits for anyway, but a read takes no such lock. (A read that
    had not reached the engine when close ran is refused as closed: that try says nothing, and is made again.)"""
    n = 300_000
    ids = [point_id("t", str(i), 0) for i in range(n)]
    vectors = np.random.default_rng(2).standard_normal((n, DIM)).astype(np.float32)
    payloads = orjson.dumps([{"row_key": f"t:{i}", "table": "t", "text": "x" * 100} for i in range(n)])
    for attempt in range(5):
        idx = EdgeIndex(tmp_path, f"closing-{attempt}")
        idx.ensure_collection(DIM)
        idx.shard.upsert(ids, vectors, payloads)
        idx.shard.flush()  # close's own flushes then have nothing to write: a close that does not wait is quick
        read: list[int] = []
        done: list[float] = []
        refused: list[str] = []

        def scroll(
            shard: Any = idx.shard, read: list[int] = read, done: list[float] = done, refused: list[str] = refused
        ) -> None:
            try:
                read.append(len(shard.scroll(None, None, n)[0]))  # all of them in one call: about a second
                done.append(time.perf_counter())
            except RuntimeError as exc:
                if "is closed" not in str(exc):
                    raise
                refused.append(str(exc))

        reader = threading.Thread(target=scroll)
        reader.start()
        time.sleep(0.05)  # by now the read is in the engine (else: refused, and tried again)
        started = time.perf_counter()
        idx.close()
        closing = time.perf_counter() - started
        reader.join()
        if refused:
            continue
        assert read == [n]
        # Waiting, close lasts as long as the read's remaining engine work (and the reader's handing its result to
        # Python, which holds the GIL close needs to return); not waiting, it takes only its own flush and release
        # (0.15-0.25 s here once the upsert was flushed above) while the read goes on for about a second. (Whether
        # the reader thread was still alive when close returned is no test: past the engine it may still be
        # converting its result, or be waiting for the GIL to finish.)
        print(f"close took {closing:.2f} s; the read went on {done[0] - started:.2f} s after close began")
        assert closing >= 0.5 * (done[0] - started), "close returned while a read was still in flight"
        return
    pytest.fail("the read never reached the engine before close in 5 tries")
