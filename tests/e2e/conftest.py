"""The real stack, started once per test session with the same code `make up` uses, on free ports and in a
temporary data folder; stopped by pid at the end."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
import yaml

from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.embedder.generations import Catalog
from ragtide.embedder.index.edge import EdgeIndex
from ragtide.ingest.connector import ensure_topics
from ragtide.ingest.demo import load_demo
from ragtide.stack.postgres import PostgresCluster
from ragtide.stack.process import free_port
from ragtide.stack.stack import Stack

T = TypeVar("T")
POLL_TIMEOUT = float(os.environ.get("RAGTIDE_E2E_POLL_TIMEOUT", "120"))


@dataclass
class LiveStack:
    """Handles for tests: settings, the Stack, and small clients for SQL and the API."""

    settings: RagtideSettings
    stack: Stack
    demo_rows: int
    tenant_rows: dict[str, list[int]]  # public.tickets ids by org

    def sql(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.postgres.dsn(), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def search(self, query: str, k: int = 5, flt: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"query": query, "k": k}
        if flt:
            body["filter"] = flt
        resp = httpx.post(f"{self.settings.api.url}/v1/search", json=body, timeout=30)
        resp.raise_for_status()
        hits: list[dict[str, Any]] = resp.json()["hits"]
        return hits

    def api(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.settings.api.url}{path}", timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus series (summed over the labels not given)."""
        total, found = 0.0, False
        for line in self.api("/metrics").text.splitlines():
            series, _, value = line.rpartition(" ")
            named = series == name or series.startswith(name + "{")
            if named and all(f'{k}="{v}"' in series for k, v in labels.items()):
                total, found = total + float(value), True
        if not found:
            raise KeyError(f"{name} {labels}")
        return total


TICKETS_SOURCE = {"table": "public.tickets", "key": ["id"], "text": "{subject}\n\n{body}", "tenant_column": "org"}
# A table of its own for the TRUNCATE tests (truncating the demo table would wipe the other tests' rows). Its
# topic has 3 partitions (the others 1, the default): Kafka's scale-out, where a TRUNCATE (no key) lands on one
# partition and the rows around it on the others.
SCRATCH_SOURCE = {"table": "public.scratch", "key": ["id"], "text": "{body}"}
SCRATCH_PARTITIONS = 3
TICKETS = [
    (9001, "acme", "Invoice export fails", "The acme billing export to the ledger times out after the vault rotation."),
    (9002, "acme", "SSO login loop", "Acme staff are redirected back to the login page by the okta connector."),
    (9003, "globex", "Payroll export fails", "The globex payroll export to the ledger times out every Friday night."),
    (9004, "globex", "Badge reader offline", "Globex badge readers in the north wing stopped syncing at noon."),
]


def create_tickets(dsn: str) -> dict[str, list[int]]:
    """A multi-tenant table (tenant column `org`) with two tenants' rows, and the empty scratch table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.tickets (id int PRIMARY KEY, org text NOT NULL, subject text, body text)"
        )
        for row in TICKETS:
            conn.execute("INSERT INTO public.tickets VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", row)
        conn.execute("CREATE TABLE IF NOT EXISTS public.scratch (id int PRIMARY KEY, body text)")
    by_org: dict[str, list[int]] = {}
    for i, org, _, _ in TICKETS:
        by_org.setdefault(org, []).append(i)
    return by_org


def live_index(settings: RagtideSettings) -> EdgeIndex:
    """The live generation's collection, opened directly (the node must be stopped: one process owns it)."""
    catalog = EdgeIndex(settings.index_path, f"{settings.index.collection}-catalog")
    try:
        spec = Catalog(catalog).read().live
    finally:
        catalog.close()
    assert spec is not None, "no live generation in the catalog"
    idx = EdgeIndex(settings.index_path, spec.collection(settings.index.collection))
    idx.ensure_collection(spec.dim)
    return idx


def search(settings: RagtideSettings, query: str, k: int = 5, **flt: Any) -> list[dict[str, Any]]:
    """POST /v1/search to a stack's API; `flt` is the request's filter."""
    body: dict[str, Any] = {"query": query, "k": k, **({"filter": flt} if flt else {})}
    resp = httpx.post(f"{settings.api.url}/v1/search", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    hits: list[dict[str, Any]] = resp.json()["hits"]
    return hits


def poll(check: Callable[[], T | None], what: str, timeout: float = POLL_TIMEOUT) -> T:
    """Call `check` until it returns something truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, KeyError) as exc:  # KeyError: a metric series not exported yet
            last = exc
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@contextmanager
def stopped_after(settings: RagtideSettings) -> Iterator[Stack]:
    """A test's own stack: whatever it starts is stopped by pid at the end, and its data folder removed (kept with
    RAGTIDE_E2E_KEEP=1, for reading the logs)."""
    stack = Stack(settings)
    try:
        yield stack
    finally:
        stack.down()
        if os.environ.get("RAGTIDE_E2E_KEEP") != "1":
            shutil.rmtree(settings.data_dir, ignore_errors=True)


def own_stack_settings(prefix: str, extra_sources: list[dict[str, Any]], **overrides: Any) -> RagtideSettings:
    """Settings of a stack of a test suite's own: a temporary data folder, free ports, the product's sources plus
    `extra_sources`, and `overrides` (sections as dicts)."""
    # Postgres runs as the `postgres` user: the data folder must be reachable by it (not under /tmp/pytest-of-root).
    data = Path(tempfile.mkdtemp(prefix=prefix))
    data.chmod(0o755)
    sources = yaml.safe_load((REPO_ROOT / "config" / "sources.yaml").read_text())
    sources["sources"] += extra_sources
    (data / "sources.yaml").write_text(yaml.safe_dump(sources))
    sections: dict[str, Any] = {
        "generator": {"port": free_port()},
        "postgres": {"port": free_port()},
        "kafka": {"port": free_port(), "controller_port": free_port()},
        "connect": {"port": free_port(), "heartbeat_interval_ms": 2000},
        "api": {"port": free_port()},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return load_settings(RagtideSettings, data_dir=data, sources_file=data / "sources.yaml", **sections)


@pytest.fixture(scope="session")
def live() -> Iterator[LiveStack]:
    # The product's sources plus a multi-tenant table (snapshotted with the rest) for the gateway's tests.
    settings = own_stack_settings(
        "ragtide-e2e-", [TICKETS_SOURCE, SCRATCH_SOURCE], index={"retire_grace_s": 5, "indexing_threshold_kb": 100}
    )
    with stopped_after(settings) as stack:
        PostgresCluster(settings, stack.daemon("postgres")).start()
        tenants = create_tickets(settings.postgres.dsn())
        stack.start_postgres()
        rows = load_demo(settings.postgres.dsn())  # before the connector: indexed through Debezium's snapshot
        stack.start_kafka()
        scratch_topic = f"{settings.connect.topic_prefix}.{SCRATCH_SOURCE['table']}"
        created = asyncio.run(ensure_topics(settings, [scratch_topic], partitions=SCRATCH_PARTITIONS))
        assert created == [scratch_topic], f"could not create {scratch_topic} with {SCRATCH_PARTITIONS} partitions"
        stack.start_connect()
        stack.start_generator()
        stack.start_node()
        live = LiveStack(settings, stack, rows, tenants)

        def all_indexed() -> bool:
            stats = live.api("/v1/index/stats").json()
            return bool(stats["tables"]["public.docs"]["rows"] >= rows)

        poll(all_indexed, f"the {rows} demo rows to be indexed", timeout=900)
        stack.wait_ready()
        yield live
