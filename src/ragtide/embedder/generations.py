"""Index generations: blue/green collections behind one alias, so a model change or a full reindex never shows
search a half-built index.

A *generation* is everything that decides the vectors: the model, its dimension, the chunking, and a revision.
Each generation lives in its own collection `<collection>-<fingerprint>`. The *catalog* (one point in a small
collection of the same store, so it lives wherever the index lives) is the alias: it names the live generation
and the one being built.

While a build runs, the embedder applies every change to both generations (dual write); the new one receives the
existing rows through Debezium's incremental snapshot, which Debezium interleaves correctly with the live stream.
`BuildWatcher` verifies the new generation against the source; once there is no drift it becomes live in one
step (search switches its collection and its query encoder together) and the old collection is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.events import ChangeEvent, Op
from ragtide.contracts.logging import BackgroundFailures
from ragtide.embedder.encoder import Encoder
from ragtide.embedder.index.base import IndexPoint, VectorIndex
from ragtide.embedder.verify import TableDrift, verify_table
from ragtide.embedder.writer import ApplyStats, IndexWriter
from ragtide.ingest.sources import SourcesConfig

log = logging.getLogger(__name__)

PRECISIONS = ("float", "int8")
CATALOG_POINT = str(uuid.uuid5(uuid.NAMESPACE_URL, "ragtide:catalog"))


@dataclass(frozen=True)
class GenerationSpec:
    """What decides the vectors of a collection. `model_path` and `url` say where to load the model or reach its
    provider, not what it is."""

    model: str
    dim: int
    max_tokens: int
    overlap: int
    revision: int = 1
    model_path: str | None = None
    precision: str = "float"
    provider: str = "local"
    url: str | None = None  # where a provider's generation was embedded (like model_path: not what it is)
    query_prefix: str = ""  # put before each query (E5/BGE-style models)
    document_prefix: str = ""  # put before each chunk embedded
    # How a provider's requests were shaped when it was built (not what the vectors are: outside the fingerprint),
    # so that its generation is still reached the same way after the configuration moved to another provider.
    normalize: bool = False
    send_dimensions: bool = False
    encoding_format: str = "base64"
    REQUEST_SHAPE: ClassVar[tuple[str, ...]] = ("normalize", "send_dimensions", "encoding_format")

    @property
    def fingerprint(self) -> str:
        """Stable across machines: the model's name, not its path. int8 vectors are a generation of their own: they
        agree with fp32 only to a cosine of ~0.99 (fp32, bf16 and fp16 to 0.999), enough to reorder close results,
        so a change of precision is a blue/green rebuild, never a mix in one collection. So is a change of
        provider: two servers may serve different weights under one model name. "float" and "local" add nothing,
        so generations made before precision and provider were part of a spec keep their fingerprint."""
        ident = f"{self.model}|{self.dim}|{self.max_tokens}|{self.overlap}|{self.revision}"
        if self.precision != "float":
            ident += f"|{self.precision}"
        if self.provider != "local":
            ident += f"|{self.provider}"
        if self.query_prefix or self.document_prefix:
            ident += f"|q={self.query_prefix!r}|d={self.document_prefix!r}"
        return hashlib.sha256(ident.encode()).hexdigest()[:10]

    @property
    def encoder_identity(self) -> tuple[str, str, str, int]:
        """What an encoder of this generation must be (`encoder_identity` of it): provider, model, precision and
        dimension (a provider's model may make vectors of several sizes)."""
        return (self.provider, self.model, self.precision, self.dim)

    def collection(self, base: str) -> str:
        """The physical collection of this generation."""
        return f"{base}-{self.fingerprint}"

    def same_vectors(self, other: GenerationSpec) -> bool:
        """Same provider, model, prompts, precision and chunking: the vectors would be identical, whatever the
        revision."""
        # where and how it is reached, not what it makes
        reach: dict[str, Any] = {k: getattr(other, k) for k in ("revision", "model_path", "url", *self.REQUEST_SHAPE)}
        return replace(self, **reach) == other

    def as_dict(self) -> dict[str, Any]:
        """JSON form (catalog payload, API)."""
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationSpec:
        """Inverse of as_dict."""
        return cls(
            model=str(d["model"]),
            dim=int(d["dim"]),
            max_tokens=int(d["max_tokens"]),
            overlap=int(d["overlap"]),
            revision=int(d.get("revision", 1)),
            model_path=d.get("model_path"),
            precision=_precision(d.get("precision", "float")),
            provider=str(d.get("provider", "local")),
            url=d.get("url"),
            query_prefix=str(d.get("query_prefix", "")),
            document_prefix=str(d.get("document_prefix", "")),
            normalize=bool(d.get("normalize", False)),
            send_dimensions=bool(d.get("send_dimensions", False)),
            encoding_format=str(d.get("encoding_format", "base64")),
        )


def encoder_identity(encoder: Encoder) -> tuple[str, str, str, int]:
    """Which generations an encoder can serve: those whose `GenerationSpec.encoder_identity` this is."""
    return (encoder.provider, encoder.model_name, encoder.precision, encoder.dim)


def _precision(value: Any) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"a generation's precision is one of {', '.join(PRECISIONS)}, not {value!r}")
    return str(value)


