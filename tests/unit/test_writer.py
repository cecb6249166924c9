"""The index writer against the in-memory index: exactly the writes each change needs, and no more embeddings."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from typing import Any

import pytest

from ragtide.contracts.chunks import point_id
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.embedder.chunking import Piece
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.writer import ApplyStats, IndexWriter, coalesce
from ragtide.ingest.sources import UNAVAILABLE, SourcesConfig
from tests.doubles import HashEncoder, MemoryTruncateLog, WhitespaceTokenizer, word_chunker

SOURCES = SourcesConfig.model_validate(
    {"sources": [{"table": "public.docs", "key": ["id"], "text": "{title} {body}", "metadata": ["category"]}]}
)


class Feed:
    """Builds events with increasing LSNs, like one Postgres WAL."""

    def __init__(self) -> None:
        self.lsn = 1000

    def ev(
        self, op: Op, id_: Any, title: str = "", body: str | None = "", category: str = "a", **kw: Any
    ) -> ChangeEvent:
        self.lsn += 10
        row = (
            None if op in (Op.DELETE, Op.TRUNCATE) else {"id": id_, "title": title, "body": body, "category": category}
        )
        key = {} if op is Op.TRUNCATE else {"id": id_}
        return ChangeEvent("public.docs", op, key, row, SourcePosition(self.lsn, self.lsn * 10), **kw)


@pytest.fixture
def env() -> tuple[IndexWriter, MemoryIndex, HashEncoder, Feed]:
    index, encoder = MemoryIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    return IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, clock=lambda: 1234.5), index, encoder, Feed()


def texts_of(index: MemoryIndex, row: str) -> list[str]:
    pts = sorted(index.scroll({"row_key": f"public.docs:{row}"}), key=lambda p: p.payload["chunk_no"])
    return [p.payload["text"] for p in pts]


LONG = " ".join(f"word{i}" for i in range(20))
N_LONG = len(word_chunker(8, 2)("Title " + LONG))  # chunks of "Title LONG": windows of 8 tokens, overlap 2


def test_insert_writes_chunks_with_deterministic_ids_and_payload(env: Any) -> None:
    writer, index, _encoder, feed = env
    stats = writer.apply([feed.ev(Op.CREATE, 1, "Title", LONG)])
    assert N_LONG > 2
    assert stats.embedded == index.count() == N_LONG
    ids = {p.id for p in index.scroll()}
    assert ids == {point_id("public.docs", "1", n) for n in range(N_LONG)}
    p = index.scroll({"row_key": "public.docs:1", "chunk_no": 0})[0].payload
    assert p["metadata"] == {"category": "a"} and p["chunk_count"] == N_LONG and p["indexed_at_ms"] == 1234500
    assert p["lsn"] == feed.lsn and p["key"] == {"id": 1}


def test_metadata_only_update_embeds_nothing(env: Any) -> None:
    writer, index, encoder, feed = env
    writer.apply([feed.ev(Op.CREATE, 1, "Title", LONG)])
    before = encoder.encoded
    stats = writer.apply([feed.ev(Op.UPDATE, 1, "Title", LONG, category="b")])
    assert encoder.encoded == before and stats.embedded == 0 and stats.skipped == N_LONG
    assert index.count({"metadata.category": "b"}) == N_LONG
    assert index.count({"metadata.category": "a"}) == 0


def test_text_edit_reembeds_only_changed_chunks_and_drops_surplus(env: Any) -> None:
    writer, index, _encoder, feed = env
    writer.apply([feed.ev(Op.CREATE, 1, "Title", LONG)])
    # change only the last words: chunk 0 unchanged
    edited = " ".join(f"word{i}" for i in range(15)) + " changed tail here now ok"
    stats = writer.apply([feed.ev(Op.UPDATE, 1, "Title", edited)])
    assert stats.skipped >= 1 and stats.embedded == N_LONG - stats.skipped
    assert " ".join(texts_of(index, "1")).endswith("now ok")
    # shrink to one chunk: surplus chunks deleted
    stats = writer.apply([feed.ev(Op.UPDATE, 1, "Short", "text")])
    assert texts_of(index, "1") == ["Short text"]
    assert stats.deleted_points == N_LONG - 1


def test_delete_and_empty_text_remove_every_chunk(env: Any) -> None:
    writer, index, _, feed = env
    writer.apply([feed.ev(Op.CREATE, 1, "A", LONG), feed.ev(Op.CREATE, 2, "B", "b")])
    writer.apply([feed.ev(Op.DELETE, 1)])
    assert texts_of(index, "1") == [] and texts_of(index, "2") == ["B b"]
    writer.apply([feed.ev(Op.UPDATE, 2, "", None)])
    assert index.count() == 0


def test_truncate_clears_the_table_in_order(env: Any) -> None:
    writer, index, _, feed = env
    batch = [feed.ev(Op.CREATE, 1, "A", "a"), feed.ev(Op.TRUNCATE, None), feed.ev(Op.CREATE, 2, "B", "b")]
    writer.apply(batch)
    assert texts_of(index, "1") == [] and texts_of(index, "2") == ["B b"]


def on_partition(ev: ChangeEvent, partition: int) -> ChangeEvent:
    return dataclasses.replace(ev, partition=partition, offset=ev.position.lsn)


def rows_of(index: MemoryIndex) -> set[str]:
    return {p.payload["row_id"] for p in index.scroll()}


def test_a_truncate_keeps_rows_committed_after_it_and_refuses_rows_from_before_it_that_arrive_late(env: Any) -> None:
    """Three partitions: a TRUNCATE (no key) lands on one; the rows around it on the others, delivered in
    partition order as Kafka fetches them, not in commit order."""
    writer, index, _, feed = env
    c1, c2 = on_partition(feed.ev(Op.CREATE, 1, "A", "a"), 1), on_partition(feed.ev(Op.CREATE, 2, "B", "b"), 2)
    truncate = on_partition(feed.ev(Op.TRUNCATE, None), 0)
    c7, c8 = on_partition(feed.ev(Op.CREATE, 7, "G", "g"), 1), on_partition(feed.ev(Op.CREATE, 8, "H", "h"), 2)
    writer.apply([c1, c7])  # partition 1 first: a row from before the truncate and one from after it
    stats = writer.apply([truncate])
    assert rows_of(index) == {"7"} and stats.deleted_points == 1  # row 7 was committed after the truncate
    stats = writer.apply([c2, c8])  # partition 2 last: its pre-truncate row must not come back
    assert rows_of(index) == {"7", "8"} and stats.stale == 1

    # The same, all in one batch (one fetch over the three partitions).
    index2, encoder2 = MemoryIndex(), HashEncoder()
    index2.ensure_collection(encoder2.dim)
    IndexWriter(index2, encoder2, word_chunker(8, 2), SOURCES).apply([c1, c7, truncate, c2, c8])
    assert rows_of(index2) == {"7", "8"}


def test_workers_sharing_a_truncate_log_refuse_rows_from_before_a_truncate_another_one_applied(env: Any) -> None:
    _, index, encoder, feed = env
    log = MemoryTruncateLog()
    a, b = (IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, truncations=log) for _ in range(2))
    c1 = on_partition(feed.ev(Op.CREATE, 1, "A", "a"), 1)
    truncate = on_partition(feed.ev(Op.TRUNCATE, None), 0)
    c7 = on_partition(feed.ev(Op.CREATE, 7, "G", "g"), 1)
    a.apply([truncate])
    assert log.at == {"public.docs": truncate.position}
    stats = b.apply([c1, c7])  # b never saw the truncate itself
    assert stats.stale == 1 and rows_of(index) == {"7"}
    restarted = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, truncations=log)
    assert restarted.apply([c1]).stale == 1 and rows_of(index) == {"7"}
    assert a.apply([on_partition(feed.ev(Op.CREATE, 9, "I", "i"), 2)]).stale == 0  # newer rows still go in


class WriteHook(MemoryIndex):
    """Runs `hook` once, just before the first upsert is stored."""

    def __init__(self, hook: Any) -> None:
        super().__init__()
        self.hook = hook

    def upsert(self, points: Any) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        super().upsert(points)


def test_a_row_written_while_another_worker_truncates_is_deleted_before_the_batch_ends() -> None:
    """Worker b checked the log (nothing yet), then worker a recorded the truncate and deleted the older points,
    then b stored a row from before the truncate: b learns of it after writing and deletes that row itself."""
    feed, log, encoder = Feed(), MemoryTruncateLog(), HashEncoder()
    c1 = on_partition(feed.ev(Op.CREATE, 1, "A", "a"), 1)
    truncate = on_partition(feed.ev(Op.TRUNCATE, None), 0)
    index = WriteHook(lambda: a.apply([truncate]))
    index.ensure_collection(encoder.dim)
    a, b = (IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, truncations=log) for _ in range(2))
    stats = b.apply([c1])
    assert index.hook is None, "the truncate ran in the middle of b's batch"
    assert rows_of(index) == set() and stats.deleted_points == 1


def test_burst_on_one_row_is_coalesced_into_one_embedding_pass(env: Any) -> None:
    writer, index, encoder, feed = env
    burst = [feed.ev(Op.UPDATE, 1, "T", f"version {i}") for i in range(50)]
    writer.apply(burst)
    assert encoder.calls == [["T version 49"]]
    assert texts_of(index, "1") == ["T version 49"]


def test_coalesce_keeps_last_state_per_row_and_truncate_boundaries() -> None:
    feed = Feed()
    a1, b1, a2, t, a3 = (
        feed.ev(Op.UPDATE, 1, "x"),
        feed.ev(Op.UPDATE, 2, "y"),
        feed.ev(Op.UPDATE, 1, "z"),
        feed.ev(Op.TRUNCATE, None),
        feed.ev(Op.CREATE, 1, "w"),
    )
    assert coalesce([a1, b1, a2, t, a3]) == [[b1, a2], t, [a3]]


def test_replay_is_idempotent_and_older_events_never_win(env: Any) -> None:
    writer, index, encoder, feed = env
    history = [feed.ev(Op.CREATE, 1, "A", LONG), feed.ev(Op.UPDATE, 1, "A", "short"), feed.ev(Op.CREATE, 2, "B", "b")]
    for ev in history:
        writer.apply([ev])
    snapshot = {p.id: p.payload for p in index.scroll()}
    embedded = encoder.encoded
    for ev in history:  # redelivery of the whole history, one by one
        stats = writer.apply([ev])
    assert {p.id: p.payload for p in index.scroll()} == snapshot
    assert encoder.encoded == embedded  # the stale create was ignored, the rest was unchanged
    assert stats.skipped == 1
    stale = writer.apply([history[0]])
    assert stale.stale == 1 and texts_of(index, "1") == ["A short"]


def test_unavailable_toast_value_keeps_the_stored_text(env: Any) -> None:
    writer, index, encoder, feed = env
    writer.apply([feed.ev(Op.CREATE, 1, "Title", "a long toasted body")])
    before = encoder.encoded
    writer.apply([feed.ev(Op.UPDATE, 1, "Title", UNAVAILABLE, category="z")])
    assert texts_of(index, "1") == ["Title a long toasted body"]
    assert encoder.encoded == before
    assert index.count({"metadata.category": "z"}) == 1
    assert UNAVAILABLE not in str(index.scroll()[0].payload)


class ReversedScrollIndex(MemoryIndex):
    """Scrolls in reverse order: a real engine returns a row's points by point id, not by chunk number."""

    def scroll(self, flt: Any = None, limit: int = 10_000) -> list[Any]:
        return list(reversed(super().scroll(flt, limit)))


