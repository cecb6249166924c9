"""A user's own database for tests: a PostgreSQL cluster apart from the one `ragtide up` manages (its own data
folder and port), with the server settings and roles a test chooses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.stack.postgres import PostgresCluster, postgres_daemon
from ragtide.stack.process import free_port


@dataclass
class SourceDB:
    """A running cluster: superuser SQL, and DSNs of other roles."""

    port: int
    database: str
    data: Path

    def dsn(self, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.database}"

    def sql(self, statement: str, params: Any = None, user: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn(user), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []


@contextmanager
def source_db(database: str = "shop", **server: str) -> Iterator[SourceDB]:
    """Start a cluster (trust auth on loopback) with `server` settings over the product's; stop and remove it."""
    data = Path(tempfile.mkdtemp(prefix="ragtide-userdb-"))
    data.chmod(0o755)
    port = free_port()
    settings = load_settings(RagtideSettings, data_dir=data, postgres={"port": port, "database": database})
    daemon = postgres_daemon(settings)
    try:
        PostgresCluster(settings, daemon, server).start()
        yield SourceDB(port, database, data)
    finally:
        daemon.stop(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
