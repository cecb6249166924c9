"""The catalog: the alias naming the live generation, the one being built and the retired ones, stored as one
point of a small collection in the same store as the generations."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from ragtide.embedder.generations.spec import GenerationSpec
from ragtide.embedder.index.base import IndexPoint, VectorIndex

CATALOG_POINT = str(uuid.uuid5(uuid.NAMESPACE_URL, "ragtide:catalog"))


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
