"""Fault injection on the native stack: under a steady write load, SIGKILL the node, Connect, Kafka and the Postgres
postmaster in random order, let the supervisor restart them, time the recovery from outside, and at the end compare
Postgres with search row by row.

- `WriteLoad`: inserts, text updates, metadata-only updates and deletes on `public.faults`, one transaction each,
  at a steady rate from a thread; it rides through Postgres restarts and remembers every id it ever wrote.
- `inject`: one SIGKILL (for Postgres, the postmaster itself, as the OOM killer would).
- `await_recovery`: a probe row committed after the kill, and the time until search answers and until it finds
  the probe ("fresh again"), measured as a user would.
- `audit`: each id the load ever wrote, searched by its own filter: a live row whose current text is not found is
  *lost*, a live row found with an older text is *stale*, a deleted row still found is a *ghost*.

The test suite (`tests/faults`, `make test-faults`) drives these on a stack of its own; `FaultReport` is its JSON.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from ragtide.contracts.freshness import summarize
from ragtide.stack.postgres import PostgresCluster
from ragtide.stack.stack import Stack

FAULT_KINDS = ("node", "connect", "kafka", "postgres")
TABLE = "public.faults"
SOURCE = {"table": TABLE, "key": ["id"], "text": "{body}", "metadata": ["rid", "label"]}
DDL = "CREATE TABLE IF NOT EXISTS public.faults (id int PRIMARY KEY, rid int NOT NULL, body text NOT NULL, label text)"
PROBE_BASE = 1_000_000  # probe rows' ids, apart from the load's
WORDS = "tide harbor current vessel anchor signal buoy channel pier keel rudder compass chart beacon reef".split()


class WriteLoad:
    """A steady mix of changes (40% text updates, 25% inserts, 20% metadata-only updates, 15% deletes) at `rate`
    per second, from a thread; stops by itself after `max_s`. A change that fails (Postgres down) is not counted
    and the next one is tried on a new connection."""

    MIX: tuple[tuple[str, int], ...] = (("update", 40), ("insert", 25), ("meta", 20), ("delete", 15))

    def __init__(
        self, dsn: str, rate: float = 20.0, seed: int = 11, max_s: float = 4 * 3600, first_id: int = 1
    ) -> None:
        self.dsn = dsn
        self.rate = rate
        self.max_s = max_s
        self.rng = random.Random(seed)
        self.live: list[int] = []
        self.ever: set[int] = set()
        self.counts = {op: 0 for op, _ in self.MIX}
        self.failed = 0  # changes refused because Postgres was unavailable
        self.errors: list[str] = []  # anything else: a bug in the load or the schema, which ends the load
        self._next_id = first_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-write-load", daemon=True)

    def start(self) -> None:
        """Create the table and start writing."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(DDL)
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _text(self, row: int, version: int) -> str:
        return f"fault row {row} version {version} " + " ".join(self.rng.choice(WORDS) for _ in range(12))

    def _change(self, conn: psycopg.Connection[Any], op: str) -> None:
        if op == "insert" or not self.live:
            row = self._next_id
            self._next_id += 1
            self.ever.add(row)
            conn.execute(
                "INSERT INTO public.faults (id, rid, body, label) VALUES (%s, %s, %s, 'new')",
                (row, row, self._text(row, 0)),
            )
            self.live.append(row)
            self.counts["insert"] += 1
            return
        row = self.rng.choice(self.live)
        if op == "update":
            conn.execute(
                "UPDATE public.faults SET body = %s WHERE id = %s", (self._text(row, self.rng.randint(1, 10**6)), row)
            )
        elif op == "meta":
            conn.execute("UPDATE public.faults SET label = %s WHERE id = %s", (f"label-{self.rng.randint(0, 9)}", row))
        else:
            conn.execute("DELETE FROM public.faults WHERE id = %s", (row,))
            self.live.remove(row)
        self.counts[op] += 1

    def _run(self) -> None:
        ops = [op for op, _ in self.MIX]
        weights = [w for _, w in self.MIX]
        conn: psycopg.Connection[Any] | None = None
        start = time.monotonic()
        sent = 0
        while not self._stop.is_set() and time.monotonic() - start < self.max_s:
            delay = start + sent / self.rate - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            sent += 1
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                self._change(conn, self.rng.choices(ops, weights)[0])
            except psycopg.OperationalError:
                self.failed += 1
                conn = None
                self._stop.wait(0.5)
            except psycopg.Error as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                break
        if conn is not None:
            conn.close()


