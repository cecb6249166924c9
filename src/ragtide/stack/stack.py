"""The whole native stack: start in dependency order, stop in reverse, report status."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from ragtide.contracts.errors import SourceNotReady, StackError
from ragtide.contracts.settings import RagtideSettings
from ragtide.generator.local import server_argv, server_available
from ragtide.ingest import connector, demo, pgsetup
from ragtide.ingest.doctor import Report, diagnose
from ragtide.ingest.resync import detach_source
from ragtide.ingest.sources import SourceDB, source_dbs, sources_of
from ragtide.stack.jvm import ConnectWorker, KafkaBroker
from ragtide.stack.postgres import PostgresCluster, postgres_daemon
from ragtide.stack.process import Daemon, http_ok, wait_until

log = logging.getLogger(__name__)

ORDER = ("postgres", "kafka", "connect", "generator", "node")
# What each process needs started first: the local generator needs nothing of the stack, Connect needs Kafka, the
# node needs Kafka (its topics) and Postgres.
TIERS = (("postgres",), ("kafka", "generator"), ("connect",), ("node",))


@dataclass(frozen=True)
class Stack:
    """The processes `ragtide up` manages, by name."""

    settings: RagtideSettings

    def daemon(self, name: str) -> Daemon:
        """The Daemon handle of one process."""
        if name == "postgres":  # a source the user runs (not managed) has no pid file here: stop is a no-op
            return postgres_daemon(self.settings)
        return Daemon(name, self.settings.data_dir / "run", self.settings.data_dir / "logs")

    def start_postgres(self) -> None:
        """The source databases ready for CDC: the local cluster (when managed) up with its demo table; then, either
        way, `prepare_sources`."""
        if self.settings.postgres.managed:
            PostgresCluster(self.settings, self.daemon("postgres")).start()
            demo.create_demo_table(self.settings.postgres.dsn())
        self.prepare_sources()

    def databases(self) -> list[SourceDB]:
        """The source database and each of the sources file's `databases:`, as settings of their own."""
        return source_dbs(self.settings, sources_of(self.settings))

    def check_sources(self, connect_check: bool = True, dbs: list[SourceDB] | None = None) -> list[tuple[str, Report]]:
        """`ragtide doctor` for every source database."""
        return [(db.name, diagnose(db.settings, db.sources, connect_check)) for db in dbs or self.databases()]

    def prepare_sources(self) -> None:
        """`ragtide doctor`'s checks of every source database (SourceNotReady lists each failure with its fix;
        nothing was created in a user's database yet), then ragtide's control tables in each."""
        dbs = self.databases()
        failed = [f"source database {name}:\n{r.text()}" for name, r in self.check_sources(False, dbs) if not r.ok]
        if failed:
            raise SourceNotReady("not ready for CDC (ragtide doctor):\n" + "\n".join(failed))
        for db in dbs:
            pgsetup.prepare_source_db(db.settings)

    def register_connectors(self) -> list[str]:
        """Create or update each source database's connector; returns the tables added to an existing one."""
        added: list[str] = []
        for db in self.databases():
            new = connector.register(db.settings, db.sources)
            added += [t.id for t in db.sources.all if t.table in new]
        return added

    def start_kafka(self) -> None:
        """The KRaft broker, unless `kafka.bootstrap_servers` names the user's Kafka."""
        if self.settings.kafka.managed:
            KafkaBroker(self.settings, self.daemon("kafka")).start()
        else:
            connector.check_replication(self.settings.kafka)

    def start_connect(self) -> None:
        """Connect up (unless `connect.rest_url` names the user's) and the Debezium connector registered and
        running."""
        if self.settings.connect.managed:
            ConnectWorker(self.settings, self.daemon("connect")).start()
        self.register_connectors()

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

    def start_node(self, code: Path | None = None) -> None:
        """The ragtide node (embedder + retrieval API, owner of the embedded vector index); `code`: the `src` folder
        of another checkout to run instead (a benchmark's baseline)."""
        d = self.daemon("node")
        env = {**self.settings.to_env(), "RAGTIDE_JSON_LOGS": "true", "PYTHONUNBUFFERED": "1"}
        if code is not None:  # only the settings that code knows (a setting added since would be refused)
            known = _settings_known_to(code)
            env = {k: v for k, v in env.items() if k in known or not k.startswith("RAGTIDE_")}
            env["PYTHONPATH"] = str(code)
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
        """After the sources file changed: update the connectors (snapshotting new tables) and restart the node."""
        self.prepare_sources()
        added = self.register_connectors()
        self.daemon("node").stop(timeout=60)
        self.start_node()
        for db in self.databases():
            if db.settings.postgres.source_writes:
                continue
            # no signal table for an incremental snapshot: the node reads the new tables' rows from the source
            for table in (t for t in added if t in db.sources.tables):
                resp = httpx.post(
                    f"{self.settings.api.url}/v1/admin/verify",
                    json={"table": table, "repair": True},
                    timeout=3600,
                    headers=self.settings.gateway.admin_headers(),
                )
                if resp.status_code != 200:
                    raise StackError(f"backfilling {table} from the source failed ({resp.status_code}): {resp.text}")
        return added

    def processes(self) -> tuple[str, ...]:
        """Every process, in start order."""
        return ORDER

    def tiers(self) -> tuple[tuple[str, ...], ...]:
        """Every process, in dependency tiers (for the supervisor: a tier's dead processes start side by side)."""
        return TIERS

    def start(self, name: str) -> None:
        """Start one process by name (`start_<name>`)."""
        if name not in ORDER:
            raise ValueError(f"no process {name!r} in the stack (one of {', '.join(ORDER)})")
        getattr(self, f"start_{name}")()

    def up(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Start everything that is not running yet, in order."""
        for name in ORDER:
            progress(name)
            self.start(name)

    def down(
        self, progress: Callable[[str], None] = lambda _: None, drop_slot: bool = False, force: bool = False
    ) -> list[str]:
        """Stop every process by pid, in reverse order; data is kept. `drop_slot`: first delete the connector with
        its offsets and drop the replication slot (resync.detach_source), so the source keeps no WAL for ragtide;
        the next `up` snapshots every table again. Returns what was dropped."""
        dropped = (
            [w for db in self.databases() for w in detach_source(db.settings, progress, force)] if drop_slot else []
        )
        for name in reversed(ORDER):
            progress(name)
            self.daemon(name).stop(timeout=60 if name == "node" else 30)
        return dropped

    def status(self) -> dict[str, int | None]:
        """name -> pid (None when not running)."""
        return {name: self.daemon(name).pid() for name in ORDER}


def _settings_known_to(code: Path) -> set[str]:
    """The RAGTIDE_* variables the ragtide under `code` writes for its settings."""
    import json
    import os
    import subprocess

    # every field's variable, the unset (None) ones too: to_env() leaves those out
    probe = (
        "import json\n"
        "from pydantic import BaseModel\n"
        "from ragtide.contracts.settings import RagtideSettings\n"
        "names = []\n"
        "def walk(prefix, model):\n"
        "    for name, field in model.model_fields.items():\n"
        "        kind = field.annotation\n"
        "        if isinstance(kind, type) and issubclass(kind, BaseModel):\n"
        "            walk(f'{prefix}{name.upper()}__', kind)\n"
        "        else:\n"
        "            names.append(f'{prefix}{name.upper()}')\n"
        "walk('RAGTIDE_', RagtideSettings)\n"
        "print(json.dumps(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RAGTIDE_")}, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))