def test_the_text_columns_live_on_the_first_chunk_and_follow_an_edit_of_a_later_one() -> None:
    """The text columns' values (for Debezium's unchanged-TOAST placeholder) are stored on chunk 0 only. An edit
    that changes only a later chunk leaves chunk 0's text alone but must still refresh its columns: a later update
    with the body TOASTed and unchanged then renders the edited body, not the one before it."""
    index, encoder = ReversedScrollIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    writer, feed = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES), Feed()
    writer.apply([feed.ev(Op.CREATE, 1, "Title", LONG)])
    by_chunk = {p.payload["chunk_no"]: p.payload for p in index.scroll()}
    assert by_chunk[0]["columns"] == {"title": "Title", "body": LONG}
    assert all("columns" not in by_chunk[n] for n in range(1, N_LONG))
    edited = LONG.replace("word19", "edited")
    stats = writer.apply([feed.ev(Op.UPDATE, 1, "Title", edited)])
    assert stats.embedded == 1 and stats.skipped == N_LONG - 1  # only the last chunk changed
    before, after = encoder.encoded, texts_of(index, "1")
    stats = writer.apply([feed.ev(Op.UPDATE, 1, "Title", UNAVAILABLE, category="z")])
    assert texts_of(index, "1") == after and "edited" in after[-1]
    assert encoder.encoded == before and stats.skipped == N_LONG
    assert index.count({"metadata.category": "z"}) == N_LONG


