"""The Kafka and Kafka Connect JVMs, started from the jars Maven resolved into .cache/stack."""

from __future__ import annotations

import shutil
from pathlib import Path

from ragtide.contracts import templates
from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings
from ragtide.stack.process import Daemon, http_ok, port_open, run_checked, wait_until

STACK_CACHE = REPO_ROOT / ".cache" / "stack"
LIBS = STACK_CACHE / "libs"
PLUGINS = STACK_CACHE / "plugins"
# Mirrors kafka-run-class.sh's defaults.
JVM_FLAGS = [
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
    "-XX:TieredStopAtLevel=1",
]


def ensure_jars() -> None:
    """Resolve Kafka, Connect and Debezium through Maven (once; cached under .cache/stack)."""
    if any(PLUGINS.glob("debezium-connector-postgres/debezium-connector-postgres-*.jar")) and any(
        LIBS.glob("kafka_2.13-*.jar")
    ):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (mvn) is needed to resolve Kafka and Debezium: apt-get install maven")
    run_checked(
        [mvn, "-q", "-B", "-f", str(REPO_ROOT / "infra" / "maven" / "pom.xml"), "package"],
        "Maven resolving the stack jars",
    )
    if not any(PLUGINS.glob("debezium-connector-postgres/debezium-connector-postgres-*.jar")):
        raise StackError(f"Maven ran but the Debezium plugin is missing under {PLUGINS}")


def _java(heap: str, log_dir: Path, main: list[str]) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise StackError("java (OpenJDK 17+) not found on PATH")
    return [
        java,
        f"-Xms{heap}",
        f"-Xmx{heap}",
        *JVM_FLAGS,
        f"-Dkafka.logs.dir={log_dir}",
        f"-Dlog4j2.configurationFile={templates.CONFIG_DIR / 'log4j2.xml'}",
        "-cp",
        f"{LIBS}/*",
        *main,
    ]


def _append_properties(path: Path, values: dict[str, str]) -> None:
    """Append `values` to a properties file (a later key wins over an earlier one in Java's Properties)."""
    if values:
        with path.open("a", encoding="utf-8") as f:
            f.writelines(f"{k}={_escape(v)}\n" for k, v in values.items())
        path.chmod(0o600)  # it may now hold a SASL password


def _escape(value: str) -> str:
    """A value as Java's Properties reads it back unchanged (a backslash is its escape character)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class KafkaBroker:
    """One KRaft node (broker + controller)."""

    def __init__(
        self,
        settings: RagtideSettings,
        daemon: Daemon,
        extra: dict[str, str] | None = None,
        format_args: tuple[str, ...] = (),
    ) -> None:
        self.s = settings
        self.daemon = daemon
        self.data = settings.data_dir / "kafka"
        self.extra = extra or {}  # properties over the template's (e.g. a test's SASL_SSL listener)
        self.format_args = format_args  # e.g. --add-scram credentials, given when storage is formatted

    def start(self) -> None:
        """Format storage once (keeping the cluster id), start, wait for the listener."""
        self.launch()
        self.wait()

    def wait(self, timeout: float = 90.0) -> None:
        """Until the client listener accepts (a broker of a quorum: once a majority of controllers runs)."""
        k = self.s.kafka
        wait_until(lambda: port_open(k.host, k.port), f"kafka on {k.host}:{k.port}", timeout, self.daemon)

    def launch(self) -> None:
        """Format storage once (keeping the cluster id in `cluster-id`, which a cluster's nodes share) and start."""
        ensure_jars()
        k = self.s.kafka
        conf = templates.write(
            "server.properties",
            {
                "KAFKA_HOST": k.host,
                "KAFKA_PORT": str(k.port),
                "KAFKA_CONTROLLER_PORT": str(k.controller_port),
                "KAFKA_DATA": str(self.data / "logs"),
                "KAFKA_PARTITIONS": str(k.partitions),
            },
            self.data / "server.properties",
        )
        _append_properties(conf, self.extra)
        if not (self.data / "logs" / "meta.properties").exists():
            cluster_id_file = self.data / "cluster-id"
            if not cluster_id_file.exists():
                storage_tool = _java("256m", self.daemon.log_dir, ["kafka.tools.StorageTool", "random-uuid"])
                cid = run_checked(storage_tool, "kafka random-uuid").strip().splitlines()[-1]
                cluster_id_file.write_text(cid)
            cluster_id = cluster_id_file.read_text().strip()
            fmt_args = [
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(conf),
                "--ignore-formatted",
                *self.format_args,
            ]
            run_checked(_java("256m", self.daemon.log_dir, fmt_args), "kafka storage format")
        self.daemon.log_dir.mkdir(parents=True, exist_ok=True)
        self.daemon.start(_java(k.heap, self.daemon.log_dir, ["kafka.Kafka", str(conf)]))


class ConnectWorker:
    """Kafka Connect in distributed mode with the Debezium plugin on plugin.path."""

    def __init__(self, settings: RagtideSettings, daemon: Daemon) -> None:
        self.s = settings
        self.daemon = daemon
        self.data = settings.data_dir / "connect"

    def start(self) -> None:
        """Start the worker and wait until its REST API lists the Debezium plugin."""
        ensure_jars()
        c = self.s.connect
        conf = templates.write(
            "connect-distributed.properties",
            {
                "KAFKA_BOOTSTRAP": self.s.kafka.bootstrap,
                "CONNECT_HOST": c.host,
                "CONNECT_PORT": str(c.port),
                "PLUGIN_PATH": str(PLUGINS),
                "REPLICATION_FACTOR": str(self.s.kafka.replication),
            },
            self.data / "connect-distributed.properties",
        )
        security = self.s.kafka.java_properties()  # the worker's own clients and the connectors' alike
        _append_properties(
            conf, {f"{p}{k}": v for p in ("", "producer.", "consumer.", "admin.") for k, v in security.items()}
        )
        self.daemon.start(
            _java(c.heap, self.daemon.log_dir, ["org.apache.kafka.connect.cli.ConnectDistributed", str(conf)])
        )
        wait_until(lambda: http_ok(f"{c.url}/connector-plugins"), f"kafka connect on {c.url}", 180, self.daemon)
