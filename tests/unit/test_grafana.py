"""The Grafana dashboard in infra/ only queries metrics that ragtide actually exports."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry

from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from tests.doubles import HashEncoder


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    EmbedderMetrics(registry)
    tracker = FreshnessTracker(registry)
    sources = SourcesConfig.model_validate({"sources": [{"table": "public.t", "key": ["id"], "text": "{v}"}]})
    settings = load_settings(RagtideSettings, canary={"enabled": False})
    create_app(settings, MemoryIndex(), HashEncoder(), sources, registry, tracker=tracker)
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for metric in registry.collect():
        names.update(metric.name + suffix for suffix in suffixes.get(metric.type, ("",)))
    return names


def test_every_panel_queries_exported_metrics() -> None:
    dash = json.loads((REPO_ROOT / "infra" / "grafana" / "ragtide-dashboard.json").read_text())
    exported = exported_names()
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\bragtide_[a-z_]+", target["expr"]))
    assert used, "the dashboard queries nothing"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("canary", "stage", "lag", "throughput", "skip", "dead-letter"):
        assert topic in titles
