"""Benchmarks that run from one command against the running stack and print side-by-side comparisons."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def save_result(result: Any, out: Path, kind: str, stamp: str | None = None) -> Path:
    """Write a benchmark's JSON result as `<out>/<kind>-<time>.json` (stdlib only: the GPU box imports it too)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{stamp or time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
