"""The fault suite's stack: native, on free ports and a temporary data folder, without the local generator, with
the load's table `public.faults` among the sources; started once for the suite, stopped by pid at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from ragtide.bench.faults import DDL, SOURCE
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.stack.postgres import PostgresCluster
from ragtide.stack.process import free_port
from ragtide.stack.stack import Stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A native stack of its own (free ports, a temporary data folder), without the local generator."""
    data = Path(tempfile.mkdtemp(prefix="ragtide-faults-"))
    data.chmod(0o755)  # Postgres runs as `postgres`
    sources = yaml.safe_load((REPO_ROOT / "config" / "sources.yaml").read_text())
    sources["sources"].append(SOURCE)
    (data / "sources.yaml").write_text(yaml.safe_dump(sources))
    settings = load_settings(
        RagtideSettings,
        data_dir=data,
        sources_file=data / "sources.yaml",
        postgres={"port": free_port()},
        kafka={"port": free_port(), "controller_port": free_port()},
        connect={"port": free_port(), "heartbeat_interval_ms": 2000},
        api={"port": free_port()},
        generator={"local": False},
        batch={"degraded_after_s": 10},
    )
    st = Stack(settings)
    try:
        PostgresCluster(settings, st.daemon("postgres")).start()
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
            conn.execute(DDL)  # before the sources are checked and the connector's publication is made
        st.start_postgres()
        st.start_kafka()
        st.start_connect()
        st.start_node()
        st.wait_ready()
        yield st
    finally:
        st.down()
        if os.environ.get("RAGTIDE_E2E_KEEP") != "1":
            shutil.rmtree(data, ignore_errors=True)