def test_a_row_written_before_columns_moved_to_chunk_0_fills_a_toasted_column_from_chunk_0() -> None:
    """Points written by an earlier version carry the text columns on every chunk; after an edit, the later
    chunks' copies may be stale (payload updates merge). The placeholder is filled from chunk 0, whatever order the
    engine scrolls in."""
    index, encoder = ReversedScrollIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    writer, feed = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES), Feed()
    writer.apply([feed.ev(Op.CREATE, 1, "Title", LONG)])
    # as an earlier version left it: columns on every chunk, the later ones stale
    for p in index.scroll():
        stale = {"title": "Title", "body": "an older body"}
        index.set_payload([p.id], {"columns": p.payload.get("columns") or stale})
    before = encoder.encoded
    writer.apply([feed.ev(Op.UPDATE, 1, "Title", UNAVAILABLE, category="z")])
    assert encoder.encoded == before and " ".join(texts_of(index, "1")).count("older") == 0
    assert index.count({"metadata.category": "z"}) == N_LONG


def test_a_pipelined_batch_whose_chunking_fails_writes_nothing_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice's chunking that raises fails the batch: its slices after it are never written, and apply raises."""
    from ragtide.embedder import writer as writer_module

    monkeypatch.setattr(writer_module, "PIPELINE_ROWS", 16)
    index, encoder, feed = MemoryIndex(), HashEncoder(), Feed()
    index.ensure_collection(encoder.dim)
    w = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, pipeline=True)
    real = w._chunk
    slices: list[int] = []

    def chunk(texts: list[str]) -> Any:
        slices.append(len(texts))
        if len(slices) == 2:
            raise ValueError("tokenizer broke")
        return real(texts)

    monkeypatch.setattr(w, "_chunk", chunk)
    with pytest.raises(ValueError, match="tokenizer broke"):
        w.apply([feed.ev(Op.CREATE, i, "T", LONG) for i in range(100)])
    written = {p.payload["row_id"] for p in index.scroll(limit=10_000)}
    assert written == {str(i) for i in range(25)}  # the first slice only: 100 rows in 4 slices of 25


