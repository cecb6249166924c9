"""An in-memory VectorIndex for unit tests: brute-force cosine over a dict, same semantics as Qdrant."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ragtide.embedder.index.base import (
    Filter,
    Hit,
    IndexPoint,
    NormalValue,
    Range,
    StoredPoint,
    normalise_filter,
)


def _get(payload: Mapping[str, Any], path: str) -> Any:
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def matches(payload: Mapping[str, Any], conds: Sequence[tuple[str, NormalValue]]) -> bool:
    """Qdrant's `must` semantics over a normalised filter."""
    for key, want in conds:
        have = _get(payload, key)
        values = have if isinstance(have, list) else [have]
        if isinstance(want, Range):
            if not any(want.holds(v) for v in values):
                return False
            continue
        wanted = want if isinstance(want, list) else [want]
        if not any(v in wanted for v in values):
            return False
    return True


class MemoryIndex:
    """A dict of id -> (vector, payload)."""

    def __init__(self) -> None:
        self.points: dict[str, tuple[npt.NDArray[np.float32], dict[str, Any]]] = {}
        self.dim: int | None = None
        self.writes = 0

    def ensure_collection(self, dim: int) -> None:
        """Remember the dimension."""
        self.dim = self.dim or dim

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace."""
        for p in points:
            v = np.asarray(p.vector, dtype=np.float32)
            if self.dim is not None and v.shape != (self.dim,):
                raise ValueError(f"vector of shape {v.shape}, collection has dim {self.dim}")
            self.points[p.id] = (v / (np.linalg.norm(v) or 1.0), dict(p.payload))
        self.writes += 1

    def set_payload(self, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Merge payload fields."""
        for i in ids:
            if i in self.points:
                self.points[i][1].update(payload)
        self.writes += 1

    def delete(self, ids: Sequence[str]) -> None:
        """Delete by id."""
        for i in ids:
            self.points.pop(i, None)
        self.writes += 1

    def delete_where(self, flt: Filter) -> None:
        """Delete matching points."""
        if not flt:
            raise ValueError("refusing to delete with an empty filter")
        conds = normalise_filter(flt)
        for i in [i for i, (_, p) in self.points.items() if matches(p, conds)]:
            del self.points[i]
        self.writes += 1

    def scroll(self, flt: Filter | None = None, limit: int = 10_000) -> list[StoredPoint]:
        """Matching points, ordered by id like Qdrant."""
        conds = normalise_filter(flt)
        return [StoredPoint(i, dict(p)) for i, (_, p) in sorted(self.points.items()) if matches(p, conds)][:limit]

    def search(self, vector: npt.NDArray[np.float32], k: int, flt: Filter | None = None) -> list[Hit]:
        """Brute-force cosine."""
        q = np.asarray(vector, dtype=np.float32)
        q = q / (np.linalg.norm(q) or 1.0)
        conds = normalise_filter(flt)
        scored = [Hit(i, float(v @ q), dict(p)) for i, (v, p) in self.points.items() if matches(p, conds)]
        return sorted(scored, key=lambda h: -h.score)[:k]

    def count(self, flt: Filter | None = None) -> int:
        """Exact count."""
        conds = normalise_filter(flt)
        return sum(1 for _, p in self.points.values() if matches(p, conds))

    def close(self) -> None:
        """Nothing to release."""

    def optimize(self) -> dict[str, Any]:
        """Brute force is all there is."""
        return {"optimized": False, "points": len(self.points)}

    def drop(self) -> None:
        """Forget every point."""
        self.points.clear()
        self.dim = None
