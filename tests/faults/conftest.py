"""The fault suite's stack: native, on free ports and a temporary data folder, without the local generator, with
the load's table `public.faults` among the sources; started once for the suite, stopped by pid at the end."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from ragtide.bench.faults import DDL, SOURCE
from ragtide.stack.postgres import PostgresCluster
from ragtide.stack.stack import Stack
from tests.e2e.conftest import own_stack_settings, stopped_after


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A native stack of its own (free ports, a temporary data folder), without the local generator."""
    settings = own_stack_settings(
        "ragtide-faults-", [SOURCE], generator={"local": False}, batch={"degraded_after_s": 10}
    )
    with stopped_after(settings) as st:
        PostgresCluster(settings, st.daemon("postgres")).start()
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
            conn.execute(DDL)  # before the sources are checked and the connector's publication is made
        st.start_postgres()
        st.start_kafka()
        st.start_connect()
        st.start_node()
        st.wait_ready()
        yield st