def test_a_closed_pipelined_writer_has_no_threads_and_starts_them_again_when_used() -> None:
    index, encoder, feed = MemoryIndex(), HashEncoder(), Feed()
    index.ensure_collection(encoder.dim)
    w = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, pipeline=True)

    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(("ragtide-write", "ragtide-chunk"))]

    before = set(threads())
    w.apply([feed.ev(Op.CREATE, i, "T", LONG) for i in range(200)])
    started = set(threads()) - before
    assert len(started) == 2
    w.close()
    assert not any(t.is_alive() for t in started)
    w.apply([feed.ev(Op.UPDATE, i, "T", LONG + " more") for i in range(200)])
    assert texts_of(index, "199")[-1].endswith("more")
    w.close()


def test_unknown_tables_are_ignored(env: Any) -> None:
    writer, index, _, _feed = env
    ev = ChangeEvent("public.other", Op.CREATE, {"id": 1}, {"id": 1}, SourcePosition(1, 1))
    stats = writer.apply([ev])
    assert stats.unknown_table == 1 and index.count() == 0


def test_composite_keys_have_distinct_rows() -> None:
    sources = SourcesConfig.model_validate({"sources": [{"table": "public.t", "key": ["a", "b"], "text": "{v}"}]})
    index, encoder = MemoryIndex(), HashEncoder()
    writer = IndexWriter(index, encoder, word_chunker(), sources)
    evs = [
        ChangeEvent(
            "public.t", Op.CREATE, {"a": a, "b": b}, {"a": a, "b": b, "v": f"{a}-{b}"}, SourcePosition(i + 1, 1)
        )
        for i, (a, b) in enumerate([(1, 2), (2, 1), (1, 1)])
    ]
    writer.apply(evs)
    assert index.count() == 3
    assert {p.payload["row_id"] for p in index.scroll()} == {"1|2", "2|1", "1|1"}