@dataclass(frozen=True)
class CatalogState:
    """Which generation is live, and which is being built."""

    live: GenerationSpec | None = None
    building: GenerationSpec | None = None
    retired: tuple[GenerationSpec, ...] = ()  # switched away from; dropped after a grace period


class Catalog:
    """The alias, stored as one point of a 1-d collection in the same store as the generations."""

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        index.ensure_collection(1)

    def read(self) -> CatalogState:
        """The current state (empty on a new store)."""
        points = self.index.scroll(limit=10)
        payload = next((p.payload for p in points if p.id == CATALOG_POINT), None)
        if not payload:
            return CatalogState()
        live, building = payload.get("live"), payload.get("building")
        return CatalogState(
            GenerationSpec.from_dict(live) if live else None,
            GenerationSpec.from_dict(building) if building else None,
            tuple(GenerationSpec.from_dict(r) for r in payload.get("retired") or []),
        )

    def write(self, state: CatalogState) -> None:
        """Replace the state in one write."""
        payload = {
            "live": state.live.as_dict() if state.live else None,
            "building": state.building.as_dict() if state.building else None,
            "retired": [r.as_dict() for r in state.retired],
            "updated_ms": int(time.time() * 1000),
        }
        self.index.upsert([IndexPoint(CATALOG_POINT, np.ones(1, dtype=np.float32), payload)])


@dataclass
class Generation:
    """A generation at run time: its collection, its encoder and the writer that keeps it equal to the source."""

    spec: GenerationSpec
    index: VectorIndex
    encoder: Encoder
    writer: IndexWriter


@dataclass
class BuildProgress:
    """Rows of the source that the generation being built already holds correctly."""

    rows_done: int = 0
    rows_total: int = 0
    started: float = field(default_factory=time.time)
    checks: int = 0
    drift: int = -1
    # rows the last repair could not write (e.g. refused by the build's embeddings provider), a few with why:
    # while they drift the build is not switched live
    unrepairable: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Rows per second since the build started."""
        return self.rows_done / max(1e-3, time.time() - self.started)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate (None before any progress)."""
        rate = self.rate
        return max(0.0, (self.rows_total - self.rows_done) / rate) if rate > 0 else None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        eta = self.eta_s
        return {
            "rows_done": self.rows_done,
            "rows_total": self.rows_total,
            "rows_per_s": round(self.rate, 2),
            "eta_s": round(eta, 1) if eta is not None else None,
            "drift": self.drift,
            "checks": self.checks,
            "unrepairable": self.unrepairable,
        }


GenerationFactory = Callable[[GenerationSpec], Generation]


