"""Logging setup: key=value lines on a terminal, JSON lines under the daemons."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import weakref
from typing import Any, ClassVar, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra=` context as fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KeyValueFormatter(logging.Formatter):
    """`time level logger msg k=v ...` for humans."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED)
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        text = f"{base} {ctx}" if ctx else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "httpx", "urllib3", "sentence_transformers", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Throttled:
    """A failure that repeats (a loop retrying every few seconds, every request while a store is down): logged the
    first time, then at most once per `every_s` with how many went unlogged; its recovery is logged once."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        every_s: float = 60.0,
        clock: Any = time.monotonic,
        counter: Any = None,
    ) -> None:
        self.logger = logger
        self.message = message
        self.counter = counter  # a Prometheus counter (child) incremented per failure
        self.every_s = every_s
        self.clock = clock
        self.failures = 0  # since the last recovery
        self._logged_at: float | None = None
        self._unlogged = 0
        self._lock = threading.Lock()  # failures come from request threads too

    def failed(self, exc: BaseException, **context: Any) -> None:
        """One more failure; logged when the last log line is old enough."""
        if self.counter is not None:
            self.counter.inc()
        with self._lock:
            self.failures += 1
            now = self.clock()
            if self._logged_at is not None and now - self._logged_at < self.every_s:
                self._unlogged += 1
                return
            first, failures, unlogged = self.failures == 1, self.failures, self._unlogged
            self._logged_at, self._unlogged = now, 0
        extra = {"error": repr(exc), "failures": failures, "not_logged": unlogged, **context}
        self.logger.warning(self.message, extra=extra, exc_info=exc if first else None)

    def recovered(self) -> None:
        """The next attempt worked: say so once, after a failure."""
        if not self.failures:  # the common case, without the lock
            return
        with self._lock:
            failures, self.failures, self._logged_at, self._unlogged = self.failures, 0, None, 0
        if failures:
            self.logger.info(f"recovered: {self.message}", extra={"failures": failures})


PerRegistryT = TypeVar("PerRegistryT", bound="PerRegistry")


class PerRegistry:
    """Metrics that exist once per registry: `of(registry)` is the one set, whichever part of a process asks first
    (a Prometheus registry refuses a metric name twice)."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, dict[type, Any]]] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        pass

    @classmethod
    def of(cls: type[PerRegistryT], registry: CollectorRegistry) -> PerRegistryT:
        """The registry's set (created on first use)."""
        sets = PerRegistry._by_registry.setdefault(registry, {})
        found = sets.get(cls)
        if found is None:
            found = sets[cls] = cls(registry)
        return cast(PerRegistryT, found)


class BackgroundFailures(PerRegistry):
    """Failures of the background loops (build watcher, reaper, catalog follower, backfill monitor, slot monitor):
    one counter, `ragtide_background_failures_total{loop}`, and a throttled log per loop. `of(registry)` is the one
    per registry, whichever part of a process asks first."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.counter = Counter(
            "ragtide_background_failures",
            "failed rounds of a background loop (it retries next round)",
            ["loop"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    def loop(self, name: str, logger: logging.Logger, every_s: float = 60.0) -> Throttled:
        """The failure log of one loop."""
        return Throttled(logger, f"{name} failed; will retry", every_s, counter=self.counter.labels(name))
