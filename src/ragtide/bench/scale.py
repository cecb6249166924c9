"""Scale-out measurements: how many records a rebalance made the embedders apply twice, read from their ack logs
(`batch.ack_log`: one JSON line per acknowledged batch and partition)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Ack:
    """One acknowledged span of one partition."""

    t: float
    topic: str
    partition: int
    first: int
    last: int


def read_ack_logs(paths: Iterable[Path]) -> list[Ack]:
    """Every worker's ack log, in time order (a file that was never written counts as empty)."""
    acks: list[Ack] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d: dict[str, Any] = json.loads(line)
                acks.append(Ack(float(d["t"]), str(d["topic"]), int(d["partition"]), int(d["first"]), int(d["last"])))
    return sorted(acks, key=lambda a: a.t)


def reprocessed(acks: Sequence[Ack], windows: Sequence[tuple[str, float, float]]) -> dict[str, int]:
    """Records acknowledged again (by any worker) after they were acknowledged once, counted in the window
    (name, start, end) where the repeat happened; 'other' counts repeats outside every window."""
    seen: dict[tuple[str, int], set[int]] = {}
    counts = {name: 0 for name, _, _ in windows} | {"other": 0}
    for a in acks:
        offsets = seen.setdefault((a.topic, a.partition), set())
        span = range(a.first, a.last + 1)
        again = sum(1 for o in span if o in offsets)
        offsets.update(span)
        if again:
            name = next((n for n, start, end in windows if start <= a.t < end), "other")
            counts[name] += again
    return counts