class Generations:
    """The live generation and the one being built. Implements the writer side (`apply`) for the worker and the
    read side (`current`) for search; a switch changes both at once."""

    def __init__(
        self,
        catalog: Catalog,
        factory: GenerationFactory,
        registry: CollectorRegistry | None = None,
        drop_collection: Callable[[GenerationSpec], None] | None = None,
        grace_s: float = 30.0,
        query_encoder: Callable[[Generation], Encoder] | None = None,
    ) -> None:
        """`query_encoder`: the encoder search embeds queries with for a generation (default: its writer's; the
        node gives search an engine of its own, so that a query never waits behind a batch's forward passes)."""
        self.catalog = catalog
        self.query_encoder = query_encoder or (lambda gen: gen.encoder)
        self.factory = factory
        # Dropping a collection must not load its model (it may be gone): the node passes a plain index opener.
        self.drop_collection = drop_collection or (lambda spec: self.factory(spec).index.drop())
        self.grace_s = grace_s
        self._retired: list[tuple[float, Generation | None, GenerationSpec]] = []
        self._lock = threading.RLock()  # one writer at a time across both generations, and the switch
        self._live: Generation | None = None
        self.building: Generation | None = None
        self.progress: BuildProgress | None = None
        self.switches = 0
        self.build_batches = 0  # batches applied to the generation being built (the watcher's sign of progress)
        self.applying_build = False
        self.leading = True  # False in an embedder that does not hold the lease (lease.py): it follows the catalog
        registry = registry or CollectorRegistry()
        self._rows = Gauge(
            "ragtide_reindex_rows", "Rows of the generation being built: done and total", ["kind"], registry=registry
        )
        self._eta = Gauge(
            "ragtide_reindex_eta_seconds", "Estimated seconds until the build switches", registry=registry
        )
        self._building = Gauge("ragtide_reindex_building", "1 while a new generation is being built", registry=registry)

    @property
    def live(self) -> Generation:
        """The generation that search reads."""
        if self._live is None:
            raise RuntimeError("generations not opened: call converge(desired) first")
        return self._live

    def current(self) -> tuple[VectorIndex, Encoder]:
        """The live collection and the encoder its vectors came from (search's own instance), read together."""
        g = self.live
        return g.index, self.query_encoder(g)

    def converge(self, desired: GenerationSpec) -> bool:
        """The leader's start: open the live generation and, when the configuration asks for other vectors, start
        building them. Collections a previous leader retired are dropped after the grace period.

        Returns True when a build (new or resumed) needs the existing rows (an incremental snapshot).
        """
        state = self.catalog.read()
        with self._lock:
            if state.live is None:
                self._adopt(desired, None)
                self.catalog.write(CatalogState(live=desired))
                return False
            live, building = state.live, state.building
            # What this process had open as a follower may be older than the catalog (a switch it never saw):
            # the catalog's live generation and build, and nothing else, from here on.
            self._adopt(live, building)
            known = {spec.fingerprint for _, _, spec in self._retired}
            now = time.monotonic()  # a retriever may still read them for a moment: the grace period applies
            self._retired += [(now, None, spec) for spec in state.retired if spec.fingerprint not in known]
            if building is not None and building.same_vectors(desired):
                self._start(building)  # resume the build that a restart (or the previous leader) left
                return True
            if building is not None:
                self._drop_building(building)  # the configuration moved on: abandon that build
                self._publish()
            if not live.same_vectors(desired):
                self._start(replace(desired, revision=live.revision + 1))
                return True
            return False

    def follow(self, desired: GenerationSpec | None = None) -> bool:
        """A follower's view (an embedder that does not hold the lease): open what the catalog names, the live
        generation and the build in progress, so that every batch goes where the leader says. `desired` is what
        an empty catalog stands for (the leader is about to write it). True when something changed."""
        state = self.catalog.read()
        with self._lock:
            live = state.live or (self._live.spec if self._live is not None else desired)
            if live is None:
                raise RuntimeError("the catalog is empty and no generation was asked for")
            changed = self._adopt(live, state.building)
        if changed:
            building = state.building.fingerprint if state.building else None
            log.info("following the catalog", extra={"live": live.fingerprint, "building": building})
        return changed

    def _adopt(self, live: GenerationSpec, building: GenerationSpec | None) -> bool:
        """Open `live` and `building` (reusing what is open), close whatever else was open; True on a change.
        Called under the lock."""
        before = (self._fingerprint(self._live), self._fingerprint(self.building))
        opened = [g for g in (self._live, self.building) if g is not None]
        self._live = self._reuse(live)
        self.building = self._reuse(building) if building is not None else None
        if self.building is None:
            self.progress = None
            self._building.set(0)
        kept = {id(self._live), id(self.building)}
        for gen in opened:
            if id(gen) not in kept:
                gen.index.close()  # the leader drops it; this process will not write it again
        return before != (self._fingerprint(self._live), self._fingerprint(self.building))

    @staticmethod
    def _fingerprint(gen: Generation | None) -> str | None:
        return gen.spec.fingerprint if gen is not None else None

    def _reuse(self, spec: GenerationSpec) -> Generation:
        """The open generation of `spec`, or a newly opened one."""
        for gen in (self._live, self.building):
            if gen is not None and gen.spec.fingerprint == spec.fingerprint:
                return gen
        return self._open(spec)

    def _must_lead(self, what: str) -> None:
        """Only the leader changes the catalog: a process that lost the lease while a check ran in a thread must
        not switch or drop anything afterwards (called under the lock, which `resign` takes)."""
        if not self.leading:
            raise RuntimeError(f"this process does not lead the generations: it may not {what}")

    def resign(self) -> None:
        """Stop leading: once this returns, no switch, build start or drop of this process is in progress or
        can follow (the next holder of the lease may act)."""
        with self._lock:
            self.leading = False

    def _publish(self, live: GenerationSpec | None = None) -> None:
        """Write the catalog: the live generation (or `live`, before switching to it), the build, the retired."""
        building = self.building.spec if self.building is not None else None
        live = live or self.live.spec
        retired = tuple(spec for _, _, spec in self._retired if spec.fingerprint != live.fingerprint)
        same = building is not None and building.fingerprint == live.fingerprint
        self.catalog.write(CatalogState(live=live, building=None if same else building, retired=retired))

    def _drop_building(self, spec: GenerationSpec) -> None:
        if self.building is not None and self.building.spec.fingerprint == spec.fingerprint:
            self.building.index.close()
            self.building = None
        self.drop_collection(spec)

    def rebuild(self) -> GenerationSpec:
        """Build a fresh copy of the live generation (same model and chunking, next revision): `ragtide reindex`."""
        with self._lock:
            self._must_lead("start a build")
            if self.building is None:
                self._start(replace(self.live.spec, revision=self.live.spec.revision + 1))
            assert self.building is not None
            return self.building.spec

    def _open(self, spec: GenerationSpec) -> Generation:
        """Open a generation. One this process cannot open (its model or provider unreachable, or configured
        differently here) is an outage: a follower opens what the leader started before each batch, and a batch
        that fails there must be retried, never dead-lettered row by row (every row would fail alike)."""
        try:
            gen = self.factory(spec)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise StoreUnavailable(
                f"generation {spec.fingerprint} ({spec.model}, {spec.provider}) cannot be opened here, so nothing is "
                f"applied until it can: {exc}"
            ) from exc
        gen.index.ensure_collection(spec.dim)
        return gen

    def _start(self, spec: GenerationSpec) -> None:
        self.building = self._reuse(spec)
        self.progress = BuildProgress()
        self._publish()
        self._building.set(1)
        log.info("building generation", extra={"generation": spec.as_dict(), "live": self.live.spec.fingerprint})

    def apply(self, events: Sequence[ChangeEvent]) -> ApplyStats:
        """Apply a batch to the live generation and, during a build, to the new one as well. A follower reads
        the catalog first, after the batch left Kafka: a build the leader verifies or switches after that read
        cannot miss these events (they were committed before it), and no batch goes to a retired generation
        only."""
        with self._lock:
            if not self.leading:
                self.follow()
            stats = self.live.writer.apply(events)
            if self.building is not None:
                reads = any(ev.op is Op.READ for ev in events)  # the snapshot filling the build
                self.build_batches += reads
                self.applying_build = reads
                try:
                    extra = self.building.writer.apply(events)
                finally:
                    self.applying_build = False
                stats.merge(extra)
            return stats

    def apply_to(self, gen: Generation, events: Sequence[ChangeEvent]) -> ApplyStats:
        """Apply to one generation, serialised with the stream (repairs)."""
        with self._lock:
            return gen.writer.apply(events)

    def record_progress(self, reports: Sequence[TableDrift]) -> BuildProgress | None:
        """Update the build's progress from a verify pass over it."""
        p = self.progress
        if p is None:
            return None
        p.rows_total = sum(r.rows for r in reports)
        p.rows_done = max(0, p.rows_total - sum(len(r.missing) + len(r.stale) for r in reports))
        p.drift = sum(r.drift for r in reports)
        p.checks += 1
        self._rows.labels("done").set(p.rows_done)
        self._rows.labels("total").set(p.rows_total)
        eta = p.eta_s
        self._eta.set(eta if eta is not None else -1)
        return p

    def promote(self) -> GenerationSpec:
        """Make the generation being built live, then drop the old collection."""
        with self._lock:
            self._must_lead("switch generations")
            new = self.building
            if new is None:
                raise RuntimeError("no generation is being built")
            old = self.live
            if new.spec.fingerprint == old.spec.fingerprint:
                raise RuntimeError(f"generation {new.spec.fingerprint} is already live")
            self._retired.append((time.monotonic(), old, old.spec))
            try:  # the alias first: if that write fails, nothing has switched and the watcher tries again
                self._publish(live=new.spec)
            except Exception:
                self._retired.pop()
                raise
            self._live, self.building = new, None
            self.switches += 1
            self._building.set(0)
        log.info("generation is live", extra={"live": new.spec.as_dict(), "retired": old.spec.fingerprint})
        return new.spec

    def reap(self, now: float | None = None) -> int:
        """Drop retired collections once no request can still be using them (after `grace_s`)."""
        now = time.monotonic() if now is None else now
        due = [r for r in self._retired if now - r[0] >= self.grace_s]
        if not due:
            return 0
        with self._lock:
            self._must_lead("drop retired generations")
            in_use = {self._fingerprint(self._live), self._fingerprint(self.building)}
            self._retired = [r for r in self._retired if r not in due]
            due = [r for r in due if r[2].fingerprint not in in_use]  # never the live one, nor the build
            self._publish()
        for _, gen, spec in due:
            if gen is not None:
                gen.index.drop()
            else:
                self.drop_collection(spec)
            log.info("dropped retired generation", extra={"generation": spec.fingerprint})
        return len(due)

    def status(self) -> dict[str, Any]:
        """For /v1/index/stats and the reindex CLI."""
        live, building, progress = self.live, self.building, self.progress  # the watcher may switch meanwhile
        return {
            "live": live.spec.as_dict(),
            "building": building.spec.as_dict() if building else None,
            "progress": progress.as_dict() if progress and building else None,
            "switches": self.switches,
            "retired": [spec.fingerprint for _, _, spec in self._retired],
        }

    def close(self) -> None:
        """Close every open collection."""
        for gen in (self._live, self.building):
            if gen is not None:
                gen.index.close()
        self.catalog.index.close()


