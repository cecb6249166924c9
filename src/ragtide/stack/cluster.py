"""`ragtide up --cluster`: the production topology, natively on one machine, from the same code and settings that
docker-compose and Kubernetes run.

- Qdrant: `cluster.qdrant_nodes` nodes in distributed mode; collections of `index.shards` shards, each with
  `index.replication_factor` copies on different nodes. Every process is given every node (QDRANT_URL lists them).
- Kafka: `cluster.brokers` KRaft nodes (each broker + controller, one quorum), topics replicated
  `kafka.replication_factor` times with `min.insync.replicas` = 2.
- Connect: one worker in distributed mode (more join the same group), Debezium registered as in `make up`.
- Embedders: `cluster.embedders` `ragtide embedder` processes in one consumer group; source topics of
  `cluster.partitions` partitions. The one holding the lease leads the generations.
- Retrievers: `cluster.retrievers` `ragtide retriever` processes; the first answers on `api.port`.

Memory budgets (`cluster.*_heap`, and one torch thread per Python process: 2 cores are shared by all) keep the
whole topology near 7 GB; `Cluster.memory()` reports each process' resident size against its budget.
"""

from __future__ import annotations

import base64
import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ragtide.contracts.settings import RagtideSettings
from ragtide.stack.jvm import ConnectWorker, KafkaBroker
from ragtide.stack.process import Daemon, http_ok, wait_until
from ragtide.stack.qdrant import QdrantServer
from ragtide.stack.stack import Stack

log = logging.getLogger(__name__)

# Resident memory each kind of process is sized for (MiB): the JVM heaps are set to fit, the Python processes are
# measured (model, torch, one thread) and reported against it.
BUDGET_MB = {"broker": 640, "connect": 900, "qdrant": 400, "embedder": 1600, "retriever": 1300}
MAX_REPLICAS = 8  # embedders, and retrievers, the port layout has room for


@dataclass(frozen=True)
class Member:
    """One process of the cluster: its kind, its Daemon, and the port it answers on."""

    kind: str
    daemon: Daemon
    port: int


