"""Shared test configuration: each test gets the marker of its folder (unit, integration, e2e, faults, scale, gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtide.contracts.machine import quiet_native_teardown

quiet_native_teardown()  # the summary line ends the output, not triton's teardown report
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if kind in {"unit", "integration", "e2e", "faults", "scale", "gpu"}:
            item.add_marker(getattr(pytest.mark, kind))