VerifyTable = Callable[[Generation, str, bool], TableDrift]


class BuildWatcher:
    """Verifies the generation being built and switches it live when it equals the source.

    Checks get rarer as they get longer (at least `interval_s`, at most a quarter of the time spent verifying).
    When the drift stops shrinking while nothing else moves (a lost snapshot signal), the drift is repaired.
    """

    def __init__(
        self,
        generations: Generations,
        sources: SourcesConfig,
        verify: VerifyTable,
        interval_s: float = 2.0,
        stall_checks: int = 5,
        failures: BackgroundFailures | None = None,
    ) -> None:
        self.failures = failures or BackgroundFailures()
        self.generations = generations
        self.sources = sources
        self.verify = verify
        self.interval_s = interval_s
        self.stall_checks = stall_checks
        self._unchanged = 0
        self._batches_seen = -1

    def check(self) -> bool:
        """One verify pass over the build; True when it switched live."""
        gens = self.generations
        gen = gens.building
        if gen is None:
            return False
        before = gens.progress.drift if gens.progress else -1
        batches = gens.build_batches
        reports = [self.verify(gen, table, False) for table in self.sources.user_tables]
        progress = gens.record_progress(reports)
        drift = sum(r.drift for r in reports)
        if drift == 0:
            gens.promote()
            return True
        # Stalled: the drift stays the same while the stream brings the build nothing (a lost snapshot signal).
        # A big snapshot batch still being embedded is not a stall.
        idle = batches == self._batches_seen and not gens.applying_build
        self._batches_seen = gens.build_batches
        self._unchanged = self._unchanged + 1 if drift == before and idle else 0
        if self._unchanged >= self.stall_checks:
            log.warning("build stalled; repairing its drift from the source", extra={"drift": drift})
            refused: dict[str, str] = {}
            for table in self.sources.user_tables:
                report = self.verify(gen, table, True)
                refused |= {f"{table}:{row}": why for row, why in report.unrepairable.items()}
                if report.unrepaired:  # e.g. rows its provider refuses: the build cannot go live while they drift
                    log.error(
                        "rows the build cannot hold; it will not switch live until they change",
                        extra={"table": table, "rows": report.unrepaired, "examples": report.unrepairable},
                    )
            if progress is not None:
                progress.unrepairable = refused
            self._unchanged = 0
        log.info("building", extra=progress.as_dict() if progress else {})
        return False

    async def run(self) -> None:
        """Check until cancelled."""
        reap_failures = self.failures.loop("dropping a retired generation", log)
        check_failures = self.failures.loop("build check", log)
        delay = self.interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(self.generations.reap)
                reap_failures.recovered()
            except Exception as exc:
                reap_failures.failed(exc)
            if self.generations.building is None:
                delay = self.interval_s
                continue
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(self.check)
                check_failures.recovered()
            except Exception as exc:
                check_failures.failed(exc)
            delay = max(self.interval_s, 4 * (time.monotonic() - t0))


