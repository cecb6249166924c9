"""Keep the native stack running: a process of it that dies (a crash, the OOM killer, a SIGKILL) is started again,
in dependency order, with the same code `ragtide up` uses, without a person running `make up`. Processes that do not
depend on each other come back side by side: the stack names its processes in tiers (each needs only earlier
tiers), and the dead of one tier start together, one kind after another within a kind (`kafka-1` after `kafka-0`:
a broker's start brings up the other dead brokers of its quorum), so an embedder and a retriever that died together
are back in the time of the slower one, not of both.

`ragtide up --supervise` (and `ragtide up --cluster --supervise`, over the split topology's members) stays in the
foreground and does this until it is stopped (the processes keep running after it; `ragtide down` stops them).
Kubernetes restarts pods by itself; this is the native install's equivalent. Only the processes that were running
when supervision began are watched (the local generator is optional; so are a cluster's replicas beyond those
started). A start that fails is tried again with backoff (1, 2, 5, 10, then every 30 s), so a process that cannot
start does not spin.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from ragtide.stack.process import Daemon

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Restart:
    """One restart: which process, when its start began, and how long it took."""

    name: str
    found_at: float  # when its start began, on the supervisor's clock (after the tiers it needs)
    took_s: float
    ok: bool
    error: str = ""


class Supervised(Protocol):
    """Named processes in dependency tiers, each with its Daemon and a start: `Stack` (one node) and `Cluster`
    (the split topology)."""

    def tiers(self) -> Sequence[Sequence[str]]:
        """Every process that may run, in tiers: a process needs only those of earlier tiers to start."""
        ...

    def daemon(self, name: str) -> Daemon:
        """One process' Daemon (its pid)."""
        ...

    def start(self, name: str) -> None:
        """Start one process (idempotent) and wait until it serves."""
        ...


class Supervisor:
    """Restarts the dead processes of a `Stack` or a `Cluster`; `check()` is one pass, `run(stop)` passes until
    `stop` is set."""

    def __init__(
        self,
        stack: Supervised,
        names: Sequence[str] | None = None,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_restart: Callable[[Restart], None] = lambda _: None,
    ) -> None:
        self.stack = stack
        # dependency order, whatever order was asked
        self.tiers = [[n for n in tier if names is None or n in names] for tier in stack.tiers()]
        self.names = [n for tier in self.tiers for n in tier]
        self.interval_s = interval_s
        self.clock = clock
        self.on_restart = on_restart
        self.watched = [n for n in self.names if stack.daemon(n).pid() is not None]
        self.restarts: list[Restart] = []
        self._failures: dict[str, int] = {}
        self._next_try: dict[str, float] = {}

    def check(self) -> list[Restart]:
        """Start every watched process that is not running (once its backoff allows), tier by tier, the kinds of a
        tier side by side; what was done, in dependency order."""
        done: list[Restart] = []
        for tier in self.tiers:
            due = [n for n in tier if n in self.watched and self._due(n)]
            kinds: dict[str, list[str]] = {}
            for name in due:
                kinds.setdefault(kind_of(name), []).append(name)
            groups = list(kinds.values())
            if len(groups) <= 1:
                results = [self._start_each(g) for g in groups]
            else:
                with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="restart") as pool:
                    results = list(pool.map(self._start_each, groups))
            restarts = {r.name: r for group in results for r in group}
            done.extend(restarts[name] for name in due if name in restarts)
        return done

    def _due(self, name: str) -> bool:
        return self.stack.daemon(name).pid() is None and self.clock() >= self._next_try.get(name, 0.0)

    def _start_each(self, names: Sequence[str]) -> list[Restart]:
        """Start `names` one after another (a start may bring up the next one: it is then skipped)."""
        return [self._start(name) for name in names if self.stack.daemon(name).pid() is None]

    def _start(self, name: str) -> Restart:
        found = self.clock()
        log.warning("process not running; starting it", extra={"daemon": name})
        try:
            self.stack.start(name)
        except Exception as exc:  # whatever a start raised, the supervisor itself must keep running
            n = self._failures[name] = self._failures.get(name, 0) + 1
            self._next_try[name] = self.clock() + BACKOFF_S[min(n, len(BACKOFF_S)) - 1]
            restart = Restart(name, found, self.clock() - found, False, f"{type(exc).__name__}: {exc}".splitlines()[0])
            log.error("restart failed; will retry", extra={"daemon": name, "error": restart.error, "failures": n})
        else:
            self._failures.pop(name, None)
            self._next_try.pop(name, None)
            restart = Restart(name, found, self.clock() - found, True)
            log.info("restarted", extra={"daemon": name, "took_s": round(restart.took_s, 1)})
        self.restarts.append(restart)
        try:
            self.on_restart(restart)
        except Exception as exc:  # a report that failed must not stop the restarts
            log.error("restart report failed", extra={"daemon": name, "error": repr(exc)})
        return restart

    def run(self, stop: threading.Event) -> None:
        """Check every `interval_s` until `stop` is set."""
        while not stop.wait(self.interval_s):
            self.check()


def kind_of(name: str) -> str:
    """`kafka` for `kafka-2`; a name without a replica number is its own kind."""
    kind, _, index = name.rpartition("-")
    return kind if kind and index.isdigit() else name
