"""Blue/green generations over in-memory collections: dual writes during a build, search on the live one until
the switch, encoder and collection switched together, catalog kept, builds resumed or abandoned on restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from ragtide.contracts.errors import ConfigError, StoreUnavailable
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.embedder.encoder import Encoder, QueryVectors, unprompted, with_query_prefix
from ragtide.embedder.generations import (
    BuildWatcher,
    Catalog,
    CatalogFollower,
    Generation,
    Generations,
    GenerationSpec,
    LockedWriter,
    SearchEncoders,
    encoder_identity,
)
from ragtide.embedder.generations.catalog import CATALOG_POINT, CatalogState, point_id
from ragtide.embedder.index.base import IndexPoint
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.lease import LocalLease, LocalLeases
from ragtide.embedder.verify import TableDrift, verify_table
from ragtide.embedder.worker import is_transient
from ragtide.embedder.writer import PIPELINE_ROWS, IndexWriter
from ragtide.ingest.sources import SourcesConfig
from tests.doubles import HashEncoder, word_chunker

SOURCES = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})
TEXT = " ".join(f"w{i}" for i in range(30))


class OtherModel(HashEncoder):
    """A second "model": another name and dimension."""

    def __init__(self) -> None:
        super().__init__(dim=16)

    @property
    def model_name(self) -> str:
        return "other-model"


class Store:
    """Collections by name, like one Qdrant store, and a factory of generations over it."""

    def __init__(self, pipeline: bool = False) -> None:
        self.pipeline = pipeline  # writers with chunking and write threads (an encoder that spares the CPU)
        self.collections: dict[str, MemoryIndex] = {}
        self.encoders: dict[str, HashEncoder] = {"hash-bow": HashEncoder(), "other-model": OtherModel()}

    def index(self, name: str) -> MemoryIndex:
        return self.collections.setdefault(name, MemoryIndex())

    def factory(self, spec: GenerationSpec) -> Generation:
        index, enc = self.index(spec.collection("chunks")), self.encoders[spec.model]
        chunker = word_chunker(spec.max_tokens, spec.overlap)
        writer = IndexWriter(index, enc, chunker, SOURCES, pipeline=self.pipeline)
        return Generation(spec, index, enc, writer)

    def generations(self) -> Generations:
        return Generations(Catalog(self.index("chunks-catalog")), self.factory)


class ScriptedLease(LocalLease):
    """A held lease (a term of its own among `shared`'s) whose confirmations answer `confirm` in turn."""

    def __init__(self, confirm: Callable[[], bool], shared: LocalLeases | None = None) -> None:
        super().__init__(shared or LocalLeases(), "embedders")
        assert self.hold()
        self.holders.clear()  # the next process may take it: the term stays this one's
        self.answer = confirm

    def confirm(self) -> bool:
        return self.answer()


def spec(model: str = "hash-bow", dim: int = 64, max_tokens: int = 8, revision: int = 1) -> GenerationSpec:
    return GenerationSpec(model=model, dim=dim, max_tokens=max_tokens, overlap=2, revision=revision)


def ev(lsn: int, id_: int, body: str | None, op: Op = Op.UPDATE) -> ChangeEvent:
    row = None if op is Op.DELETE else {"id": id_, "body": body}
    return ChangeEvent("public.docs", op, {"id": id_}, row, SourcePosition(lsn, lsn))


def rows_of(index: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in sorted(index.scroll(), key=lambda p: (p.payload["row_id"], p.payload["chunk_no"])):
        out.setdefault(p.payload["row_id"], []).append(p.payload["text"])
    return out


def test_first_start_makes_the_configured_generation_live() -> None:
    store = Store()
    gens = store.generations()
    assert gens.converge(spec()) is False
    assert gens.building is None
    assert Catalog(store.index("chunks-catalog")).read().live == spec()
    # The same configuration again: nothing to build.
    again = store.generations()
    assert again.converge(spec()) is False and again.live.spec == spec()


def test_a_chunking_change_builds_beside_the_live_generation_and_switches_when_verified() -> None:
    store = Store()
    blue = store.generations()
    blue.converge(spec(max_tokens=8))
    blue.apply([ev(10, 1, TEXT, Op.CREATE), ev(11, 2, "short text", Op.CREATE)])
    before = rows_of(blue.live.index)

    gens = store.generations()  # a restart with max_tokens=12
    assert gens.converge(spec(max_tokens=12)) is True
    assert gens.building is not None and gens.building.spec.revision == 2
    assert gens.current()[0] is gens.live.index and rows_of(gens.current()[0]) == before  # search: still blue

    # The stream goes on during the build: both generations get every change.
    gens.apply([ev(20, 2, "short text edited")])
    assert rows_of(gens.live.index)["2"] == ["short text edited"]
    assert rows_of(gens.building.index)["2"] == ["short text edited"]

    source = [{"id": 1, "body": TEXT}, {"id": 2, "body": "short text edited"}]

    def verify(gen: Generation, table: str, repair: bool) -> TableDrift:
        return verify_table(
            SOURCES.sources[0], SourcePosition(15, 15), source, gen.index, LockedWriter(gens, gen), repair
        )

    watcher = BuildWatcher(gens, SOURCES, verify)
    assert watcher.check() is False  # row 1 has not arrived in the new generation yet
    progress = gens.status()["progress"]
    assert progress["rows_total"] == 2 and progress["rows_done"] == 1 and progress["drift"] == 1

    gens.apply([ev(30, 1, TEXT, Op.READ)])  # Debezium's incremental snapshot delivers row 1
    assert watcher.check() is True
    assert gens.building is None and gens.live.spec.max_tokens == 12 and gens.switches == 1
    new_rows = rows_of(gens.current()[0])
    assert len(new_rows["1"]) < len(before["1"])  # bigger windows: fewer chunks
    catalog = Catalog(store.index("chunks-catalog")).read()
    assert catalog.live == gens.live.spec and catalog.retired == (spec(max_tokens=8),)
    old = store.collections[spec(max_tokens=8).collection("chunks")]
    assert gens.reap() == 0 and old.count() > 0  # requests that hold the old pair may still be searching it
    assert gens.reap(now=time.monotonic() + gens.grace_s) == 1
    assert old.count() == 0 and Catalog(store.index("chunks-catalog")).read().retired == ()


def test_a_model_change_switches_collection_and_query_encoder_together() -> None:
    store = Store()
    store.generations().converge(spec())
    gens = store.generations()
    assert gens.converge(spec(model="other-model", dim=16)) is True
    gens.apply([ev(10, 1, TEXT, Op.CREATE)])
    index, encoder = gens.current()
    assert encoder.model_name == "hash-bow" and encoder.dim == 64
    gens.promote()
    index, encoder = gens.current()
    assert encoder.model_name == "other-model"
    hits = index.search(encoder.encode([TEXT])[0], 1)
    assert hits and hits[0].payload["row_id"] == "1"


def test_a_restart_resumes_the_build_it_was_doing_or_abandons_it_when_the_configuration_moved_on() -> None:
    store = Store()
    store.generations().converge(spec())
    gens = store.generations()
    gens.converge(spec(max_tokens=12))
    building = gens.building
    assert building is not None
    building.writer.apply([ev(10, 1, TEXT, Op.CREATE)])

    resumed = store.generations()
    assert resumed.converge(spec(max_tokens=12)) is True
    assert resumed.building is not None and resumed.building.spec == building.spec
    assert resumed.building.index.count() > 0  # kept what it had built

    reverted = store.generations()
    assert reverted.converge(spec()) is False  # back to the live configuration: the build is dropped
    assert reverted.building is None
    assert store.collections[building.spec.collection("chunks")].count() == 0
    assert Catalog(store.index("chunks-catalog")).read().building is None


def test_rebuild_makes_a_new_revision_of_the_same_vectors() -> None:
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    gens.apply([ev(10, 1, TEXT, Op.CREATE)])
    new = gens.rebuild()
    assert new.revision == 2 and new.same_vectors(spec()) and new.fingerprint != spec().fingerprint
    assert gens.rebuild() == new  # a second request joins the running build
    gens.apply([ev(11, 1, TEXT, Op.READ)])
    gens.promote()
    assert rows_of(gens.current()[0]) == rows_of(store.collections[new.collection("chunks")])


def test_a_stalled_build_is_repaired_from_the_source() -> None:
    store = Store()
    store.generations().converge(spec())
    gens = store.generations()
    gens.converge(spec(max_tokens=12))
    source = [{"id": 1, "body": TEXT}]
    repairs = []

    def verify(gen: Generation, table: str, repair: bool) -> TableDrift:
        repairs.append(repair)
        return verify_table(
            SOURCES.sources[0], SourcePosition(15, 15), source, gen.index, LockedWriter(gens, gen), repair
        )

    watcher = BuildWatcher(gens, SOURCES, verify, stall_checks=2)
    assert [watcher.check() for _ in range(3)] == [False, False, False]
    assert True in repairs  # the snapshot never came: the watcher repaired the drift itself
    assert watcher.check() is True


def test_the_standalone_retriever_follows_a_switch() -> None:
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    follower = CatalogFollower(Catalog(store.index("chunks-catalog")), store.factory, spec(), every_s=0)
    assert follower.current()[1].model_name == "hash-bow"
    gens2 = store.generations()  # the embedder restarts with another model, builds, and switches
    gens2.converge(spec(model="other-model", dim=16))
    assert follower.refresh() is False and follower.current()[1].model_name == "hash-bow"
    gens2.promote()
    assert follower.refresh() is True
    index, encoder = follower.current()
    assert encoder.model_name == "other-model" and index is store.collections[gens2.live.spec.collection("chunks")]


def test_spec_identity_ignores_where_the_model_is_loaded_from() -> None:
    a = spec()
    b = GenerationSpec(model="hash-bow", dim=64, max_tokens=8, overlap=2, model_path="/somewhere/else")
    assert a.fingerprint == b.fingerprint and GenerationSpec.from_dict(b.as_dict()) == b
    assert spec(max_tokens=9).fingerprint != a.fingerprint


def test_precision_is_part_of_the_identity_and_float_keeps_the_old_fingerprints() -> None:
    a = spec()
    assert a.precision == "float" and a.fingerprint == "32eee995df"  # what this spec's fingerprint was before precision
    int8 = GenerationSpec(model="hash-bow", dim=64, max_tokens=8, overlap=2, precision="int8")
    assert int8.fingerprint != a.fingerprint and not int8.same_vectors(a)
    assert GenerationSpec.from_dict(int8.as_dict()) == int8
    old = {k: v for k, v in a.as_dict().items() if k != "precision"}  # a catalog written before precision
    assert GenerationSpec.from_dict(old) == a


def test_a_leader_with_auto_precision_keeps_the_live_generations_and_a_configured_one_rebuilds() -> None:
    """encoder.dtype auto (`keep_precision`): a leader whose CPU would pick other vectors (int8 on AVX2, float on a
    bf16 CPU) keeps the live generation's precision, also when it rebuilds for a chunking change; a configured
    precision rebuilds."""
    store = Store()
    store.generations().converge(spec())  # a float index
    int8 = replace(spec(), precision="int8")

    def leader(keep: bool) -> Generations:
        return Generations(Catalog(store.index("chunks-catalog")), store.factory, keep_precision=keep)

    kept = leader(keep=True)
    assert kept.converge(int8) is False and kept.building is None and kept.live.spec == spec()
    rechunked = leader(keep=True)
    assert rechunked.converge(replace(int8, max_tokens=12)) is True
    assert rechunked.building is not None and rechunked.building.spec.precision == "float"
    configured = leader(keep=False)
    assert configured.converge(int8) is True
    assert configured.building is not None and configured.building.spec.precision == "int8"
    # Another model under auto: its own precision (its int8 never passed the gates), not the live int8 one's.
    int8_store = Store()
    int8_store.generations().converge(int8)
    migrated = Generations(Catalog(int8_store.index("chunks-catalog")), int8_store.factory, keep_precision=True)
    other = GenerationSpec(model="other-model", dim=16, max_tokens=8, overlap=2)
    assert migrated.converge(other) is True and migrated.building is not None
    assert migrated.building.spec.precision == "float" and migrated.live.spec.precision == "int8"


def test_catalog_is_empty_on_a_new_store() -> None:
    catalog = Catalog(MemoryIndex())
    assert catalog.read().live is None
    catalog.write(catalog.read())
    assert catalog.read().live is None


def test_promote_without_a_build_is_an_error() -> None:
    gens = Store().generations()
    gens.converge(spec())
    with pytest.raises(RuntimeError, match="no generation"):
        gens.promote()


def test_a_new_leader_drops_what_the_previous_one_retired_after_the_grace_period() -> None:
    store = Store()
    store.generations().converge(spec())
    gens = store.generations()
    gens.converge(spec(max_tokens=12))
    gens.apply([ev(10, 1, TEXT, Op.CREATE)])
    gens.promote()
    old = store.collections[spec().collection("chunks")]
    assert old.count() > 0
    restarted = store.generations()  # before the grace period ran out (a retriever may still read it)
    assert restarted.converge(spec(max_tokens=12)) is False
    assert restarted.reap() == 0 and old.count() > 0
    assert Catalog(store.index("chunks-catalog")).read().retired == (spec(),)
    assert restarted.reap(now=time.monotonic() + restarted.grace_s) == 1
    assert old.count() == 0 and Catalog(store.index("chunks-catalog")).read().retired == ()


def test_a_follower_writes_where_the_catalog_says_before_every_batch() -> None:
    """Two embedders of one group: the leader starts a build and switches it; the follower's next batch goes to
    both generations during the build and to the new one only after the switch (its events are never missing
    from the generation search reads)."""
    store = Store()
    leader = store.generations()
    leader.converge(spec())
    follower = store.generations()
    follower.leading = False
    follower.follow(spec())
    old, new = spec().collection("chunks"), spec(max_tokens=12, revision=2).collection("chunks")
    follower.apply([ev(10, 1, TEXT, Op.CREATE)])
    assert set(rows_of(store.index(old))) == {"1"} and new not in store.collections

    assert leader.converge(spec(max_tokens=12)) is True  # the leader starts a build
    follower.apply([ev(11, 2, TEXT, Op.CREATE)])
    assert set(rows_of(store.index(new))) == {"2"} and set(rows_of(store.index(old))) == {"1", "2"}
    assert follower.status()["building"]["fingerprint"] == spec(max_tokens=12, revision=2).fingerprint

    leader.apply([ev(10, 1, TEXT, Op.CREATE)])  # row 1 reaches the build, as the snapshot would bring it
    leader.promote()
    follower.apply([ev(12, 3, TEXT, Op.CREATE)])
    assert set(rows_of(store.index(new))) == {"1", "2", "3"}
    assert set(rows_of(store.index(old))) == {"1", "2"}  # retired: the follower no longer writes it
    assert follower.live.spec.fingerprint == spec(max_tokens=12, revision=2).fingerprint
    assert follower.building is None


def test_a_follower_of_an_empty_catalog_opens_what_it_was_asked_for_without_writing_it() -> None:
    store = Store()
    follower = store.generations()
    follower.leading = False
    follower.follow(spec())
    assert follower.live.spec == spec() and Catalog(store.index("chunks-catalog")).read().live is None
    store.generations().converge(spec(max_tokens=12))  # a leader with another configuration wins
    follower.apply([ev(10, 1, TEXT, Op.CREATE)])
    assert follower.live.spec == spec(max_tokens=12)


def test_a_failed_alias_write_switches_nothing() -> None:
    store = Store()
    store.generations().converge(spec())
    gens = store.generations()
    gens.converge(spec(max_tokens=12))
    live_before = gens.live

    def broken(_: Any) -> None:
        raise ConnectionError("store down")

    gens.catalog.write = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        gens.promote()
    assert gens.live is live_before and gens.building is not None  # the watcher will try again


def test_only_snapshot_reads_count_as_build_progress() -> None:
    store = Store()
    store.generations().converge(spec())
    gens = store.generations()
    gens.converge(spec(max_tokens=12))
    gens.apply([ev(10, 1, "canary tick")])  # live traffic (the canary) is not the snapshot arriving
    assert gens.build_batches == 0
    gens.apply([ev(11, 2, TEXT, Op.READ)])
    assert gens.build_batches == 1


def test_search_embeds_with_its_own_encoder_of_the_live_model_and_of_a_migrations_model() -> None:
    """Search never embeds on the writer's encoder (its lock holds whole batches, its threads run niced): the
    configured model's own instance, and for a generation of another model one loaded once; one that cannot be
    loaded leaves search on the writer's."""
    store = Store()
    own = HashEncoder()
    loaded: list[str] = []

    def load(s: GenerationSpec) -> HashEncoder:
        loaded.append(s.model)
        return OtherModel()

    gens = Generations(Catalog(store.index("chunks-catalog")), store.factory, query_encoder=SearchEncoders(own, load))
    gens.converge(spec())
    index, encoder = gens.current()
    assert encoder is own and encoder is not gens.live.encoder and index is gens.live.index
    gens.converge(spec(model="other-model", dim=16))
    gens.promote()
    first, again = gens.current()[1], gens.current()[1]
    assert first is again and first is not gens.live.encoder and first.model_name == "other-model"
    assert loaded == ["other-model"]

    def refuse(s: GenerationSpec) -> HashEncoder:
        raise OSError("no such model folder")

    other = Store()

    def prompted_factory(s: GenerationSpec) -> Generation:  # as the real factory: the writer's encoder prompted
        gen = other.factory(s)
        gen.encoder = with_query_prefix(gen.encoder, s.query_prefix)
        return gen

    fallback = Generations(
        Catalog(other.index("chunks-catalog")), prompted_factory, query_encoder=SearchEncoders(own, refuse)
    )
    fallback.converge(replace(spec(model="other-model", dim=16), query_prefix="query: "))
    _, encoder = fallback.current()  # the writer's model, with the generation's prompt once
    assert encoder.encode(["kafka"]).tolist() == OtherModel().encode(["query: kafka"]).tolist()


def test_a_follower_that_missed_a_switch_takes_over_without_dropping_the_live_generation() -> None:
    """The follower saw the build, never a batch after the switch; the leader goes; the follower leads from the
    catalog, not from its memory: the live generation is the switched one, nothing is being built, and the reaper
    never drops it."""
    store = Store()
    leader = store.generations()
    leader.converge(spec())
    assert leader.converge(spec(max_tokens=12)) is True
    follower = store.generations()
    follower.leading = False
    follower.follow(spec(max_tokens=12))
    assert follower.building is not None
    leader.apply([ev(10, 1, TEXT, Op.CREATE)])
    new = leader.promote()
    assert leader.reap(now=time.monotonic() + leader.grace_s) == 1
    leader.resign()

    follower.leading = True
    assert follower.converge(spec(max_tokens=12)) is False
    assert follower.live.spec.fingerprint == new.fingerprint and follower.building is None
    assert follower.reap(now=time.monotonic() + follower.grace_s) == 0
    assert set(rows_of(store.index(new.collection("chunks")))) == {"1"}
    with pytest.raises(RuntimeError, match="no generation is being built"):
        follower.promote()


def test_a_process_that_resigned_switches_and_drops_nothing() -> None:
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    gens.converge(spec(max_tokens=12))
    gens.resign()  # the lease was lost while a check ran in a thread
    with pytest.raises(RuntimeError, match="does not lead"):
        gens.promote()
    with pytest.raises(RuntimeError, match="does not lead"):
        gens.rebuild()
    assert Catalog(store.index("chunks-catalog")).read().live == spec()


def test_a_leader_whose_lease_cannot_be_confirmed_writes_and_drops_nothing() -> None:
    """Cut off from Postgres, a leader still believes it leads until its renewal says otherwise; every catalog
    write and drop asks the lease first (a round trip), so a switch, a new build or a reap stops there."""
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    gens.apply([ev(10, 1, TEXT, Op.CREATE)])
    gens.converge(spec(max_tokens=12))  # a build in progress
    old = store.index(spec().collection("chunks"))
    catalog = Catalog(store.index("chunks-catalog"))
    before = catalog.read()
    confirmed = [False]
    asked: list[bool] = []

    def fence() -> bool:
        asked.append(confirmed[0])
        return confirmed[0]

    gens.lease = ScriptedLease(fence)
    dropped: list[str] = []
    gens.drop_collection = lambda s: dropped.append(s.fingerprint)
    for change in (gens.promote, lambda: gens.converge(spec(max_tokens=16))):  # a switch; a build abandoned
        with pytest.raises(RuntimeError, match="lease could not be confirmed"):
            change()
    assert catalog.read() == before and dropped == [] and gens.switches == 0
    assert gens.live.spec == spec() and gens.building is not None
    confirmed[0] = True  # still the holder after all: the switch goes through
    gens.promote()
    assert catalog.read().live == gens.live.spec == spec(max_tokens=12, revision=2)
    assert catalog.read().retired == (spec(),)
    confirmed[0] = False
    with pytest.raises(RuntimeError, match="lease could not be confirmed"):
        gens.reap(now=time.monotonic() + 3600)  # the old generation is due, but may not be dropped
    with pytest.raises(RuntimeError, match="lease could not be confirmed"):
        gens.rebuild()  # nor a build started: none is left half-started in this process
    assert gens.building is None and catalog.read().building is None
    assert dropped == [] and old.count() > 0 and asked == [False, False, True, False, False]
    confirmed[0] = True  # the refused reap forgot nothing: the next one drops the old generation
    assert gens.reap(now=time.monotonic() + 3600) == 1 and old.count() == 0
    assert catalog.read().retired == ()


def test_a_late_write_of_a_leader_that_lost_the_lease_is_never_read() -> None:
    """A leader confirmed its lease, then paused past losing it (a GC pause, a frozen VM); a later leader took
    over and wrote the catalog. The old leader's switch, when it resumes, is refused, and a write that slips in
    anyway (a race with the check) is never read: the catalog is the highest term's state."""
    store, shared = Store(), LocalLeases()
    old_leader = store.generations()
    old_leader.lease = ScriptedLease(lambda: True, shared)  # term 1; its confirmation passed before the pause
    old_leader.converge(spec())
    old_leader.apply([ev(10, 1, TEXT, Op.CREATE)])
    old_leader.converge(spec(max_tokens=12))  # a build in progress
    new_leader = store.generations()
    new_leader.lease = ScriptedLease(lambda: True, shared)  # term 2
    new_leader.converge(spec())  # takes over, and abandons that build: the configuration it runs says so
    catalog = Catalog(store.index("chunks-catalog"))
    assert catalog.read() == CatalogState(live=spec(), term=2)
    with pytest.raises(RuntimeError, match="a later leader took over"):
        old_leader.promote()  # would switch search to a build the new leader dropped
    assert catalog.read() == CatalogState(live=spec(), term=2)
    stale = {"live": spec(max_tokens=12, revision=2).as_dict(), "building": None, "retired": [], "term": 1}
    store.index("chunks-catalog").upsert([IndexPoint(point_id(1), np.ones(1, dtype=np.float32), stale)])
    assert catalog.read() == CatalogState(live=spec(), term=2)  # raced in: still not what anyone reads
    follower = store.generations()
    follower.leading = False
    follower.follow()
    assert follower.live.spec == spec() and follower.building is None
    third = store.generations()
    third.lease = ScriptedLease(lambda: True, shared)  # term 3
    third.converge(spec())  # nothing to change, and still it claims its term at once
    assert catalog.read() == CatalogState(live=spec(), term=3)
    with pytest.raises(RuntimeError, match="a later leader took over"):
        new_leader.rebuild()
    assert catalog.read() == CatalogState(live=spec(), term=3)


def test_a_leader_whose_lease_counts_terms_anew_leads_past_the_catalogs_term() -> None:
    """The store was written in term 7 by a lease whose table has since been reset (or the store was moved): the
    new leader's term 1 would be read as older than its own catalog, so it leads in term 8, and its writes are
    read."""
    store = Store()
    Catalog(store.index("chunks-catalog")).write(CatalogState(live=spec(), term=7))
    gens = store.generations()
    gens.lease = LocalLease(LocalLeases(), "embedders")
    assert gens.lease.hold() and gens.lease.term == 1
    gens.converge(spec(max_tokens=12))  # a build of other chunking
    catalog = Catalog(store.index("chunks-catalog"))
    assert gens.lease.term == 8 and catalog.read().term == 8
    assert catalog.read().building == spec(max_tokens=12, revision=2)
    gens.promote()
    assert catalog.read() == CatalogState(live=spec(max_tokens=12, revision=2), retired=(spec(),), term=8)
    kept = {point_id(7), point_id(8), CATALOG_POINT}  # the previous term is kept, and the copy
    assert {p.id for p in store.index("chunks-catalog").scroll()} == kept
    catalog.write(replace(catalog.read(), term=9))
    assert {p.id for p in store.index("chunks-catalog").scroll()} == {point_id(8), point_id(9), CATALOG_POINT}


def test_a_catalog_of_before_terms_is_read_as_term_0_and_its_readers_still_follow() -> None:
    """A store written before terms (one point, no term) is term 0; a leader claims its term over it, and the
    one point that code reads stays a copy of the newest state (readers of that version follow a rolling
    upgrade)."""
    store = Store()
    index = store.index("chunks-catalog")
    before = {"live": spec().as_dict(), "building": None, "retired": [], "updated_ms": 1}
    index.ensure_collection(1)
    index.upsert([IndexPoint(CATALOG_POINT, np.ones(1, dtype=np.float32), before)])
    catalog = Catalog(index)
    assert catalog.read() == CatalogState(live=spec(), term=0)
    gens = store.generations()
    gens.lease = ScriptedLease(lambda: True)  # term 1
    gens.converge(spec(max_tokens=12))
    assert catalog.read().term == 1 and catalog.read().building == spec(max_tokens=12, revision=2)
    copy = next(p.payload for p in index.scroll() if p.id == CATALOG_POINT)
    assert copy["building"] == spec(max_tokens=12, revision=2).as_dict() and copy["term"] == 1


def test_a_catalog_write_whose_tidying_fails_still_counts() -> None:
    """Deleting older terms' points is tidying after the write: its failure neither raises nor undoes the
    caller's change (a switch that was written must not be rolled back in the leader's memory)."""
    store = Store()
    catalog = Catalog(store.index("chunks-catalog"))
    for term in (1, 2):
        catalog.write(CatalogState(live=spec(), term=term))

    def broken(ids: Any) -> None:
        raise StoreUnavailable("the delete failed")

    catalog.index.delete = broken  # type: ignore[method-assign]
    catalog.write(CatalogState(live=spec(max_tokens=12), term=3))  # would delete term 1: fails, quietly
    assert catalog.read() == CatalogState(live=spec(max_tokens=12), term=3)


def test_a_build_start_refused_after_opening_the_build_lets_its_index_go() -> None:
    """The lease is lost while a build is being opened (a model loads for seconds): the start is refused at the
    catalog write, and the index it opened is closed, not kept by a process that forgot it."""
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    answers = iter([True, False])  # confirmed before opening, lost by the time of the catalog write
    gens.lease = ScriptedLease(lambda: next(answers))
    closed: list[str] = []
    opened = store.factory

    def factory(s: GenerationSpec) -> Generation:
        gen = opened(s)
        gen.index.close = lambda: closed.append(s.fingerprint)  # type: ignore[method-assign]
        return gen

    gens.factory = factory
    with pytest.raises(RuntimeError, match="lease could not be confirmed"):
        gens.rebuild()
    assert gens.building is None and closed == [spec(revision=2).fingerprint]
    assert Catalog(store.index("chunks-catalog")).read().building is None


def test_a_switch_goes_only_to_the_build_that_was_verified() -> None:
    """A verify pass that began before the lease was lost and taken again may end after another build started:
    it switches only to the build it verified."""
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    gens.converge(spec(max_tokens=12))
    verified = gens.building.spec.fingerprint if gens.building else ""
    gens.converge(spec(max_tokens=16))  # the configuration moved on meanwhile: another build
    with pytest.raises(RuntimeError, match="unverified"):
        gens.promote(expected=verified)
    assert gens.live.spec == spec() and gens.switches == 0


def test_the_provider_is_part_of_the_identity_and_where_it_is_reached_is_not() -> None:
    a = spec()
    served = GenerationSpec(model="hash-bow", dim=64, max_tokens=8, overlap=2, provider="openai:tei:8080")
    assert served.fingerprint != a.fingerprint and not served.same_vectors(a)
    moved = replace(served, url="http://elsewhere:9000/v1")
    assert moved.fingerprint == served.fingerprint and moved.same_vectors(served)
    assert GenerationSpec.from_dict(moved.as_dict()) == moved
    assert replace(served, provider="openai:api.openai.com").fingerprint != served.fingerprint
    old = {k: v for k, v in a.as_dict().items() if k not in {"provider", "url"}}  # a catalog from before providers
    assert GenerationSpec.from_dict(old) == a and a.fingerprint == "32eee995df"


def test_prompts_are_part_of_the_identity_and_queries_are_prompted_apart() -> None:
    a = spec()
    e5 = replace(a, query_prefix="query: ", document_prefix="passage: ")
    assert e5.fingerprint != a.fingerprint and not e5.same_vectors(a)
    assert replace(e5, query_prefix="").fingerprint not in {a.fingerprint, e5.fingerprint}
    assert GenerationSpec.from_dict(e5.as_dict()) == e5
    encoder = HashEncoder()
    prompted = with_query_prefix(encoder, "query: ")
    assert with_query_prefix(encoder, "") is encoder and unprompted(prompted) is encoder
    assert np.allclose(prompted.encode(["rotate keys"]), encoder.encode(["query: rotate keys"]))
    assert isinstance(prompted, Encoder) and not hasattr(prompted, "encode_mixed")
    vectors = QueryVectors()
    vectors.put(encoder, "rotate keys", np.ones(4, dtype=np.float32))
    assert vectors.get(prompted, "rotate keys") is None  # another prompt, another vector
    assert vectors.get(encoder, "rotate keys") is not None


def test_a_follower_that_cannot_open_the_leaders_new_generation_retries_the_batch_never_dead_letters_it() -> None:
    store = Store()
    leader = store.generations()
    leader.converge(spec())
    follower = store.generations()
    follower.leading = False
    follower.follow(spec())
    leader.converge(spec(max_tokens=12))  # the leader starts a build this follower's configuration cannot open
    opened = store.factory

    def unreachable(s: GenerationSpec) -> Generation:
        if s.max_tokens == 12:
            raise ConfigError("encoder.api.url: the provider refused the start-up probe")
        return opened(s)

    follower.factory = unreachable
    with pytest.raises(StoreUnavailable, match=r"cannot be opened here.*encoder\.api\.url") as err:
        follower.apply([ev(10, 1, TEXT, Op.CREATE)])
    assert is_transient(err.value)  # the worker retries the batch and commits nothing
    follower.factory = opened  # fixed: the same batch goes to both generations
    follower.apply([ev(10, 1, TEXT, Op.CREATE)])
    assert follower.building is not None and "1" in rows_of(follower.building.index)


def test_an_encoder_serves_the_generations_of_its_identity_dimension_included() -> None:
    encoder = HashEncoder(dim=64)
    assert encoder_identity(encoder) == spec(dim=64).encoder_identity != spec(dim=32).encoder_identity
    vectors = QueryVectors()
    vectors.put(encoder, "q", np.ones(64, dtype=np.float32))
    assert vectors.get(HashEncoder(dim=32), "q") is None and vectors.get(HashEncoder(dim=64), "q") is not None


def test_how_a_providers_requests_are_shaped_travels_with_its_generation_outside_its_identity() -> None:
    served = replace(spec(), provider="openai:tei:8080", url="http://tei:8080/v1")
    floats = replace(served, encoding_format="float", normalize=True)
    assert floats.fingerprint == served.fingerprint and floats.same_vectors(served)
    assert GenerationSpec.from_dict(floats.as_dict()) == floats
    old = {k: v for k, v in served.as_dict().items() if k not in {"normalize", "send_dimensions", "encoding_format"}}
    assert GenerationSpec.from_dict(old) == served  # a catalog written before these fields


def test_reap_never_drops_the_live_generation_even_if_the_catalog_lists_it_as_retired() -> None:
    store = Store()
    gens = store.generations()
    gens.converge(spec())
    gens.apply([ev(10, 1, TEXT, Op.CREATE)])
    Catalog(store.index("chunks-catalog")).write(CatalogState(live=spec(), retired=(spec(),)))
    again = store.generations()
    again.converge(spec())
    assert again.reap(now=time.monotonic() + again.grace_s) == 0
    assert store.index(spec().collection("chunks")).count() > 0


def writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("ragtide-write", "ragtide-chunk"))}


