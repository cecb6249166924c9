"""A Qdrant server run natively from the binary `infra/scripts/build-qdrant.sh` builds (no Docker engine needed):
one node, or a node of a distributed cluster, its storage under the data folder, started and stopped by pid like
the rest of the stack."""

from __future__ import annotations

import os
from pathlib import Path

from ragtide.contracts.errors import StackError
from ragtide.stack.process import Daemon, http_ok, wait_until

# What build-qdrant.sh builds and the tests run: the newest tag whose git dependencies can be had without network.
# docker-compose and Kubernetes run the official v1.20 image (the README names the gap).
QDRANT_VERSION = "v1.16.3"


def qdrant_binary(version: str = QDRANT_VERSION) -> Path | None:
    """The cached build of `version` (RAGTIDE_QDRANT_BIN overrides), or None when it was never built."""
    override = os.environ.get("RAGTIDE_QDRANT_BIN")
    cache = Path(os.environ.get("RAGTIDE_QDRANT_CACHE", Path.home() / ".cache" / "ragtide" / "qdrant"))
    path = Path(override) if override else cache / version / "qdrant"
    return path if path.is_file() and os.access(path, os.X_OK) else None


class QdrantServer:
    """One Qdrant node on `http_port` (gRPC on `grpc_port`), storing under `storage`."""

    def __init__(
        self,
        daemon: Daemon,
        storage: Path,
        http_port: int,
        grpc_port: int,
        binary: Path | None = None,
        p2p_port: int | None = None,
        bootstrap: str | None = None,
    ):
        """`p2p_port`: a node of a distributed cluster (Raft consensus and shard transfers on that port);
        `bootstrap`: the p2p URL of a node already in the cluster (none for the first)."""
        self.daemon = daemon
        self.storage = storage
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.binary = binary or qdrant_binary()
        self.p2p_port = p2p_port
        self.bootstrap = bootstrap

    @property
    def p2p_url(self) -> str | None:
        """How other nodes reach this one (distributed mode)."""
        return f"http://127.0.0.1:{self.p2p_port}" if self.p2p_port else None

    @property
    def url(self) -> str:
        """What QDRANT_URL is set to."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start (idempotent) and wait until it is ready; the storage and its WAL survive restarts."""
        if self.binary is None:
            raise StackError(
                f"no Qdrant {QDRANT_VERSION} binary: build it once with infra/scripts/build-qdrant.sh (make qdrant)"
            )
        self.storage.mkdir(parents=True, exist_ok=True)
        env = {
            "QDRANT__SERVICE__HOST": "127.0.0.1",
            "QDRANT__SERVICE__HTTP_PORT": str(self.http_port),
            "QDRANT__SERVICE__GRPC_PORT": str(self.grpc_port),
            "QDRANT__STORAGE__STORAGE_PATH": str(self.storage / "storage"),
            "QDRANT__STORAGE__SNAPSHOTS_PATH": str(self.storage / "snapshots"),
            "QDRANT__TELEMETRY_DISABLED": "true",
        }
        argv = [str(self.binary)]
        if self.p2p_port is not None:
            env["QDRANT__CLUSTER__ENABLED"] = "true"
            env["QDRANT__CLUSTER__P2P__PORT"] = str(self.p2p_port)
            argv += ["--uri", str(self.p2p_url)]
            if self.bootstrap:
                argv += ["--bootstrap", self.bootstrap]
        self.daemon.start(argv, env=env, cwd=self.storage)
        wait_until(lambda: http_ok(f"{self.url}/readyz"), f"qdrant on {self.url}", timeout, self.daemon)
