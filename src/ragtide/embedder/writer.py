"""Apply a batch of change events to the vector index: coalesce per row, diff against stored chunk hashes,
embed only changed chunks, and write (upsert / set_payload / delete).

Pure of Kafka and Faust: the worker hands it decoded events, tests hand it lists.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, cast

from ragtide.contracts.chunks import PointPayload, content_hash, point_id, row_key
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.embedder.chunking import Piece, PieceChunker
from ragtide.embedder.encoder import Encoder, IdsEncoder, Vectors
from ragtide.embedder.index.base import Filter, IndexPoint, Range, StoredPoint, VectorIndex
from ragtide.embedder.truncations import TruncateLog
from ragtide.ingest.sources import UNAVAILABLE, SourcesConfig, SourceTable

log = logging.getLogger(__name__)

# With `pipeline`, a batch of more rows than this is written in slices (at most PIPELINE_SLICES), the next slice
# chunked while the current one is embedded and written.
PIPELINE_ROWS = 64
PIPELINE_SLICES = 4


@dataclass
class ApplyStats:
    """What one batch did."""

    events: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    tables_truncated: int = 0
    embedded: int = 0
    embedded_from_ids: int = 0  # of those, embedded from the chunker's token ids (no second tokenization)
    skipped: int = 0
    embedded_by_table: Counter[str] = field(default_factory=Counter)
    skipped_by_table: Counter[str] = field(default_factory=Counter)
    tokens_by_table: Counter[str] = field(default_factory=Counter)  # tokens of the chunks embedded (chunker's count)
    nano_usd_by_table: Counter[str] = field(default_factory=Counter)  # what a priced provider charged, in 1e-9 USD
    payload_updates: int = 0
    deleted_points: int = 0
    stale: int = 0
    unknown_table: int = 0
    embedded_ms: int = 0  # when the batch's last embeddings were done (its last slice that embedded; 0: none)
    applied: list[ChangeEvent] = field(default_factory=list)

    # What the batch was, the same whichever generations it went to; every other field is work a generation did.
    PER_BATCH: ClassVar[frozenset[str]] = frozenset(
        {
            "events",
            "rows_written",
            "rows_deleted",
            "tables_truncated",
            "stale",
            "unknown_table",
            "embedded_ms",
            "applied",
        }
    )

    def merge(self, other: ApplyStats) -> ApplyStats:
        """Add another generation's work on the same batch (during a build the batch goes to two): counts and
        per-table counters add up; what the batch was stays this one's. A new field adds up unless it is listed in
        PER_BATCH; one that cannot be added is refused, never dropped."""
        for f in fields(self):
            if f.name in self.PER_BATCH:
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif isinstance(mine, int) and not isinstance(mine, bool):
                setattr(self, f.name, mine + theirs)
            else:
                raise TypeError(f"ApplyStats.{f.name}: cannot add {type(mine).__name__}; list it in PER_BATCH")
        return self


@dataclass
class _RowPlan:
    event: ChangeEvent
    source: SourceTable
    row: dict[str, Any]  # the new row state, TOAST placeholders filled from the stored version
    # chunk n's text and the chunker's token ids where they are exact (never re-tokenized)
    pieces: list[Piece]
    position: SourcePosition  # what the points record as their version


# A chunk to embed: its point id, payload (with its text), and the chunker's token ids where exact.
_ToEmbed = tuple[str, PointPayload, list[int] | None]


def coalesce(events: Sequence[ChangeEvent]) -> list[list[ChangeEvent] | ChangeEvent]:
    """Split at truncates; within each segment keep only the last event per row (last state wins)."""
    out: list[list[ChangeEvent] | ChangeEvent] = []
    segment: dict[tuple[str, str], ChangeEvent] = {}
    for ev in events:
        if ev.op is Op.TRUNCATE:
            if segment:
                out.append(list(segment.values()))
                segment = {}
            out.append(ev)
            continue
        segment.pop((ev.table, ev.row_id), None)  # re-insert so the row keeps its latest position
        segment[(ev.table, ev.row_id)] = ev
    if segment:
        out.append(list(segment.values()))
    return out


def _stored_position(points: Sequence[StoredPoint]) -> SourcePosition | None:
    if not points:
        return None
    return max(SourcePosition(int(p.payload.get("lsn", 0)), int(p.payload.get("source_ts_ms", 0))) for p in points)


def _earlier_in_topic(ev: ChangeEvent, have: Sequence[StoredPoint], pos: SourcePosition) -> bool:
    """When one side has no LSN (Debezium's incremental-snapshot reads), the topic decides: the row's events
    share a partition (keyed by primary key), so an event before the stored one's offset is older."""
    if (ev.position.lsn and pos.lsn) or ev.offset < 0:
        return False
    stored = have[0].payload.get("offset") or [-1, -1]
    return bool(stored[1] >= 0 and stored[0] == ev.partition and ev.offset < stored[1])


class IndexWriter:
    """Turns change events into exactly the index writes they need."""

    def __init__(
        self,
        index: VectorIndex,
        encoder: Encoder,
        chunker: Callable[[str], list[str]],
        sources: SourcesConfig,
        clock: Callable[[], float] = time.time,
        truncations: TruncateLog | None = None,
        pipeline: bool = False,
        usd_per_million_tokens: float = 0.0,
        document_prefix: str = "",
    ) -> None:
        """`pipeline`: chunk a large batch's next slice in a thread while this one is embedded and written; for
        encoders that do not compute on this process' cores (CUDA, or free vectors). With a CPU model the thread
        takes a core from the forward pass: measured on 2 cores, 35 instead of 43 chunks/s.
        `usd_per_million_tokens`: the provider's price, for `ApplyStats.nano_usd_by_table`. `document_prefix`:
        the prompt put before every chunk embedded (E5's "passage: "; chunks are cut short enough for it)."""
        self.index = index
        self.encoder = encoder
        self.chunker = chunker
        self.sources = sources
        self.clock = clock
        self.truncations = truncations
        self.pipeline = pipeline
        self.nano_usd_per_token = usd_per_million_tokens * 1000
        self.document_prefix = document_prefix
        self._prefix_ids: list[int] | None = None  # the prompt's token ids, for chunks embedded from ids
        self._joins: bool | None = None  # whether those ids can go before a chunk's (`_prefix_joins`)
        # Each table's newest truncate position, for good: events from before it are stale (see truncations.py).
        self._truncated_at: dict[str, SourcePosition] = {}
        # Row tombstones, kept only while a repair's snapshot is in flight (`remembering_deletes`): row key ->
        # the position of the delete the stream applied meanwhile.
        self._remembering = 0
        self._deleted: dict[str, SourcePosition] = {}
        self._tomb_lock = threading.Lock()
        self._chunking: ThreadPoolExecutor | None = None  # chunks a batch's next slice (`_planned`)
        self._writing: ThreadPoolExecutor | None = None  # writes a slice while the next is planned (`_index_write`)
        self._pending: list[Future[None]] = []
        self._write_failed = False

    def close(self) -> None:
        """Let the chunking and write threads go, once the writes in flight are done (a writer used again starts
        them again)."""
        for pool in (self._chunking, self._writing):
            if pool is not None:
                pool.shutdown(wait=True)
        self._chunking = self._writing = None

    @contextmanager
    def remembering_deletes(self) -> Iterator[None]:
        """Hold tombstones from before a repair reads its snapshot until its writes are done.

        Repair writes a row's snapshot state at the snapshot's position; if the stream deletes that row in
        between, the delete leaves no points behind for the position guard to compare with, and the repair would
        resurrect the row. With the deletes remembered, such an older write is refused as stale. Tombstones are
        dropped when the last repair ends, so they cost nothing in steady state. (Truncates are always
        remembered: `_truncated_at`.)
        """
        with self._tomb_lock:
            self._remembering += 1
        try:
            yield
        finally:
            with self._tomb_lock:
                self._remembering -= 1
                if not self._remembering:
                    self._deleted.clear()

    def _deleted_later(self, ev: ChangeEvent, rk: str) -> bool:
        """A remembered delete of this row is newer than `ev`."""
        tomb = self._deleted.get(rk)
        return tomb is not None and ev.position.is_older_than(tomb)

    def _truncated_later(self, ev: ChangeEvent) -> bool:
        """The table was truncated after `ev` was committed (an event without an LSN cannot tell: never)."""
        at = self._truncated_at.get(ev.table)
        return at is not None and ev.position.is_older_than(at)

    def apply(self, events: Sequence[ChangeEvent]) -> ApplyStats:
        """Apply the batch; returns once the store has acknowledged every write."""
        stats = ApplyStats(events=len(events))
        self._learn_truncates(stats)
        for part in coalesce(events):
            if isinstance(part, ChangeEvent):
                self._truncate(part, stats)
            else:
                self._apply_rows(part, stats)
        # A truncate another worker recorded while this batch was being written may have missed rows this batch
        # wrote from before it: learning it now deletes them before the batch's offsets are committed.
        self._learn_truncates(stats)
        return stats

    def _learn_truncates(self, stats: ApplyStats) -> None:
        """Take in truncates other workers (or this one before a restart) recorded, and apply them here."""
        if self.truncations is None:
            return
        for table, position in self.truncations.positions().items():
            if self._newer_truncate(table, position):
                self._truncated_at[table] = position
                stats.deleted_points += self._delete_before(table, position)

    def _newer_truncate(self, table: str, position: SourcePosition) -> bool:
        """Later than the newest truncate of `table` this writer knows of."""
        known = self._truncated_at.get(table)
        return known is None or known < position

    def _truncate(self, ev: ChangeEvent, stats: ApplyStats) -> None:
        if self._newer_truncate(ev.table, ev.position):
            if self.truncations is not None:
                self.truncations.record(ev.table, ev.position)  # first: other workers refuse older events from now
            self._truncated_at[ev.table] = ev.position
        stats.deleted_points += self._delete_before(ev.table, ev.position)
        stats.tables_truncated += 1
        stats.applied.append(ev)

    def _delete_before(self, table: str, position: SourcePosition) -> int:
        """Delete the table's points written from before `position`; how many there were. Points of rows
        committed after the truncate, which another partition may have delivered first, stay."""
        flt: Filter = {"table": table, "lsn": Range(lt=position.lsn)} if position.lsn else {"table": table}
        before = self.index.count(flt)
        if before:
            self.index.delete_where(flt)
        return before

    def _apply_rows(self, events: Sequence[ChangeEvent], stats: ApplyStats) -> None:
        tables = {t: self.sources.get(t) for t in {ev.table for ev in events}}  # looked up once per batch
        known = []
        for ev in events:
            if tables[ev.table] is None:
                stats.unknown_table += 1
                log.warning("event for a table not in the sources config", extra={"table": ev.table})
            else:
                known.append(ev)
        if not known:
            return
        keys = [row_key(ev.table, ev.row_id) for ev in known]
        stored: dict[str, list[StoredPoint]] = {k: [] for k in keys}
        for p in self.index.scroll({"row_key": keys}, limit=1_000_000):
            stored.setdefault(str(p.payload.get("row_key")), []).append(p)

        deletes: list[str] = []
        rows: list[tuple[ChangeEvent, SourceTable, dict[str, Any], SourcePosition]] = []
        texts: list[str] = []
        for ev, rk in zip(known, keys, strict=True):
            have = stored[rk]
            pos = _stored_position(have)
            if pos is not None and (ev.position.is_older_than(pos) or _earlier_in_topic(ev, have, pos)):
                stats.stale += 1  # invariant 3: never let an older event overwrite a newer state
                continue
            if self._truncated_later(ev):
                stats.stale += 1  # from before its table's truncate, delivered late by another partition
                continue
            if not have and self._remembering and self._deleted_later(ev, rk):
                stats.stale += 1  # a repair's snapshot state of a row the stream has deleted since
                continue
            if not ev.op.writes_row or ev.row is None:
                if self._remembering:
                    with self._tomb_lock:  # not after the last repair's exit cleared them
                        if self._remembering:
                            self._deleted[rk] = ev.position
                if have:
                    deletes.append(rk)
                    stats.deleted_points += len(have)
                stats.rows_deleted += 1
                stats.applied.append(ev)
                continue
            source = tables[ev.table]
            assert source is not None
            row = self._fill_unavailable(ev.row, have, source)
            texts.append(source.render_text(row))
            # An incremental-snapshot read has no LSN: it is newer than what it follows in the topic, but keeps
            # the stored position so that replayed older events stay recognisably older (replay is idempotent).
            position = pos if pos is not None and pos.lsn and not ev.position.lsn else ev.position
            rows.append((ev, source, row, position))
            stats.applied.append(ev)
        if deletes:
            self.index.delete_where({"row_key": deletes})
        try:
            for plans in self._planned(rows, texts):
                if self._write_failed:
                    break  # the batch fails whole: embedding its other slices would be work thrown away
                self._write_plans(plans, stored, stats)
        except BaseException:
            self._writes_done(raise_error=False)
            raise
        self._writes_done()

    def _index_write(self, call: Callable[..., None], *args: Any) -> None:
        """One of the batch's index writes. Pipelined, it runs on the write thread, in order, while this thread
        plans and embeds the next slice (the embedded engine and HTTP release the GIL); `_writes_done` waits for
        them before the batch is acknowledged. After a write fails, the batch's later writes are skipped: the
        batch fails whole and is applied again."""
        if not self.pipeline:
            call(*args)
            return
        if self._writing is None:
            self._writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragtide-write")

        def write() -> None:
            if self._write_failed:
                return
            try:
                call(*args)
            except BaseException:
                self._write_failed = True
                raise

        self._pending.append(self._writing.submit(write))

    def _writes_done(self, raise_error: bool = True) -> None:
        """Wait for the batch's writes on the write thread; raise the first one's error."""
        pending, self._pending = self._pending, []
        errors = [exc for f in pending if (exc := f.exception()) is not None]
        self._write_failed = False
        if errors and raise_error:
            raise errors[0]
        if errors:  # the batch already fails with another error: say what the write thread met too
            log.warning("an index write of the failed batch failed too", exc_info=errors[0])

    def _planned(
        self, rows: list[tuple[ChangeEvent, SourceTable, dict[str, Any], SourcePosition]], texts: list[str]
    ) -> Iterator[list[_RowPlan]]:
        """The rows' plans, with `pipeline` a slice at a time: while the caller embeds and writes one slice, the
        next is chunked in a thread (the Rust tokenizer works outside the GIL). A batch of one slice stays on this
        thread."""
        step = max(PIPELINE_ROWS, -(-len(rows) // PIPELINE_SLICES)) if self.pipeline else max(1, len(rows))
        bounds = [(i, min(i + step, len(rows))) for i in range(0, len(rows), step)]
        if len(bounds) <= 1:
            yield self._plans(rows, self._chunk(texts))
            return
        if self._chunking is None:
            self._chunking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragtide-chunk")
        # Every slice is queued at once: the chunking thread runs ahead without waiting for this one to come back.
        pending = [self._chunking.submit(self._chunk, texts[a:b]) for a, b in bounds]
        try:
            for (a, b), chunked in zip(bounds, pending, strict=True):
                yield self._plans(rows[a:b], chunked.result())
        finally:
            for later in pending:
                later.cancel()  # the batch failed or stopped early: no work for slices it will not write

    @staticmethod
    def _plans(
        rows: Sequence[tuple[ChangeEvent, SourceTable, dict[str, Any], SourcePosition]], chunked: list[list[Piece]]
    ) -> list[_RowPlan]:
        return [
            _RowPlan(ev, source, row, pieces, position)
            for (ev, source, row, position), pieces in zip(rows, chunked, strict=True)
        ]

    def _chunk(self, texts: list[str]) -> list[list[Piece]]:
        """The texts (a slice of the batch's rows) in batched tokenizer calls where the chunker offers them."""
        if isinstance(self.chunker, PieceChunker):
            return self.chunker.pieces_many(texts)
        return [[Piece(c, None) for c in self.chunker(t)] for t in texts]

    def _fill_unavailable(
        self, row: dict[str, Any], have: Sequence[StoredPoint], source: SourceTable
    ) -> dict[str, Any]:
        """Invariant 5: an unchanged TOASTed column (Debezium's placeholder) keeps the stored value, whether it is
        a text, metadata or tenant column."""
        missing = [c for c, v in row.items() if v == UNAVAILABLE]
        if not missing:
            return row
        # the text columns are stored on the row's first chunk only; metadata and tenant on every chunk
        head = next((p for p in have if p.payload.get("chunk_no") == 0), have[0] if have else None)
        payload = head.payload if head is not None else {}
        stored: dict[str, Any] = {**dict(payload.get("metadata", {})), **dict(payload.get("columns", {}))}
        if source.tenant_column and have:
            stored[source.tenant_column] = payload.get("tenant")
        return {**row, **{c: stored.get(c) for c in missing}}

    def _write_plans(self, plans: Sequence[_RowPlan], stored: dict[str, list[StoredPoint]], stats: ApplyStats) -> None:
        now_ms = int(self.clock() * 1000)
        to_embed: list[_ToEmbed] = []
        embedded_by_table: Counter[str] = Counter()
        tokens_by_table: Counter[str] = Counter()
        nano_usd_by_table: Counter[str] = Counter()
        prompt = len(self._document_prefix_ids())
        surplus: list[str] = []
        for plan in plans:
            ev, src, row, pieces = plan.event, plan.source, plan.row, plan.pieces
            table, rid = ev.table, ev.row_id
            rk = row_key(table, rid)
            reembed = ev.extra.get("reembed")
            kept = stored.get(rk)
            have = {int(p.payload.get("chunk_no", -1)): p for p in kept} if kept else {}
            unchanged: list[str] = []
            # The fields that describe the row version, identical for every chunk of the row.
            row_fields: dict[str, Any] = {
                "key": ev.key,
                "offset": [ev.partition, ev.offset],  # topic order, for events that carry no LSN
                "chunk_count": len(pieces),
                "tenant": src.tenant_of(row),
                "metadata": src.render_metadata(row),
                "lsn": plan.position.lsn,
                "source_ts_ms": plan.position.ts_ms,
                "indexed_at_ms": now_ms,
            }
            # The text columns' values (to fill Debezium's unchanged-TOAST placeholder later) go on the first chunk
            # only: on every chunk they were more than half the bytes the engine stored.
            head_fields = {**row_fields, "columns": {c: row.get(c) for c in src.text_columns}}
            head_unchanged = False
            embedded = tokens = 0
            for n, (text, ids) in enumerate(pieces):
                digest = content_hash(text)
                old = have.get(n)
                if old is not None and old.payload.get("hash") == digest and not reembed:
                    if n:
                        unchanged.append(point_id(table, rid, n))
                    else:
                        head_unchanged = True
                    continue
                payload = cast(
                    PointPayload,
                    {
                        "table": table,
                        "row_key": rk,
                        "row_id": rid,
                        "chunk_no": n,
                        "text": text,
                        "hash": digest,
                        **(row_fields if n else head_fields),
                    },
                )
                to_embed.append((point_id(table, rid, n), payload, ids))
                # Exact for the chunks the chunker tokenized (a row that fits one window); about 4 characters a
                # token for the windows of a longer row. With the document prompt's tokens.
                chunk_tokens = prompt + (len(ids) if ids is not None else max(1, len(text) // 4))
                tokens += chunk_tokens
                embedded += 1
                if self.nano_usd_per_token:
                    nano_usd_by_table[table] += round(chunk_tokens * self.nano_usd_per_token)
            if embedded:
                embedded_by_table[table] += embedded
                tokens_by_table[table] += tokens
            if head_unchanged:
                # Invariant 4: same text, no embedding; refresh the row-level fields in place.
                self._index_write(self.index.set_payload, [point_id(table, rid, 0)], head_fields)
            if unchanged:
                self._index_write(self.index.set_payload, unchanged, row_fields)
            if unchanged or head_unchanged:
                unchanged_n = len(unchanged) + head_unchanged
                stats.skipped += unchanged_n
                stats.skipped_by_table[table] += unchanged_n
                stats.payload_updates += unchanged_n
            surplus += [point_id(table, rid, n) for n in have if n >= len(pieces)]
            stats.rows_written += 1

        if to_embed:
            vectors, from_ids = self._embed(to_embed)
            stats.embedded_from_ids += from_ids
            stats.embedded_ms = int(self.clock() * 1000)
            points = [IndexPoint(pid, vec, p) for (pid, p, _), vec in zip(to_embed, vectors, strict=True)]
            self._index_write(self.index.upsert, points)
            stats.embedded += len(points)
            stats.embedded_by_table.update(embedded_by_table)
            stats.tokens_by_table.update(tokens_by_table)
            stats.nano_usd_by_table.update(nano_usd_by_table)
        if surplus:
            self._index_write(self.index.delete, surplus)
            stats.deleted_points += len(surplus)

    def _embed(self, to_embed: Sequence[_ToEmbed]) -> tuple[Vectors, int]:
        """Chunks with exact ids go to the engine as ids (tokenized once, by the chunker), the rest as text;
        returns the vectors and how many chunks went in as ids."""
        from_ids = sum(1 for _, _, ids in to_embed if ids is not None)
        prefix = self.document_prefix
        if isinstance(self.encoder, IdsEncoder) and from_ids and self._prefix_joins():
            head = self._document_prefix_ids()
            items = [prefix + p["text"] if ids is None else [*head, *ids] for _, p, ids in to_embed]
            return self.encoder.encode_mixed(items), from_ids
        return self.encoder.encode([prefix + p["text"] for _, p, _ in to_embed]), 0

    def _prefix_joins(self) -> bool:
        """Whether the prompt's ids followed by a chunk's ids are the ids of prompt + chunk text (WordPiece cuts at
        the prompt's closing space); a tokenizer that joins across it (SentencePiece's "▁", byte-level BPE's "Ġ")
        gets the chunks as text. Probed once."""
        if self._joins is None:
            if not self.document_prefix:
                self._joins = True
            else:
                tokenizer: Any = self.encoder.tokenizer
                head = self._document_prefix_ids()

                def ids(text: str) -> list[int]:
                    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

                samples = ("Hello world", "x", "42 résumés, naïve café.", "(quoted) text")
                self._joins = all(ids(self.document_prefix + t) == [*head, *ids(t)] for t in samples)
        return self._joins

    def _document_prefix_ids(self) -> list[int]:
        """The document prompt's token ids (no special tokens), tokenized once."""
        if self._prefix_ids is None:
            tokenizer: Any = self.encoder.tokenizer
            self._prefix_ids = (
                list(tokenizer(self.document_prefix, add_special_tokens=False)["input_ids"])
                if self.document_prefix
                else []
            )
        return self._prefix_ids


__all__ = ["ApplyStats", "IndexWriter", "coalesce", "content_hash"]