def test_a_retired_generations_writer_is_closed_while_no_repair_can_be_writing_to_it() -> None:
    """A repair writes to the generation it started on through apply_to, under the generations' lock; reap closes
    that writer under the same lock, so it never shuts the write threads under a write half way through."""
    store = Store(pipeline=True)
    gens = store.generations()
    gens.converge(spec(max_tokens=8))
    gens.converge(spec(max_tokens=12))
    gens.promote()
    retired = next(gen for _, gen, _ in gens._retired if gen is not None)
    held: list[bool] = []
    close = retired.writer.close

    def try_the_lock() -> None:
        got = gens._lock.acquire(blocking=False)
        held.append(not got)
        if got:
            gens._lock.release()

    def closing() -> None:
        probe = threading.Thread(target=try_the_lock)
        probe.start()
        probe.join()
        close()

    retired.writer.close = closing  # type: ignore[method-assign]
    assert gens.reap(now=time.monotonic() + gens.grace_s) == 1
    assert held == [True]


def test_a_generation_this_process_is_done_with_lets_its_writers_threads_go() -> None:
    store = Store(pipeline=True)
    gens = store.generations()
    gens.converge(spec(max_tokens=8))
    before = writer_threads()
    rows = [ev(10 + i, i, f"row {i} says {TEXT}", Op.CREATE) for i in range(3 * PIPELINE_ROWS)]
    gens.apply(rows)
    blue = writer_threads() - before
    assert len(blue) == 2  # a slice chunked while another is written
    gens.converge(spec(max_tokens=12))
    gens.apply(rows)
    green = writer_threads() - before - blue
    assert len(green) == 2 and all(t.is_alive() for t in blue)  # the stream goes to both during the build
    gens.promote()
    assert gens.reap(now=time.monotonic() + gens.grace_s) == 1
    assert not any(t.is_alive() for t in blue)  # the retired generation's writer stopped its threads
    assert all(t.is_alive() for t in green)
    gens.apply(rows[:1])  # the live one writes on
    gens.close()
    assert not any(t.is_alive() for t in green)