class Cluster:
    """Start, stop and report the split topology; ports come from `cluster.base_port` (see `port`)."""

    def __init__(self, settings: RagtideSettings) -> None:
        self.s = settings
        self.c = settings.cluster
        self.root = settings.data_dir / "cluster"

    # --- layout ----------------------------------------------------------------------------------------------
    def port(self, kind: str, i: int = 0) -> int:
        """retriever i: base+i; embedder i: base+10+i; Qdrant node i: base+20+3i (http, grpc, p2p); broker i:
        base+40+2i (client, controller); Connect: base+50."""
        b = self.c.base_port
        return {
            "retriever": b + i,
            "embedder": b + 10 + i,
            "qdrant": b + 20 + 3 * i,
            "broker": b + 40 + 2 * i,
            "connect": b + 50,
        }[kind]

    def daemon(self, name: str) -> Daemon:
        """The Daemon of one member (its pid file and log under the cluster's folder)."""
        return Daemon(name, self.root / "run", self.root / "logs")

    def members(self) -> list[Member]:
        """Every process, in start order."""
        out = [Member("qdrant", self.daemon(f"qdrant-{i}"), self.port("qdrant", i)) for i in range(self.c.qdrant_nodes)]
        out += [Member("broker", self.daemon(f"kafka-{i}"), self.port("broker", i)) for i in range(self.c.brokers)]
        out.append(Member("connect", self.daemon("connect"), self.port("connect")))
        out += [Member("embedder", self.daemon(f"embedder-{i}"), self.port("embedder", i)) for i in range(MAX_REPLICAS)]
        out += [
            Member("retriever", self.daemon(f"retriever-{i}"), self.port("retriever", i)) for i in range(MAX_REPLICAS)
        ]
        return out

    def processes(self) -> list[str]:
        """Every process that may run, in start order: Postgres and the local generator (the stack's) with the
        members (the supervisor watches those of them that run)."""
        members = self.members()
        names = [m.daemon.name for m in members]
        first_python = next(i for i, m in enumerate(members) if m.kind == "embedder")
        return ["postgres", *names[:first_python], "generator", *names[first_python:]]

    def tiers(self) -> list[list[str]]:
        """Every process, in dependency tiers: Postgres; the Qdrant nodes, the brokers and the local generator;
        Connect (it needs the brokers); the embedders and the retrievers (they need all of the above but not each
        other)."""
        names = self.processes()
        first = [n for n in names if n.startswith(("qdrant-", "kafka-")) or n == "generator"]
        python = [n for n in names if n.startswith(("embedder-", "retriever-"))]
        return [["postgres"], first, ["connect"], python]

    def start(self, name: str) -> None:
        """Start one process by name (idempotent), e.g. a member the supervisor found dead: `kafka-1` rejoins its
        quorum, `qdrant-0` its cluster (its storage kept), `embedder-2` its consumer group."""
        kind, _, index = name.rpartition("-")
        i = int(index) if index.isdigit() else -1
        if name in ("postgres", "generator"):
            Stack(self.settings).start(name)
        elif name == "connect":
            self.start_connect()
        elif kind == "qdrant" and 0 <= i < self.c.qdrant_nodes:
            self.qdrant_node(i).start(timeout=90)
        elif kind == "kafka" and 0 <= i < self.c.brokers:
            # The other dead brokers too, before waiting: one alone cannot listen while its quorum lacks a majority.
            self.broker(i).launch()
            for j in range(self.c.brokers):
                if j != i and self.daemon(f"kafka-{j}").pid() is None:
                    try:
                        self.broker(j).launch()
                    except Exception as exc:  # its own restart reports it; broker i may still reach a majority
                        log.warning("could not launch a dead broker", extra={"broker": j, "error": str(exc)})
            self.broker(i).wait(timeout=120)
        elif kind == "embedder" and 0 <= i < MAX_REPLICAS:
            self.start_embedder(i)
        elif kind == "retriever" and 0 <= i < MAX_REPLICAS:
            self.start_retriever(i)
        else:
            raise ValueError(f"no process {name!r} in the cluster (one of {', '.join(self.processes())})")

    @property
    def settings(self) -> RagtideSettings:
        """What every ragtide process of the cluster runs with (the first retriever's API port)."""
        s = self.s
        brokers = ",".join(f"127.0.0.1:{self.port('broker', i)}" for i in range(self.c.brokers))
        nodes = ",".join(f"http://127.0.0.1:{self.port('qdrant', i)}" for i in range(self.c.qdrant_nodes))
        return s.model_copy(
            update={
                "data_dir": self.root,
                "qdrant_url": nodes,
                "kafka": s.kafka.model_copy(
                    update={
                        "bootstrap_servers": brokers,
                        "partitions": self.c.partitions,
                        "replication_factor": min(3, self.c.brokers),
                    }
                ),
                "connect": s.connect.model_copy(update={"port": self.port("connect"), "heap": self.c.connect_heap}),
                "index": s.index.model_copy(
                    update={"shards": self.c.shards, "replication_factor": min(2, self.c.qdrant_nodes)}
                ),
                "api": s.api.model_copy(update={"port": self.port("retriever")}),
            }
        )

    def member_settings(self, kind: str, i: int) -> RagtideSettings:
        """One embedder's or retriever's settings: its own port and data folder (the embedder's static group
        membership id comes from it)."""
        s = self.settings
        ack_log = self.ack_log(i) if kind == "embedder" and self.c.ack_logs else s.batch.ack_log
        return s.model_copy(
            update={
                "data_dir": self.root / f"{kind}-{i}",
                "api": s.api.model_copy(update={"port": self.port(kind, i)}),
                "batch": s.batch.model_copy(update={"ack_log": ack_log}),
            }
        )

    def ack_log(self, i: int) -> Path:
        """Embedder i's ack log (with `cluster.ack_logs`)."""
        return self.root / "acks" / f"embedder-{i}.jsonl"

    # --- start -------------------------------------------------------------------------------------------------
    def up(self, progress: Callable[[str], None] = lambda _: None, ragtide: bool = True) -> None:
        """Start everything that is not running yet, in dependency order; idempotent. `ragtide=False`: only the
        engines (Postgres, Qdrant, Kafka, Connect), for a benchmark that starts its own embedders."""
        stack = Stack(self.settings)
        progress("postgres")
        stack.start_postgres()
        progress(f"qdrant: {self.c.qdrant_nodes} nodes")
        self.start_qdrant()
        progress(f"kafka: {self.c.brokers} brokers")
        self.start_kafka()
        progress("connect")
        self.start_connect()
        if not ragtide:
            return
        progress("generator")
        stack.start_generator()
        progress(f"embedders: {self.c.embedders}")
        for i in range(self.c.embedders):
            self.start_embedder(i)
        progress(f"retrievers: {self.c.retrievers}")
        for i in range(self.c.retrievers):
            self.start_retriever(i)

    def qdrant_node(self, i: int) -> QdrantServer:
        """Node i (node 0 founds the cluster; the others bootstrap from it)."""
        http = self.port("qdrant", i)
        first = f"http://127.0.0.1:{self.port('qdrant', 0) + 2}"
        return QdrantServer(
            self.daemon(f"qdrant-{i}"),
            self.root / f"qdrant-{i}",
            http,
            http + 1,
            p2p_port=http + 2,
            bootstrap=None if i == 0 else first,
        )

    def start_qdrant(self) -> None:
        """Every node, one after the other (each joins the consensus through node 0)."""
        for i in range(self.c.qdrant_nodes):
            self.qdrant_node(i).start(timeout=90)
        url = f"http://127.0.0.1:{self.port('qdrant', 0)}/cluster"
        wait_until(lambda: self._peers(url) >= self.c.qdrant_nodes, "every Qdrant node to join the cluster", 60)

    @staticmethod
    def _peers(url: str) -> int:
        import httpx

        return len(httpx.get(url, timeout=2).json()["result"].get("peers", {}))

    def broker(self, i: int) -> KafkaBroker:
        """Broker i: node id i+1 of one KRaft quorum."""
        n = self.c.brokers
        port = self.port("broker", i)
        s = self.s.model_copy(
            update={
                "data_dir": self.root / f"broker-{i}",
                "kafka": self.s.kafka.model_copy(
                    update={"port": port, "controller_port": port + 1, "heap": self.c.broker_heap}
                ),
            }
        )
        voters = [f"{j + 1}@127.0.0.1:{self.port('broker', j) + 1}" for j in range(n)]
        return KafkaBroker(s, self.daemon(f"kafka-{i}"), extra=quorum_properties(i + 1, voters, n))

    def start_kafka(self) -> None:
        """All brokers at once (a quorum needs a majority before any broker listens), then wait for each."""
        cluster_id = self._cluster_id()
        brokers = [self.broker(i) for i in range(self.c.brokers)]
        for b in brokers:
            (b.data / "cluster-id").parent.mkdir(parents=True, exist_ok=True)
            (b.data / "cluster-id").write_text(cluster_id)
            b.launch()
        for b in brokers:
            b.wait(timeout=120)

    def _cluster_id(self) -> str:
        path = self.root / "kafka-cluster-id"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode())
        return path.read_text().strip()

    def start_connect(self) -> None:
        """The Connect worker (distributed mode) and the Debezium connector."""
        ConnectWorker(self.settings, self.daemon("connect")).start()
        Stack(self.settings).register_connectors()

    def _start_python(self, kind: str, i: int, command: str) -> Member:
        s = self.member_settings(kind, i)
        d = self.daemon(f"{kind}-{i}")
        s.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **s.to_env(),
            "RAGTIDE_JSON_LOGS": "true",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",  # every process shares the machine's cores: one torch thread each
            "MALLOC_ARENA_MAX": "2",
        }
        d.start([sys.executable, "-m", "ragtide", command], env=env)
        return Member(kind, d, s.api.port)

    def start_embedder(self, i: int) -> None:
        """Embedder i, answering /healthz (its consumer may still be joining the group)."""
        self.start_embedders([i])

    def start_embedders(self, which: Sequence[int]) -> None:
        """Several embedders at once (they load their models side by side), each answering /healthz."""
        members = [self._start_python("embedder", i, "embedder") for i in which]
        for m in members:
            healthz = partial(http_ok, f"http://127.0.0.1:{m.port}/healthz")
            wait_until(healthz, f"{m.daemon.name} to serve /healthz", 240, m.daemon)

    def start_retriever(self, i: int) -> None:
        """Retriever i, answering /healthz."""
        m = self._start_python("retriever", i, "retriever")
        url = f"http://127.0.0.1:{m.port}/healthz"
        wait_until(lambda: http_ok(url), f"retriever {i} to answer", 240, m.daemon)

    def retriever_urls(self) -> list[str]:
        """The retrievers' base URLs."""
        return [f"http://127.0.0.1:{self.port('retriever', i)}" for i in range(self.c.retrievers)]

    # --- stop, status --------------------------------------------------------------------------------------
    def down(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Stop every member (retrievers and embedders first, Postgres last); data is kept."""
        members = [m for m in reversed(self.members()) if m.daemon.pid() is not None]
        for kind in ("retriever", "embedder", "connect", "broker", "qdrant"):
            # One kind at a time, its members together: the brokers of a quorum stop cleanly only side by side.
            group = [m for m in members if m.kind == kind]
            for m in group:
                progress(m.daemon.name)
            with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
                list(pool.map(lambda m: m.daemon.stop(timeout=60 if m.kind == "embedder" else 30), group))
        stack = Stack(self.settings)
        for name in ("generator", "postgres"):
            progress(name)
            stack.daemon(name).stop(timeout=30)

    def status(self) -> dict[str, int | None]:
        """name -> pid of every member that has a pid file (None: not running)."""
        return {m.daemon.name: m.daemon.pid() for m in self.members() if m.daemon.pid_file.exists()}

    def memory(self) -> dict[str, tuple[int, int]]:
        """name -> (resident MiB, budget MiB) of every running member."""
        out: dict[str, tuple[int, int]] = {}
        for m in self.members():
            pid = m.daemon.pid()
            if pid is not None:
                out[m.daemon.name] = (_rss_mb(pid), BUDGET_MB[m.kind])
        return out


def quorum_properties(node_id: int, voters: Sequence[str] | str, brokers: int) -> dict[str, str]:
    """What node `node_id` of a `brokers`-node KRaft quorum sets over infra/config/server.properties (a single
    node): its id, the voters (`id@host:controller-port`, a list or already joined by commas), and topics, the
    internal ones included, replicated 3 times with `min.insync.replicas` 2 (each at most `brokers`).

    `ragtide up --cluster` appends these to each broker's properties; docker-compose.yml and infra/k8s set the same
    as environment variables (tests/unit/test_compose.py and test_k8s.py hold them to this)."""
    rf, isr = str(min(3, brokers)), str(min(2, brokers))
    return {
        "node.id": str(node_id),
        "controller.quorum.voters": voters if isinstance(voters, str) else ",".join(voters),
        "default.replication.factor": rf,
        "min.insync.replicas": isr,
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
    }


def _rss_mb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0
