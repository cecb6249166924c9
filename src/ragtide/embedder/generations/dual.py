"""The embedder's generations at run time: the live one and the one being built, every batch written to both
(dual write) under one lock, with the catalog kept in step: the leader converges, promotes and reaps, a follower
adopts what the catalog names before each batch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.events import ChangeEvent, Op
from ragtide.embedder.encoder import Encoder
from ragtide.embedder.generations.catalog import Catalog, CatalogState, Superseded
from ragtide.embedder.generations.spec import Generation, GenerationFactory, GenerationSpec
from ragtide.embedder.index.base import VectorIndex
from ragtide.embedder.lease import Lease
from ragtide.embedder.verify import TableDrift
from ragtide.embedder.writer import ApplyStats

log = logging.getLogger(__name__)


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


class NotLeading(RuntimeError):
    """A change only the leader makes, asked of a process that does not hold the lease (any more)."""


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
        keep_precision: bool = False,
    ) -> None:
        """`query_encoder`: the encoder search embeds queries with for a generation (default: its writer's; the
        node gives search an engine of its own, so that a query never waits behind a batch's forward passes).
        `keep_precision`: the precision was not configured (encoder.dtype auto), so a leader keeps the live
        generation's for the same model: auto's pick differs by CPU (int8 on AVX2, float elsewhere), and neither a
        leader on another kind of CPU nor an upgrade that changes the pick rebuilds the index (a new model's
        generation takes the configured encoder's own precision)."""
        self.catalog = catalog
        self.keep_precision = keep_precision
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
        # The lease of the replicas (`build_lifecycle` sets it; None: this process is the only writer). Asked right
        # before each catalog write or drop: does this process still hold it, by a fresh round trip
        # (`Lease.confirm`)? A leader cut off from Postgres learns it there, not only at its next renewal, which may
        # hang while its duties go on. Its term goes with every catalog write (catalog.py).
        self.lease: Lease | None = None
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
            if self.lease is not None and state.term > self.lease.term:
                # Written in a term this lease does not count (its table was reset, or the store came from
                # elsewhere): lead in a later one, or every write of this leader would be refused as superseded.
                self.lease.advance(state.term)
            if state.live is None:
                self._adopt(desired, None)
                self._write(CatalogState(live=desired))
                return False
            live, building = state.live, state.building
            if self.keep_precision and live.provider == desired.provider == "local" and live.model == desired.model:
                desired = replace(desired, precision=live.precision)
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
            if building is None and state.term != self._term():  # (a build abandoned above was published)
                self._publish()  # claims this leader's term: from now on an earlier leader's late write is not read
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
                gen.close()  # the leader drops it; this process will not write it again
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
            raise NotLeading(f"this process does not lead the generations: it may not {what}")

    def _fenced(self, what: str) -> None:
        """`_must_lead`, then the lease confirmed by a round trip: the last check before a write to the catalog or
        a drop (called under the lock)."""
        self._must_lead(what)
        if self.lease is not None and not self.lease.confirm():
            raise NotLeading(f"the lease could not be confirmed (Postgres unreachable, or taken over): not {what}")

    def _term(self) -> int:
        return self.lease.term if self.lease is not None else 0

    def _write(self, state: CatalogState) -> None:
        self._fenced("write the catalog")
        try:
            self.catalog.write(replace(state, term=self._term()))
        except Superseded as exc:
            raise NotLeading(f"a later leader took over: not writing the catalog ({exc})") from exc

    def resign(self) -> None:
        """Stop leading: once this returns, no switch, build start or drop of this process is in progress or
        can follow (the next holder of the lease may act)."""
        with self._lock:
            self.leading = False

    def _publish(
        self,
        live: GenerationSpec | None = None,
        retired: list[tuple[float, Generation | None, GenerationSpec]] | None = None,
    ) -> None:
        """Write the catalog: the live generation (or `live`, before switching to it), the build, the retired (or
        `retired`, before forgetting the others)."""
        building = self.building.spec if self.building is not None else None
        live = live or self.live.spec
        listed = self._retired if retired is None else retired
        retired_specs = tuple(spec for _, _, spec in listed if spec.fingerprint != live.fingerprint)
        same = building is not None and building.fingerprint == live.fingerprint
        self._write(CatalogState(live=live, building=None if same else building, retired=retired_specs))

    def _drop_building(self, spec: GenerationSpec) -> None:
        self._fenced("drop a build")
        if self.building is not None and self.building.spec.fingerprint == spec.fingerprint:
            self.building.close()
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
        self._fenced("start a build")
        before = (self.building, self.progress)
        self.building = self._reuse(spec)
        self.progress = BuildProgress()
        try:
            self._publish()
        except Exception:  # the catalog does not name it: neither does this process
            if self.building not in (self._live, before[0]):  # opened for this start: let its index go
                self.building.close()  # (its collection only a leader may drop: that needs the lease)
            self.building, self.progress = before
            raise
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

    def promote(self, expected: str | None = None) -> GenerationSpec:
        """Make the generation being built live, then drop the old collection. `expected`: the fingerprint of the
        build that was verified; another build (the lease lost and taken again while the check ran) is refused."""
        with self._lock:
            self._must_lead("switch generations")
            new = self.building
            if new is None:
                raise RuntimeError("no generation is being built")
            if expected is not None and new.spec.fingerprint != expected:
                raise NotLeading(f"the build changed while {expected} was verified: not switching to an unverified one")
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
            kept = [r for r in self._retired if r not in due]
            due = [r for r in due if r[2].fingerprint not in in_use]  # never the live one, nor the build
            self._publish(retired=kept)  # forgotten only once the catalog no longer names them
            self._retired = kept
            for _, gen, _ in due:  # under the lock: a repair's write to it (apply_to) is not half way through
                if gen is not None:
                    gen.writer.close()
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
                gen.close()
        self.catalog.index.close()


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
