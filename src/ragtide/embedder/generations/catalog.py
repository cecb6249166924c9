"""The catalog: the alias naming the live generation, the one being built and the retired ones, stored in a small
collection in the same store as the generations.

Each leader writes under its lease's term (lease.py), as a point of that term, and the state of the highest term
is the catalog. A leader that lost the lease and still writes (paused between its lease check and its write, say)
writes a lower term than its successor's, so nobody reads it: the successor claims its term with a write as soon
as it leads (`Generations.converge`), and from then on a late write of an earlier leader changes nothing. The
store needs no conditional write for this.

Every write also copies the state to the one point ragtide used before terms (`CATALOG_POINT`, read as term 0 when
it has none): readers of that version still follow during a rolling upgrade, and a reader that misses the newest
term's point (a lagging replica) still finds that copy, never an empty catalog. Points of terms older than the
previous one are deleted after a write."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

from ragtide.embedder.generations.spec import GenerationSpec
from ragtide.embedder.index.base import IndexPoint, StoredPoint, VectorIndex

log = logging.getLogger(__name__)

CATALOG_POINT = str(uuid.uuid5(uuid.NAMESPACE_URL, "ragtide:catalog"))  # the copy (see the module), and term 0


def point_id(term: int) -> str:
    """The point a term's state is stored as."""
    return CATALOG_POINT if term == 0 else str(uuid.uuid5(uuid.NAMESPACE_URL, f"ragtide:catalog:{term}"))


class Superseded(RuntimeError):
    """A catalog write under a term older than the one the catalog already has: a later leader took over."""


@dataclass(frozen=True)
class CatalogState:
    """Which generation is live, and which is being built."""

    live: GenerationSpec | None = None
    building: GenerationSpec | None = None
    retired: tuple[GenerationSpec, ...] = ()  # switched away from; dropped after a grace period
    term: int = 0  # the lease term of the leader that wrote it


class Catalog:
    """The alias, stored as points of a 1-d collection in the same store as the generations (see the module)."""

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        index.ensure_collection(1)

    def _points(self) -> list[tuple[int, StoredPoint]]:
        """Every term's point, highest term first."""
        points = [(int(p.payload.get("term") or 0), p) for p in self.index.scroll(limit=1_000) if p.payload]
        return sorted(points, key=lambda tp: tp[0], reverse=True)

    def read(self) -> CatalogState:
        """The current state: the highest term's (empty on a new store)."""
        points = self._points()
        if not points:
            return CatalogState()
        term, point = points[0]
        payload = point.payload
        live, building = payload.get("live"), payload.get("building")
        return CatalogState(
            GenerationSpec.from_dict(live) if live else None,
            GenerationSpec.from_dict(building) if building else None,
            tuple(GenerationSpec.from_dict(r) for r in payload.get("retired") or []),
            term,
        )

    def write(self, state: CatalogState) -> None:
        """Write the state under `state.term` (and its copy), then forget terms before the previous one. Raises
        `Superseded` when a higher term was already written (a check before the write: a write that races it is
        still never read)."""
        points = self._points()
        newer = [term for term, _ in points if term > state.term]
        if newer:
            raise Superseded(f"the catalog has term {max(newer)}, newer than this leader's {state.term}")
        payload = {
            "live": state.live.as_dict() if state.live else None,
            "building": state.building.as_dict() if state.building else None,
            "retired": [r.as_dict() for r in state.retired],
            "term": state.term,
            "updated_ms": int(time.time() * 1000),
        }
        vector = np.ones(1, dtype=np.float32)
        self.index.upsert(
            [IndexPoint(i, vector, payload) for i in dict.fromkeys((point_id(state.term), CATALOG_POINT))]
        )
        # The write is done; what follows only tidies (a failure there must not undo the caller's change). The
        # points read before the write are those of older terms: the write added only its own.
        earlier = [(term, p.id) for term, p in points if term < state.term and p.id != CATALOG_POINT]
        previous = earlier[0][0] if earlier else None  # kept: a reader that misses the newest still finds it
        older = [pid for term, pid in earlier if term != previous]
        try:
            if older:
                self.index.delete(older)
        except Exception as exc:
            log.warning("could not delete the catalog's older terms", extra={"error": repr(exc)})