def test_incremental_snapshot_reads_follow_topic_order_and_keep_the_stored_position(env: Any) -> None:
    writer, index, _encoder, _feed = env

    def at(lsn: int, ts: int, body: str, op: Op = Op.UPDATE) -> ChangeEvent:
        row = {"id": 1, "title": "T", "body": body, "category": "a"}
        return ChangeEvent("public.docs", op, {"id": 1}, row, SourcePosition(lsn, ts))

    writer.apply([at(500, 2_000, "committed")])
    # Debezium's incremental-snapshot read carries no LSN and is newer than what precedes it in the topic.
    assert writer.apply([at(0, 9_000, "read by the incremental snapshot", Op.READ)]).stale == 0
    p = index.scroll({"row_key": "public.docs:1", "chunk_no": 0})[0].payload
    assert "incremental" in p["text"] and (p["lsn"], p["source_ts_ms"]) == (500, 2_000)  # position kept
    # So a replayed older event is still recognised as older, and a later commit (earlier clock) still wins.
    assert writer.apply([at(400, 1_900, "an older stream event")]).stale == 1
    assert writer.apply([at(600, 3_000, "committed after the read")]).stale == 0
    assert "after the read" in texts_of(index, "1")[0]


def test_without_an_lsn_the_topic_offset_orders_a_rows_events(env: Any) -> None:
    writer, index, _encoder, _feed = env

    def at(lsn: int, offset: int, body: str, op: Op = Op.UPDATE) -> ChangeEvent:
        row = {"id": 1, "title": "T", "body": body, "category": "a"}
        return ChangeEvent("public.docs", op, {"id": 1}, row, SourcePosition(lsn, 1), partition=0, offset=offset)

    writer.apply([at(0, 50, "from the incremental snapshot", Op.READ)])  # a new generation's first state
    # A replay from offset 0 re-delivers the older history: recognised by its offset, not applied.
    assert writer.apply([at(300, 10, "the initial snapshot, long ago", Op.READ)]).stale == 1
    assert writer.apply([at(0, 50, "from the incremental snapshot", Op.READ)]).stale == 0  # itself: idempotent
    assert writer.apply([at(900, 60, "a later commit")]).stale == 0
    assert "later commit" in texts_of(index, "1")[0]


def test_an_unavailable_toasted_metadata_or_tenant_value_keeps_the_stored_one() -> None:
    """Under the default replica identity an unchanged TOASTed metadata (or tenant) column arrives as Debezium's
    placeholder too: the point keeps the stored value instead of indexing the placeholder."""
    sources = SourcesConfig.model_validate(
        {
            "sources": [
                {
                    "table": "public.docs",
                    "key": ["id"],
                    "text": "{title} {body}",
                    "metadata": ["category"],
                    "tenant_column": "org",
                }
            ]
        }
    )
    index, encoder = MemoryIndex(), HashEncoder()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(8, 2), sources)
    row = {"id": 1, "title": "Title", "body": "text", "category": "big", "org": "acme"}
    writer.apply([ChangeEvent("public.docs", Op.CREATE, {"id": 1}, row, SourcePosition(10, 100))])
    later = {**row, "title": "New", "category": UNAVAILABLE, "org": UNAVAILABLE}
    writer.apply([ChangeEvent("public.docs", Op.UPDATE, {"id": 1}, later, SourcePosition(20, 200))])
    (point,) = index.scroll()
    assert point.payload["metadata"] == {"category": "big"}
    assert point.payload["tenant"] == "acme"
    assert texts_of(index, "1") == ["New text"]