def inject(stack: Stack, kind: str) -> int:
    """SIGKILL one process of the stack; its pid. Postgres: the postmaster itself, not the wrapper that started it."""
    if kind == "postgres":
        pid_file = PostgresCluster(stack.settings, stack.daemon("postgres")).pgdata / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
    else:
        found = stack.daemon(kind).pid()
        if found is None:
            raise RuntimeError(f"{kind} is not running")
        pid = found
    os.kill(pid, signal.SIGKILL)
    return pid


def _search(client: httpx.Client, flt: dict[str, Any], k: int = 5) -> list[dict[str, Any]] | None:
    """The hits, or None when search did not answer."""
    try:
        resp = client.post("/v1/search", json={"query": "fault row", "k": k, "filter": flt}, timeout=5)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    hits: list[dict[str, Any]] = resp.json()["hits"]
    return hits


def _insert_probe(dsn: str, n: int, deadline: float) -> None:
    """Commit probe row `n` (retrying while Postgres is down)."""
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
                conn.execute(
                    "INSERT INTO public.faults (id, rid, body, label) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET label = EXCLUDED.label",
                    (PROBE_BASE + n, PROBE_BASE + n, f"fault probe {n}", f"probe-{n}"),
                )
            return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass(frozen=True)
class Recovery:
    """One fault, timed from the kill: until search answered again, and until a change committed after the kill
    was searchable (None: not within the deadline)."""

    kind: str
    n: int
    search_s: float | None
    fresh_s: float | None


def await_recovery(api_url: str, dsn: str, kind: str, n: int, killed_at: float, timeout_s: float) -> Recovery:
    """Commit probe `n` and poll search until it is found."""
    deadline = killed_at + timeout_s
    search_s: float | None = None
    with httpx.Client(base_url=api_url) as client:
        prober = threading.Thread(target=_insert_probe, args=(dsn, n, deadline), daemon=True)
        prober.start()
        while time.monotonic() < deadline:
            hits = _search(client, {"label": f"probe-{n}"}, k=1)
            now = time.monotonic() - killed_at
            if hits is not None and search_s is None:
                search_s = now
            if hits and not prober.is_alive():
                return Recovery(kind, n, search_s, now)
            time.sleep(0.1)
    return Recovery(kind, n, search_s, None)


@dataclass
class Audit:
    """Postgres against search, row by row."""

    rows_checked: int = 0
    live_rows: int = 0
    lost: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    ghosts: list[int] = field(default_factory=list)


def classify(current: dict[int, str], found: dict[int, set[str]]) -> Audit:
    """Rows now in Postgres (id -> text) against the texts search found for each id ever written."""
    out = Audit()
    for row in sorted(set(found) | set(current)):
        texts = found.get(row, set())
        out.rows_checked += 1
        if row not in current:
            if texts:
                out.ghosts.append(row)
            continue
        out.live_rows += 1
        if not texts:
            out.lost.append(row)
        elif texts != {current[row]}:
            out.stale.append(row)
    return out


def audit(api_url: str, dsn: str, ids: Iterable[int]) -> Audit:
    """Search each of `ids` (every id the caller ever wrote) by its own filter; compare with its row in Postgres."""
    wanted = sorted(set(ids))
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, body FROM public.faults WHERE id = ANY(%s)", (wanted,)).fetchall()
    current: dict[int, str] = dict(rows)
    found: dict[int, set[str]] = {}
    with httpx.Client(base_url=api_url) as client:
        for row in wanted:
            hits = _search(client, {"rid": row})
            if hits is None:
                raise RuntimeError(f"search did not answer while auditing row {row}")
            found[row] = {h["text"] for h in hits}
    return classify(current, found)


@dataclass
class FaultReport:
    """What `make test-faults` writes under bench/results/."""

    faults: int
    seed: int
    rate: float
    machine: dict[str, Any]
    recoveries: list[Recovery] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)
    failed_changes: int = 0
    audit: Audit | None = None
    verify_drift: int | None = None
    dead_letters: int | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)  # the supervisor's, with how long each start took

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """Recovery times per fault kind: search answering again, fresh again."""
        out: dict[str, dict[str, Any]] = {}
        for kind in FAULT_KINDS:
            mine = [r for r in self.recoveries if r.kind == kind]
            if mine:
                out[kind] = {
                    "faults": len(mine),
                    "not_recovered": sum(r.fresh_s is None for r in mine),
                    "search_s": summarize([r.search_s for r in mine if r.search_s is not None]),
                    "fresh_s": summarize([r.fresh_s for r in mine if r.fresh_s is not None]),
                }
        return out

    def write(self, directory: Path) -> Path:
        """bench/results/faults-<time>.json"""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / time.strftime("faults-%Y%m%d-%H%M%S.json", time.gmtime())
        path.write_text(json.dumps({**asdict(self), "by_kind": self.by_kind()}, indent=2))
        return path
