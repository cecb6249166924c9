"""The fault suite's verdict: lost, stale and ghost rows are told apart (so its 'all zero' can fail)."""

from __future__ import annotations

from ragtide.bench.faults import classify


def test_lost_stale_and_ghost_rows_are_told_apart() -> None:
    current = {1: "v2", 2: "v1", 3: "v1", 5: "v1"}
    found = {1: {"v1"}, 2: set(), 3: {"v1"}, 4: {"v9"}, 5: {"v1", "v0"}, 6: set()}
    report = classify(current, found)
    assert (report.lost, report.stale, report.ghosts) == ([2], [1, 5], [4])
    assert (report.rows_checked, report.live_rows) == (6, 4)
    clean = classify({1: "a"}, {1: {"a"}, 2: set()})
    assert (clean.lost, clean.stale, clean.ghosts) == ([], [], [])