def verify_generation(
    dsn_of: Callable[[str], str],
    generations: Generations,
    sources: SourcesConfig,
    gen: Generation,
    table: str,
    repair: bool,
    reembed: bool = False,
) -> tuple[TableDrift, int]:
    """verify_table against one generation, reading the source at a REPEATABLE READ snapshot; its writes are
    serialised with the stream's. Returns the report and how many chunks its writes embedded."""
    from ragtide.ingest.rows import read_rows

    source = sources.get(table)
    assert source is not None
    writer = LockedWriter(generations, gen)
    with gen.writer.remembering_deletes():  # from before the snapshot until its writes are done
        position, rows = read_rows(dsn_of(table), source)
        return verify_table(source, position, rows, gen.index, writer, repair, reembed), writer.embedded


def verifier(dsn_of: Callable[[str], str], generations: Generations, sources: SourcesConfig) -> VerifyTable:
    """The BuildWatcher's verify: verify_generation without the embedding count."""
    return lambda gen, table, repair: verify_generation(dsn_of, generations, sources, gen, table, repair)[0]


class LockedWriter:
    """A generation's writer whose writes are serialised with the stream's (what verify's repair needs)."""

    def __init__(self, generations: Generations, gen: Generation) -> None:
        self.generations = generations
        self.gen = gen
        self.chunker = gen.writer.chunker
        self.embedded = 0

    def apply(self, events: Sequence[ChangeEvent]) -> ApplyStats:
        """Apply under the generations' lock; counts the embeddings it cost."""
        stats = self.generations.apply_to(self.gen, events)
        self.embedded += stats.embedded
        return stats


