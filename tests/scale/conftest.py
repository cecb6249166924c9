"""The scale suite's cluster: `ragtide up --cluster` on free ports and a temporary data folder (3 Qdrant nodes,
3 KRaft brokers, Connect, the local generator, 1 embedder to begin with, 2 retrievers sharing an answer cache of
3 entries), the fault suite's table among the sources, the embedders' ack logs on; started once for the suite,
stopped by pid at the end. Skipped where no Qdrant binary was built (`.ci/run` says so loudly)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import psycopg
import pytest

from ragtide.bench.faults import DDL, SOURCE
from ragtide.contracts.settings import CLUSTER_PORT_SPAN
from ragtide.stack.cluster import Cluster
from ragtide.stack.postgres import PostgresCluster
from ragtide.stack.process import free_port_range
from ragtide.stack.qdrant import qdrant_binary
from tests.e2e.conftest import own_stack_settings


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if qdrant_binary() is None:
        pytest.skip("no Qdrant binary: build it once with `make qdrant`")
    settings = own_stack_settings(
        "ragtide-scale-",
        [SOURCE],
        cluster={"base_port": free_port_range(CLUSTER_PORT_SPAN), "embedders": 1, "retrievers": 2, "ack_logs": True},
        kafka={"session_timeout_s": 10},
        index={"retire_grace_s": 5},
        canary={"enabled": False},
        cache={"max_entries": 3},
    )
    c = Cluster(settings)
    try:
        PostgresCluster(c.settings, c.daemon("postgres")).start()
        with psycopg.connect(c.settings.postgres.dsn(), autocommit=True) as conn:
            conn.execute(DDL)  # before the sources are checked and the connector's publication is made
        c.up(lambda what: print(f"starting {what}", flush=True))
        yield c
    finally:
        c.down()
        if os.environ.get("RAGTIDE_E2E_KEEP") != "1":
            shutil.rmtree(settings.data_dir, ignore_errors=True)