def test_merging_a_generations_work_adds_every_field_but_what_the_batch_was() -> None:
    """During a build a batch goes to two generations: their work adds up field by field, and a field added to
    ApplyStats later is added too (or refused), never silently dropped."""
    ev = ChangeEvent("public.docs", Op.UPDATE, {"id": 1}, {"id": 1, "body": "x"}, SourcePosition(1, 1))

    def filled(n: int) -> ApplyStats:
        stats = ApplyStats()
        for f in dataclasses.fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, Counter):
                value["public.docs"] = n
            elif isinstance(value, int):
                setattr(stats, f.name, n)
            elif isinstance(value, list):
                value.append(ev)
        return stats

    merged = filled(2).merge(filled(3))
    for f in dataclasses.fields(merged):
        value = getattr(merged, f.name)
        if f.name in ApplyStats.PER_BATCH:
            assert value == getattr(filled(2), f.name), f.name  # the same batch: not counted twice
        elif isinstance(value, Counter):
            assert value == Counter({"public.docs": 5}), f.name
        else:
            assert value == 5, f.name
    assert {f.name for f in dataclasses.fields(ApplyStats)} >= ApplyStats.PER_BATCH  # no stale names


def test_a_large_batch_written_in_pipelined_slices_is_what_one_pass_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `pipeline` (an encoder that spares the CPU), past PIPELINE_ROWS rows a batch is chunked slice by slice
    in a thread while the previous slice is written: the same points, payloads and counts as writing it in one
    pass; a store error in a later slice still fails the whole batch (nothing is acknowledged)."""
    from ragtide.contracts.errors import StoreUnavailable
    from ragtide.embedder import writer as writer_module

    def run(pipeline_rows: int) -> tuple[dict[str, Any], ApplyStats, IndexWriter]:
        monkeypatch.setattr(writer_module, "PIPELINE_ROWS", pipeline_rows)
        index, encoder, feed = MemoryIndex(), HashEncoder(), Feed()
        index.ensure_collection(encoder.dim)
        w = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, clock=lambda: 1234.5, pipeline=True)
        w.apply([feed.ev(Op.CREATE, i, "T", LONG if i % 3 else "short") for i in range(0, 150, 2)])
        batch = [feed.ev(Op.CREATE, i, "T", f"row {i} " + LONG) for i in range(150)]  # new, changed, unchanged
        batch += [feed.ev(Op.DELETE, i) for i in range(0, 20, 4)]
        stats = w.apply(batch)
        return {p.id: p.payload for p in index.scroll(limit=10_000)}, stats, w

    sliced, s_stats, w = run(16)  # 145 rows once the deletes are coalesced: 4 slices of 37
    assert w._chunking is not None  # the slices were chunked in the writer's chunking thread
    whole, w_stats, w1 = run(10_000)
    assert w1._chunking is None
    assert sliced == whole and len(whole) > 150
    assert dataclasses.asdict(s_stats) == dataclasses.asdict(w_stats)

    monkeypatch.setattr(writer_module, "PIPELINE_ROWS", 16)
    index, encoder, feed = MemoryIndex(), HashEncoder(), Feed()
    index.ensure_collection(encoder.dim)
    calls = []

    def upsert(points: Any) -> None:
        calls.append(len(points))
        if len(calls) == 3:
            raise StoreUnavailable("store down")
        MemoryIndex.upsert(index, points)

    monkeypatch.setattr(index, "upsert", upsert)
    w = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, pipeline=True)
    with pytest.raises(StoreUnavailable):
        w.apply([feed.ev(Op.CREATE, i, "T", LONG) for i in range(100)])
    assert len(calls) == 3  # the slices after the failing one were never written


def test_a_pipelined_slice_is_written_while_the_next_is_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `pipeline`, a slice's writes run on the writer's write thread while this thread embeds the next slice
    (the embedded engine writes with the GIL released): the first slice's upsert here waits until the second
    slice has been embedded, which a writer that writes in line never lets happen. The batch still returns only
    once every write has landed."""
    import threading

    from ragtide.embedder import writer as writer_module

    monkeypatch.setattr(writer_module, "PIPELINE_ROWS", 16)
    index, encoder, feed = MemoryIndex(), HashEncoder(), Feed()
    index.ensure_collection(encoder.dim)
    second_embedded = threading.Event()
    encodes = []
    encode = encoder.encode

    def counting_encode(texts: Any) -> Any:
        encodes.append(len(texts))
        if len(encodes) == 2:
            second_embedded.set()
        return encode(texts)

    upserts = []

    def upsert(points: Any) -> None:
        if not upserts:
            assert second_embedded.wait(10), "the next slice was not embedded while this one was being written"
        upserts.append(threading.current_thread().name)
        MemoryIndex.upsert(index, points)

    monkeypatch.setattr(encoder, "encode", counting_encode)
    monkeypatch.setattr(index, "upsert", upsert)
    w = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, pipeline=True)
    stats = w.apply([feed.ev(Op.CREATE, i, "T", LONG) for i in range(64)])
    assert len(upserts) == 4 and all(name.startswith("ragtide-write") for name in upserts)
    assert index.count() == stats.embedded == 64 * N_LONG  # every write landed before apply returned


