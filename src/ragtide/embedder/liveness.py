"""Is the embedder making progress? Its liveness, for an orchestrator that restarts a stuck worker.

A process can be up while its consumer does nothing: faust-streaming has open reports of consumers that stop
after a task timeout (#532), and a blocked event loop stops everything. The consumer's own view cannot tell (a
stuck fetcher also stops updating its high-water marks), so a Faust timer asks Kafka itself, with clients of its
own: for each partition assigned to this worker, the end offset and the group's committed offset.

The verdict (`Watchdog.verdict`) is "stalled" when records have been waiting on an assigned partition for
`stall_s` with no commit on it, and "blocked" when the timer itself has not run for `stall_s` (the event loop is
not turning). A batch being retried because a store is down is neither: a restart would not bring the store
back. Kafka unreachable is not either: the consumer cannot make progress, and a restart would not help.

The standalone embedder serves the verdict at `/healthz` beside `/metrics` (`health_app`, with the leader's admin
endpoints); every worker exports
it as `ragtide_embedder_stalled` and `ragtide_embedder_backlog_records`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ragtide.contracts.errors import StoreUnavailable
from ragtide.contracts.settings import KafkaSettings

log = logging.getLogger(__name__)

Offsets = Mapping[tuple[str, int], tuple[int, int]]  # (topic, partition) -> (end offset, committed offset)


class Outage:
    """How long the stores the writer needs have been unavailable (its batch retried, nothing committed), and why.
    Set and cleared by the batch processor; read by the health verdict and the `ragtide_store_outage_seconds`
    gauge."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since: float | None = None
        self.reason = ""

    def begin(self, reason: str) -> None:
        """A store failed (again): the outage starts now, or goes on with the newest reason."""
        if self.since is None:
            self.since = self.clock()
        self.reason = reason

    def end(self) -> None:
        """A write went through."""
        self.since = None
        self.reason = ""

    @property
    def ongoing(self) -> bool:
        """A batch is waiting for a store."""
        return self.since is not None

    def seconds(self) -> float:
        """How long the current outage has lasted (0 when there is none)."""
        since = self.since
        return 0.0 if since is None else self.clock() - since


@dataclass(frozen=True)
class Verdict:
    """What /healthz answers: `ok` decides the status code (a restart would help only when it is False);
    `degraded` says a store has been unavailable for longer than the setting (up, but not indexing)."""

    ok: bool
    reason: str
    backlog: int = 0  # records waiting on the assigned partitions at the last check
    waiting_s: float = 0.0  # how long they have waited with no commit
    checked_s_ago: float | None = None
    partitions: list[str] = field(default_factory=list)  # the assigned partitions with a backlog
    degraded: bool = False

    @property
    def status(self) -> str:
        """ok, degraded, or the first word of the reason (stalled, blocked)."""
        if not self.ok:
            return self.reason.split(":", 1)[0]
        return "degraded" if self.degraded else "ok"

    def as_dict(self) -> dict[str, Any]:
        """JSON body."""
        return {
            "ok": self.ok,
            "status": self.status,
            "reason": self.reason,
            "backlog": self.backlog,
            "waiting_s": round(self.waiting_s, 1),
            "checked_s_ago": None if self.checked_s_ago is None else round(self.checked_s_ago, 1),
            "partitions": self.partitions,
        }


