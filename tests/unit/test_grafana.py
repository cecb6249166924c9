"""The Grafana dashboard in infra/ only queries metrics that ragtide actually exports."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import CollectorRegistry

from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.logging import BackgroundFailures
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.ingest.slot import SlotMonitor
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
    SlotMonitor([("postgresql://unused@127.0.0.1/x", "ragtide_slot")], registry, 10.0, BackgroundFailures.of(registry))
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


def test_the_alert_rules_query_exported_metrics_and_watch_the_slot() -> None:
    rules = yaml.safe_load((REPO_ROOT / "infra" / "grafana" / "alert-rules.yaml").read_text())
    exprs = {
        rule["uid"]: q["model"]["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        for q in rule["data"]
        if "expr" in q["model"]
    }
    used = {m for e in exprs.values() for m in re.findall(r"\bragtide_[a-z_]+", e)}
    assert used == {"ragtide_slot_retained_wal_bytes", "ragtide_slot_lost"}
    assert used <= exported_names()
    for group in rules["groups"]:
        for rule in group["rules"]:  # every rule's condition is one of its own queries
            assert rule["condition"] in {q["refId"] for q in rule["data"]}