def test_without_pipeline_a_large_batch_stays_on_the_callers_thread(env: Any) -> None:
    writer, index, _encoder, feed = env  # the default: a CPU encoder keeps its cores
    writer.apply([feed.ev(Op.CREATE, i, "T", LONG) for i in range(200)])
    assert writer._chunking is None and index.count() == 200 * N_LONG


def test_only_an_encoder_that_spares_the_cpu_gets_a_pipelined_writer() -> None:
    from types import SimpleNamespace

    from ragtide.compose import spares_the_cpu

    assert spares_the_cpu(SimpleNamespace(cuda=True))  # type: ignore[arg-type]
    assert not spares_the_cpu(SimpleNamespace(cuda=False))  # type: ignore[arg-type]  # a CPU engine, int8 included
    assert not spares_the_cpu(HashEncoder())  # no device at all: the caller's cores


def test_a_document_prompt_goes_before_every_chunk_embedded_not_into_the_index(env: Any) -> None:
    _, _, encoder, feed = env
    index = MemoryIndex()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, word_chunker(8, 2), SOURCES, document_prefix="passage: ")
    stats = writer.apply([feed.ev(Op.CREATE, 1, "Title", LONG)])
    sent = encoder.calls[-1]
    assert len(sent) == N_LONG and all(t.startswith("passage: ") for t in sent)
    assert [f"passage: {t}" for t in texts_of(index, "1")] == sent  # the index keeps the chunk's own text
    # the prompt's token is counted with each chunk's (the words of the chunk, for text without ids: 4 chars)
    assert stats.tokens_by_table["public.docs"] == sum(1 + max(1, len(t) // 4) for t in texts_of(index, "1"))


class SpaceKeepingTokenizer(WhitespaceTokenizer):
    """Like SentencePiece's "▁": a text's trailing space is a token of its own, so the prompt's ids followed by a
    chunk's ids are not the ids of the prompt and the chunk together."""

    def __call__(self, text: str, *, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> Any:
        out = super().__call__(text, add_special_tokens=add_special_tokens)
        if text.endswith(" "):
            out["input_ids"] = [*out["input_ids"], 0]
        return out


class IdsHashEncoder(HashEncoder):
    """An encoder that takes the chunker's ids too (as the engine does), recording what it was given."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self._tok = tokenizer
        self.mixed: list[list[Any]] = []

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def encode_mixed(self, items: Any) -> Any:
        self.mixed.append(list(items))
        return self.encode([" ".join(map(str, i)) if isinstance(i, list) else i for i in items])


class IdsChunker:
    """One chunk per row, with its ids (a row that fits one window)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[str]:
        return [text]

    def pieces_many(self, texts: Any) -> list[list[Piece]]:
        return [[Piece(t, self.tokenizer(t)["input_ids"])] for t in texts]


@pytest.mark.parametrize(("tokenizer", "as_ids"), [(WhitespaceTokenizer(), True), (SpaceKeepingTokenizer(), False)])
def test_the_document_prompt_goes_in_as_ids_only_where_they_join_as_the_texts_would(
    tokenizer: Any, as_ids: bool
) -> None:
    index, encoder, feed = MemoryIndex(), IdsHashEncoder(tokenizer), Feed()
    index.ensure_collection(encoder.dim)
    writer = IndexWriter(index, encoder, IdsChunker(tokenizer), SOURCES, document_prefix="passage: ")
    stats = writer.apply([feed.ev(Op.CREATE, 1, "Title", "a short body")])
    if as_ids:
        prompt = tokenizer("passage: ")["input_ids"]
        assert encoder.mixed == [[[*prompt, *tokenizer("Title a short body")["input_ids"]]]]
        assert stats.embedded_from_ids == 1
    else:  # ids would not be the prompted text's: the text goes, prompted
        assert encoder.mixed == [] and encoder.calls[-1] == ["passage: Title a short body"]
