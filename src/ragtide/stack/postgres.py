"""A PostgreSQL 15 cluster under the data folder, run as the non-root `postgres` user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
from pathlib import Path

import psycopg

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import RagtideSettings
from ragtide.stack.process import Daemon, run_checked, wait_until

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    # The slot must never hold unbounded WAL when the connector is down for long.
    "max_slot_wal_keep_size": "2GB",
    # Flush WAL promptly so logical decoding sees commits at once.
    "wal_writer_delay": "10ms",
    "shared_buffers": "128MB",
    "fsync": "on",
}


def _as_postgres(argv: list[str]) -> list[str]:
    """Postgres refuses to run as root: drop to the `postgres` user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


class PostgresCluster:
    """Owns one cluster: initdb once, start, wait, stop."""

    def __init__(self, settings: RagtideSettings, daemon: Daemon, server: dict[str, str] | None = None) -> None:
        self.s = settings
        self.daemon = daemon
        self.server = {**SERVER_SETTINGS, **(server or {})}  # e.g. a test's misconfigured wal_level
        self.pgdata = settings.data_dir / "pg" / "data"
        self.socket_dir = settings.data_dir / "pg" / "run"

    def _bin(self, name: str) -> str:
        path = self.s.postgres.bin_dir / name
        if not path.exists():
            found = shutil.which(name)
            if not found:
                raise StackError(f"PostgreSQL binary {name} not found in {self.s.postgres.bin_dir} (postgres.bin_dir)")
            return found
        return str(path)

    def init(self) -> None:
        """initdb, unless the cluster already exists."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        for d in (self.pgdata.parent, self.pgdata, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            _chown_to_postgres(d)
        os.chmod(self.pgdata, 0o700)
        initdb = [
            self._bin("initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            self.s.postgres.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]
        run_checked(_as_postgres(initdb), "initdb")

    def start(self) -> None:
        """Start the server (idempotent) and wait until it accepts connections."""
        self.init()
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_to_postgres(self.socket_dir)
        argv = [
            self._bin("postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.s.postgres.port),
            "-c",
            f"listen_addresses={self.s.postgres.host}",
            "-k",
            str(self.socket_dir),
        ]
        for k, v in self.server.items():
            argv += ["-c", f"{k}={v}"]
        self.daemon.start(_as_postgres(argv))
        wait_until(self.ready, "postgres to accept connections", 60, self.daemon)
        self.ensure_database()

    def ready(self) -> bool:
        """True when the server answers a query."""
        with psycopg.connect(self.s.postgres.dsn("postgres"), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def ensure_database(self) -> None:
        """Create the application database if it does not exist."""
        with psycopg.connect(self.s.postgres.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.s.postgres.database,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.s.postgres.database}"')


def postgres_daemon(settings: RagtideSettings) -> Daemon:
    """The postgres Daemon: fast shutdown (SIGINT) so an attached replication client cannot block it."""
    return Daemon("postgres", settings.data_dir / "run", settings.data_dir / "logs", stop_signal=signal.SIGINT)
