"""Counting what a rebalance made the embedders apply twice, from their ack logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtide.bench.scale import read_ack_logs, reprocessed

pytestmark = pytest.mark.unit


def test_repeats_are_counted_in_the_window_where_they_happened(tmp_path: Path) -> None:
    def log(name: str, *lines: tuple[float, int, int, int]) -> Path:
        path = tmp_path / name
        path.write_text(
            "".join(
                json.dumps({"t": t, "topic": "x", "partition": p, "first": a, "last": b, "records": b - a + 1}) + "\n"
                for t, p, a, b in lines
            )
        )
        return path

    first = log("a.jsonl", (1.0, 0, 0, 9), (2.0, 1, 0, 4), (3.0, 0, 10, 14))  # then a is killed
    second = log("b.jsonl", (5.0, 0, 12, 20), (6.0, 1, 5, 9), (9.0, 1, 3, 9))
    acks = read_ack_logs([first, second, tmp_path / "never-written.jsonl"])
    assert [a.t for a in acks] == [1.0, 2.0, 3.0, 5.0, 6.0, 9.0]
    counts = reprocessed(acks, [("kill a", 4.0, 7.0), ("stop b", 7.0, 8.0)])
    assert counts == {"kill a": 3, "stop b": 0, "other": 7}  # 12..14 again; then 3..9 of partition 1 again