class CatalogFollower:
    """The standalone retriever's view of the live generation. A background thread re-reads the catalog every
    `every_s` seconds; after a switch it opens the new collection and its encoder, and only then serves them
    (search never waits on it; the embedder keeps the old collection for a grace period)."""

    def __init__(
        self,
        catalog: Catalog,
        factory: GenerationFactory,
        desired: GenerationSpec,
        every_s: float = 2.0,
        failures: BackgroundFailures | None = None,
    ):
        self.failures = failures or BackgroundFailures()
        self.catalog = catalog
        self.factory = factory
        self.every_s = every_s
        live = catalog.read().live or desired  # an empty store: the embedder will create this one
        self._gen = factory(live)
        self._gen.index.ensure_collection(live.dim)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Follow the catalog once; True when it switched."""
        live = self.catalog.read().live
        if live is None or live.fingerprint == self._gen.spec.fingerprint:
            return False
        gen = self.factory(live)
        gen.index.ensure_collection(live.dim)
        self._gen = gen  # the old pair stays usable by requests holding it; the embedder drops it later
        log.info("following the switch to a new generation", extra={"live": live.as_dict()})
        return True

    def _loop(self) -> None:
        failures = self.failures.loop("reading the catalog (serving the current generation)", log)
        while not self._stop.wait(self.every_s):
            try:
                self.refresh()
                failures.recovered()
            except Exception as exc:
                failures.failed(exc)

    def current(self) -> tuple[VectorIndex, Encoder]:
        """The live pair (never blocks); starts the follower thread on first use."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="catalog-follower", daemon=True)
            self._thread.start()
        gen = self._gen
        return gen.index, gen.encoder

    def close(self) -> None:
        """Stop following; close the collection and the catalog."""
        self._stop.set()
        self._gen.index.close()
        self.catalog.index.close()
