"""What every client of a remote HTTP service shares: the statuses worth a second try, the server's own
`Retry-After`, and a circuit breaker, so that a dead service costs a fast error instead of a timeout per call.
Used by the generator client (`generator/client.py`) and the embeddings provider (`embedder/provider.py`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def retry_after_s(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """The server's `Retry-After` in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class CircuitBreaker:
    """Closed → open after `failures` consecutive failures; half-open (trials) after `reset_s`. While open,
    `check` raises `error` naming the service, the failures and the last reason. Safe across threads."""

    def __init__(
        self,
        failures: int,
        reset_s: float,
        clock: Any = time.monotonic,
        name: str = "generator",
        error: Callable[[str], Exception] = RuntimeError,
    ) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.clock = clock
        self.name = name
        self.error = error
        self.consecutive = 0
        self.opened_at: float | None = None
        self.last_error = ""
        self._lock = threading.Lock()

    def _state(self, opened_at: float | None) -> str:
        if opened_at is None:
            return "closed"
        return "half-open" if self.clock() - opened_at >= self.reset_s else "open"

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        return self._state(self.opened_at)

    def check(self) -> None:
        """Raise while open."""
        with self._lock:
            opened_at, consecutive, last = self.opened_at, self.consecutive, self.last_error
        if opened_at is not None and self._state(opened_at) == "open":
            wait = self.reset_s - (self.clock() - opened_at)
            raise self.error(
                f"{self.name} circuit open after {consecutive} consecutive failures (last: {last}); "
                f"next try in {wait:.0f} s"
            )

    def success(self) -> None:
        """A call succeeded: close."""
        with self._lock:
            self.consecutive = 0
            self.opened_at = None

    def failure(self, reason: str) -> None:
        """Count a failure; open at the threshold (or again after a failed half-open trial)."""
        with self._lock:
            self.consecutive += 1
            self.last_error = reason
            if self.consecutive >= self.failures or self._state(self.opened_at) == "half-open":
                self.opened_at = self.clock()