class Watchdog:
    """Fed by a timer with Kafka's offsets; thread-safe enough for a reader on another thread (whole-value
    assignments only)."""

    def __init__(self, stall_s: float, degraded_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.degraded_s = degraded_s
        self.clock = clock
        self.outage = Outage(clock)  # replaced by the worker with its batch processor's
        self.checks = 0
        self._checked_at: float | None = None
        self._committed: dict[tuple[str, int], int] = {}
        # Per partition: since when records have waited on it with no commit. One lost in flight at a rebalance
        # never commits again while the others go on: `stuck` finds it, and the worker seeks it back. The verdict
        # stays the worker's as a whole: under overload a partition may starve for minutes behind a full stream
        # buffer, and a restart would not help that.
        self._waiting_since: dict[tuple[str, int], float] = {}
        self._progress_at: float | None = None  # when any partition last committed (or none had a backlog)
        self._behind: dict[tuple[str, int], int] = {}
        self._rewound: dict[tuple[str, int], float] = {}

    def observe(self, offsets: Offsets) -> None:
        """A check's result: the assigned partitions' (end, committed) offsets."""
        now = self.clock()
        behind = {tp: max(0, end - committed) for tp, (end, committed) in offsets.items()}
        moved = {tp for tp, (_, committed) in offsets.items() if committed > self._committed.get(tp, -1)}
        waiting = {
            tp: now if tp in moved or tp not in self._waiting_since else self._waiting_since[tp]
            for tp, n in behind.items()
            if n
        }
        if moved or not waiting or not self._waiting_since or self._progress_at is None:
            self._progress_at = now  # a commit, nothing waiting, or records that only now started waiting
        self._waiting_since = waiting
        self._committed = {tp: committed for tp, (_, committed) in offsets.items()}
        self._behind = behind
        self._checked_at = now
        self.checks += 1

    def stuck(
        self,
        seen: Mapping[tuple[str, int], float],
        after_s: float,
        pending: Set[tuple[str, int]] = frozenset(),
    ) -> dict[tuple[str, int], int]:
        """Partitions whose records have waited `after_s` with no commit while none of them reached the worker
        (`seen`: when a record of each partition was last taken or acknowledged, on this clock) nor waits in its
        buffer (`pending`: partitions with records delivered and not yet acknowledged), and that were not sought
        back within `after_s`: partition -> its committed offset, to seek back to. Marks them sought."""
        now = self.clock()
        out: dict[tuple[str, int], int] = {}
        for tp, since in self._waiting_since.items():
            if tp in pending:
                continue
            quiet = now - max(since, seen.get(tp, since))
            if quiet > after_s and now - self._rewound.get(tp, -after_s - 1) > after_s:
                out[tp] = self._committed[tp]
                self._rewound[tp] = now
        return out

    def unknown(self, exc: BaseException) -> None:
        """A check that could not read Kafka: the loop turns, progress is unknown (not a stall)."""
        log.warning("liveness check could not read Kafka's offsets", extra={"error": repr(exc)})
        self._waiting_since = {}
        self._progress_at = None
        self._behind = {}
        self._checked_at = self.clock()
        self.checks += 1

    def verdict(self) -> Verdict:
        """Alive, stalled, or blocked."""
        now = self.clock()
        checked = None if self._checked_at is None else now - self._checked_at
        backlog = sum(self._behind.values())
        parts = [f"{t}/{p}" for (t, p), n in sorted(self._behind.items()) if n]
        waiting = 0.0 if not self._waiting_since or self._progress_at is None else now - self._progress_at
        if checked is not None and checked > self.stall_s:
            return Verdict(False, f"blocked: no liveness check for {checked:.0f} s", backlog, waiting, checked, parts)
        down_s = self.outage.seconds()
        if self.outage.ongoing:
            # Not a stall: a restart would not bring the store back. Degraded once it lasts.
            why = (
                f"a store is unavailable for {down_s:.0f} s ({self.outage.reason}); "
                "the batch is retried, nothing committed"
            )
            degraded = down_s > self.degraded_s
            return Verdict(True, f"degraded: {why}" if degraded else why, backlog, waiting, checked, parts, degraded)
        if waiting > self.stall_s:
            why = f"stalled: {backlog} records waiting on {', '.join(parts)} with no commit for {waiting:.0f} s"
            return Verdict(False, why, backlog, waiting, checked, parts)
        return Verdict(True, "starting" if checked is None else "ok", backlog, waiting, checked, parts)


class KafkaOffsets:
    """End offsets and a group's committed offsets, read with clients of its own (not the worker's consumer)."""

    def __init__(self, kafka: KafkaSettings, group: str) -> None:
        self.kafka = kafka
        self.group = group
        self._consumer: Any = None
        self._admin: Any = None

    async def read(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        """(end, committed) per partition; a partition the group never committed counts from its first offset."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        if not partitions:
            return {}
        try:
            if self._consumer is None:
                self._consumer = AIOKafkaConsumer(**self.kafka.client_config(), enable_auto_commit=False)
                await self._consumer.start()
            if self._admin is None:
                self._admin = AIOKafkaAdminClient(**self.kafka.client_config())
                await self._admin.start()
            tps = [TopicPartition(t, p) for t, p in partitions]
            ends = await self._consumer.end_offsets(tps)
            starts = await self._consumer.beginning_offsets(tps)
            committed = await self._admin.list_consumer_group_offsets(self.group, partitions=tps)
        except Exception:
            await self.close()  # new clients at the next check
            raise
        done = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
        return {(tp.topic, tp.partition): (int(end), int(done.get(tp, starts[tp]))) for tp, end in ends.items()}

    async def close(self) -> None:
        """Stop both clients."""
        consumer, admin, self._consumer, self._admin = self._consumer, self._admin, None, None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()


async def end_offsets(kafka: KafkaSettings, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """The end offset of every partition of `topics` now."""
    from ragtide.ingest.connector import topic_end_offsets

    return {(t, p): end for t in topics for p, end in (await topic_end_offsets(kafka, t)).items()}


async def consumed(kafka: KafkaSettings, group: str, targets: Mapping[tuple[str, int], int]) -> bool:
    """The group has committed every partition at least up to its target offset (fixed targets: under a steady
    write load the live end moves on, and a consumer's commits trail it by design)."""
    reader = KafkaOffsets(kafka, group)
    try:
        offsets = await reader.read(list(targets))
    finally:
        await reader.close()
    return all(offsets[tp][1] >= target for tp, target in targets.items())


def health_app(
    registry: CollectorRegistry, watchdog: Watchdog, routers: Sequence[APIRouter] = (), gateway: Any = None
) -> FastAPI:
    """The standalone embedder's HTTP API: `/healthz` (the verdict as JSON, 200 or 503), `/metrics`, and the
    `routers` it is given (the leader's admin endpoints, guarded by `gateway`'s admin key)."""
    app = FastAPI(title="ragtide embedder", version="0.1.0")
    app.state.gateway = gateway

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_: Any, exc: StoreUnavailable) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness: 503 when stalled or blocked (a restart helps); degraded is 200 (a restart would not)."""
        verdict = watchdog.verdict()
        return JSONResponse(verdict.as_dict(), status_code=200 if verdict.ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


class HealthServer:
    """uvicorn serving an app from a daemon thread with a loop of its own (Faust keeps the main one)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="ragtide-http", daemon=True)

    def start(self, timeout: float = 10.0) -> HealthServer:
        """Start and wait until it listens."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the embedder's HTTP server did not start (is the port taken?)")
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        """Stop serving."""
        self.server.should_exit = True
        self.thread.join(timeout=5)


def serve_health(app: FastAPI, host: str, port: int) -> HealthServer:
    """Serve `app` from a daemon thread (the worker's event loop stays free); returns the server."""
    return HealthServer(app, host, port).start()
