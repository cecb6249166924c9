"""The whole native stack: start in dependency order, stop in reverse, report status."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ragtide.contracts.settings import RagtideSettings
from ragtide.generator.local import server_argv, server_available
from ragtide.ingest import connector, demo, pgsetup
from ragtide.ingest.sources import load_sources
from ragtide.stack.jvm import ConnectWorker, KafkaBroker
from ragtide.stack.postgres import PostgresCluster, postgres_daemon
from ragtide.stack.process import Daemon, http_ok, wait_until

log = logging.getLogger(__name__)

ORDER = ("postgres", "kafka", "connect", "generator", "node")


@dataclass(frozen=True)
class Stack:
    """The processes `ragtide up` manages, by name."""

    settings: RagtideSettings

    def daemon(self, name: str) -> Daemon:
        """The Daemon handle of one process."""
        if name == "postgres":
            return postgres_daemon(self.settings)
        return Daemon(name, self.settings.data_dir / "run", self.settings.data_dir / "logs")

    def start_postgres(self) -> None:
        """Postgres up, database created, control and demo tables in place."""
        PostgresCluster(self.settings, self.daemon("postgres")).start()
        dsn = self.settings.postgres.dsn()
        demo.create_demo_table(dsn)
        pgsetup.prepare_source_db(dsn, load_sources(self.settings.sources_file))

    def start_kafka(self) -> None:
        """The KRaft broker."""
        KafkaBroker(self.settings, self.daemon("kafka")).start()

    def start_connect(self) -> None:
        """Connect up and the Debezium connector registered and running."""
        ConnectWorker(self.settings, self.daemon("connect")).start()
        connector.register(self.settings, load_sources(self.settings.sources_file))

    def start_generator(self) -> None:
        """The local OpenAI-compatible generator (llama.cpp's server, SmolLM2), unless an external one is set."""
        g = self.settings.generator
        if not g.local or g.url:
            return
        if not server_available():
            log.warning("llama-cpp-python[server] is not installed: /v1/answer will answer 503 (search works)")
            return
        d = self.daemon("generator")
        d.start(server_argv(g))
        wait_until(lambda: http_ok(f"{g.endpoint}/models"), "the local generator (llama.cpp) to answer", 120, d)

    def start_node(self) -> None:
        """The ragtide node (embedder + retrieval API, owner of the embedded vector index)."""
        d = self.daemon("node")
        env = {**self.settings.to_env(), "RAGTIDE_JSON_LOGS": "true", "PYTHONUNBUFFERED": "1"}
        d.start([sys.executable, "-m", "ragtide", "node"], env=env)
        wait_until(lambda: http_ok(f"{self.settings.api.url}/healthz"), "the ragtide node to answer", 240, d)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until /readyz: the index answers and the canary made a round trip through every component."""
        wait_until(
            lambda: http_ok(f"{self.settings.api.url}/readyz"),
            "the pipeline to be ready (canary)",
            timeout,
            self.daemon("node"),
        )

    def apply_sources(self) -> list[str]:
        """After the sources file changed: update the connector (snapshotting new tables) and restart the node."""
        sources = load_sources(self.settings.sources_file)
        pgsetup.prepare_source_db(self.settings.postgres.dsn(), sources)
        added = connector.register(self.settings, sources)
        self.daemon("node").stop(timeout=60)
        self.start_node()
        return added

    def up(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Start everything that is not running yet, in order."""
        for name in ORDER:
            progress(name)
            getattr(self, f"start_{name}")()

    def down(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Stop every process by pid, in reverse order; data is kept."""
        for name in reversed(ORDER):
            progress(name)
            self.daemon(name).stop(timeout=60 if name == "node" else 30)

    def status(self) -> dict[str, int | None]:
        """name -> pid (None when not running)."""
        return {name: self.daemon(name).pid() for name in ORDER}
