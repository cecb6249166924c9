"""The live freshness dashboard: one HTML page (assets served by us, installed from npm) and its counters."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from prometheus_client import CollectorRegistry

DASHBOARD_HTML = files("ragtide.retriever").joinpath("static/dashboard.html").read_text(encoding="utf-8")

_SUMS = {
    "events": "ragtide_events_total",
    "embedded": "ragtide_chunks_embedded_total",
    "skipped": "ragtide_chunks_skipped_total",
    "payload_updates": "ragtide_payload_updates_total",
    "deleted": "ragtide_chunks_deleted_total",
    "dlq": "ragtide_dlq_total",
    "stale": "ragtide_events_stale_total",
    "store_retries": "ragtide_store_retries_total",
    "lag_records": "ragtide_consumer_lag_records",
}
_MAXES = {"lag_seconds": "ragtide_consumer_lag_seconds"}


def counters_from(registry: CollectorRegistry) -> dict[str, Any]:
    """Totals of the embedder's counters (summed over labels), lag, and the skip ratio."""
    out: dict[str, Any] = dict.fromkeys((*_SUMS, *_MAXES), 0.0)
    names = {v: k for k, v in _SUMS.items()}
    maxes = {v: k for k, v in _MAXES.items()}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name in names:
                out[names[sample.name]] += sample.value
            elif sample.name in maxes:
                out[maxes[sample.name]] = max(out[maxes[sample.name]], sample.value)
    considered = out["embedded"] + out["skipped"]
    out["skip_ratio"] = round(out["skipped"] / considered, 4) if considered else None
    return out
