"""Leadership among embedder replicas.

Every embedder of the consumer group writes the changes of its partitions, but one of them, the *leader*, owns the
generations' life cycle: it starts builds, verifies them, switches one live and drops retired collections. Two
replicas doing that from memory of their own could drop a collection the other still writes. The others *follow*:
they read the catalog before every batch (generations/dual.py).

`PostgresLease` is a session-level advisory lock in ragtide's state database, held on a connection of its own: a
leader that dies, or loses its connection, loses the lock with its session, and another replica takes it at its
next `hold()` (every `lease.renew_s`). The holder's address is kept beside it, so that any retriever can forward an
operator's request to it. The test double is `LocalLease` (one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

import psycopg

from ragtide.contracts.pg import SerialConnection

log = logging.getLogger(__name__)


class Lease(Protocol):
    """One holder at a time among the processes that share `name`."""

    def hold(self) -> bool:
        """Take the lease when it is free, keep it when held; True while this process holds it."""
        ...

    def leader(self) -> str | None:
        """The address the holder advertised (None while nobody holds it)."""
        ...

    def release(self) -> None:
        """Give it up (a graceful stop hands over at once)."""
        ...

    def confirm(self) -> bool:
        """True only while this process holds the lease, by a fresh round trip (never takes it; fails closed).
        The leader asks right before each change to the catalog."""
        ...

    def advance(self, past: int) -> int:
        """While held: move this holder's term past `past`, a term the catalog was written in that this lease no
        longer counts (its table was reset, or the store came from elsewhere). Returns the term."""
        ...

    @property
    def term(self) -> int:
        """The term this process last took the lease in. Terms grow each time any process takes it, so a later
        leader's term is always higher: the catalog keeps the highest term's state (generations/catalog.py), and
        a change between two holds of one process means it was lost and taken again (another may have led)."""
        ...


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for `name`."""
    return int.from_bytes(hashlib.sha256(f"ragtide-lease:{name}".encode()).digest()[:8], "big", signed=True)


DDL = [
    "CREATE SCHEMA IF NOT EXISTS ragtide_embedder",
    """CREATE TABLE IF NOT EXISTS ragtide_embedder.leaders (
         name text PRIMARY KEY, url text, backend_pid int NOT NULL, host text NOT NULL, pid int NOT NULL,
         since timestamptz NOT NULL DEFAULT now(), term bigint NOT NULL DEFAULT 0)""",
    # `term` (Lease.term) is counted by whoever takes the lock, under it: a term no earlier leader had (the row
    # outlives its holders). A table of before terms gets the column once; the check first, because ALTER TABLE
    # locks the table and needs its owner even when the column exists.
    """DO $$ BEGIN
         IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'ragtide_embedder'
                        AND table_name = 'leaders' AND column_name = 'term') THEN
           ALTER TABLE ragtide_embedder.leaders ADD COLUMN term bigint NOT NULL DEFAULT 0;
         END IF;
       END $$""",
]

# The advertised address counts only while the session that wrote it holds the lock (a dead leader's row stays).
_LEADER_SQL = """
SELECT l.url FROM ragtide_embedder.leaders l
JOIN pg_locks k ON k.pid = l.backend_pid AND k.locktype = 'advisory' AND k.granted
 AND k.classid = %(hi)s AND k.objid = %(lo)s AND k.objsubid = 1
WHERE l.name = %(name)s
"""


class PostgresLease:
    """The real lease (see the module's docstring). Postgres being unreachable means not holding it."""

    def __init__(self, dsn: str, name: str, url: str | None = None, connect_timeout: int = 5) -> None:
        self.dsn = dsn
        self.name = name
        self.url = url
        self.key = lock_key(name)
        self.connect_timeout = connect_timeout
        self.ping_timeout_s = 5.0  # any statement on the lease's session unanswered this long: the lease is lost
        self._conn: psycopg.Connection[Any] | None = None
        self._held = False
        self._term = 0
        self._lock = threading.Lock()
        self._reader = SerialConnection(dsn, setup=DDL, name="embedder lease")

    @property
    def term(self) -> int:
        """See `Lease.term` (0 before the first take)."""
        return self._term

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=self.connect_timeout,
            keepalives=1,  # a partitioned leader notices in seconds that its session (and lock) may be gone
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            # A round trip whose bytes go unacknowledged for 5 s fails: keepalives cover only an idle connection, and
            # without this a renewal or a confirmation sent into a partition would wait for TCP's own retries
            # (minutes) while the leader's duties went on.
            tcp_user_timeout=5000,
            # the server notices a dead or partitioned leader in seconds too, and ends its session (and lock)
            options="-c statement_timeout=10000 -c idle_session_timeout=0 -c tcp_keepalives_idle=5 "
            "-c tcp_keepalives_interval=2 -c tcp_keepalives_count=2",
        )
        try:
            for statement in DDL:
                self._run(conn, statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def hold(self) -> bool:
        """One round trip: the lock's session still answers (held), or `pg_try_advisory_lock` (free or not)."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._held = False
                    self._conn = self._connect()
                if self._held:
                    self._ping()  # the session lives, and the lock with it
                    return True
                row = self._run(self._conn, "SELECT pg_try_advisory_lock(%s)", (self.key,))
                if row and row[0]:
                    taken = self._run(
                        self._conn,
                        "INSERT INTO ragtide_embedder.leaders (name, url, backend_pid, host, pid, term) "
                        "VALUES (%s, %s, pg_backend_pid(), %s, %s, 1) ON CONFLICT (name) DO UPDATE SET "
                        "url = EXCLUDED.url, backend_pid = EXCLUDED.backend_pid, host = EXCLUDED.host, "
                        "pid = EXCLUDED.pid, since = now(), term = ragtide_embedder.leaders.term + 1 RETURNING term",
                        (self.name, self.url, socket.gethostname(), os.getpid()),
                    )
                    self._held = True
                    self._term = int(taken[0])
            except psycopg.Error as exc:
                self._lost(exc)
            return self._held

    def confirm(self) -> bool:
        """A round trip on the lock's session (see `Lease.confirm`). A session Postgres ended, or one cut off (no
        answer within `tcp_user_timeout`), is the lease lost: False, and `hold` notices too."""
        with self._lock:
            if not self._held or self._conn is None:
                return False
            try:
                self._ping()
            except psycopg.Error as exc:
                self._lost(exc)
                return False
            return True

    def advance(self, past: int) -> int:
        """See `Lease.advance`: one statement on the lock's session, while it is held."""
        with self._lock:
            if self._held and self._conn is not None and self._term <= past:
                try:
                    row = self._run(  # an upsert: the row may have gone with a reset table
                        self._conn,
                        "INSERT INTO ragtide_embedder.leaders (name, url, backend_pid, host, pid, term) "
                        "VALUES (%s, %s, pg_backend_pid(), %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                        "term = greatest(ragtide_embedder.leaders.term + 1, EXCLUDED.term) RETURNING term",
                        (self.name, self.url, socket.gethostname(), os.getpid(), past + 1),
                    )
                except psycopg.Error as exc:
                    self._lost(exc)
                    raise
                self._term = int(row[0])
            return self._term

    def _ping(self) -> None:
        """`SELECT 1` on the lock's session. Called under `_lock`."""
        assert self._conn is not None
        self._run(self._conn, "SELECT 1")

    def _run(self, conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] | None = None) -> Any:
        """One statement on the lease's session (its first row, if any), given up after `ping_timeout_s` whatever
        the network does: a server that acknowledges the bytes but never answers would otherwise hold the caller,
        and `_lock` (under which a confirmation, a renewal and `release` at shutdown wait), for good.

        A timer shuts the socket down under the blocked call, through a duplicate of its descriptor taken before
        the call (libpq may close its own on an error; the duplicate keeps the socket, so the cut can never reach
        another one that took the number). It acts only while the call is still running, and a call it cut fails
        whatever it got back: a lease whose answer came just as the time ran out is lost, never half-lost."""
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        except OSError as exc:  # out of descriptors: this round trip fails like any other
            raise psycopg.OperationalError(f"cannot watch the lease's connection: {exc}") from exc
        guard = threading.Lock()
        done = fired = False

        def cut() -> None:
            nonlocal fired
            with guard:
                if not done:
                    fired = True
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.ping_timeout_s, cut)
        timer.daemon = True
        try:
            timer.start()
            cur = conn.execute(sql, params)
            row = cur.fetchone() if cur.description is not None else None
        finally:
            with guard:
                done = True
            timer.cancel()
            sock.close()
        if fired:
            raise psycopg.OperationalError(f"Postgres did not answer within {self.ping_timeout_s:g} s")
        return row

    def leader(self) -> str | None:
        """The holder's advertised URL, read from any process."""
        hi, lo = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        rows = self._reader.run(_LEADER_SQL, {"hi": _oid(hi), "lo": _oid(lo), "name": self.name})
        return str(rows[0]["url"]) if rows and rows[0]["url"] else None

    def release(self) -> None:
        """Close the session: the lock goes with it."""
        with self._lock:
            self._close()
        self._reader.close()

    def _lost(self, exc: psycopg.Error) -> None:
        """A round trip on the session failed: the session, and the lock if it was held, are gone (logged)."""
        if self._held:
            log.error("lost the embedder lease (its Postgres session)", extra={"error": str(exc)})
        self._close()

    def _close(self) -> None:
        self._held = False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):
                conn.close()


def _oid(v: int) -> int:
    """pg_locks shows the key's halves as oids (unsigned 32-bit)."""
    return v & 0xFFFFFFFF


class LocalLeases:
    """What the doubles of one process share, by lease name: the holder, and the last term given out."""

    def __init__(self) -> None:
        self.holders: dict[str, LocalLease] = {}
        self.terms: dict[str, int] = {}


class LocalLease:
    """The double: leases of one process, shared through a `LocalLeases`."""

    def __init__(self, shared: LocalLeases, name: str, url: str | None = None) -> None:
        self.shared = shared
        self.holders = shared.holders
        self.name = name
        self.url = url
        self.term = 0
        self._held = False

    def hold(self) -> bool:
        """Take it when free (a holder whose session died has released it: `release`); a take is a new term."""
        held = self.holders.setdefault(self.name, self) is self
        if held and not self._held:
            self.term = self.shared.terms[self.name] = self.shared.terms.get(self.name, 0) + 1
        self._held = held
        return held

    def advance(self, past: int) -> int:
        """See `Lease.advance`."""
        if self.confirm() and self.term <= past:
            self.term = self.shared.terms[self.name] = max(self.shared.terms.get(self.name, 0), past) + 1
        return self.term

    def confirm(self) -> bool:
        """Still the holder (never takes it)."""
        self._held = self._held and self.holders.get(self.name) is self
        return self._held

    def leader(self) -> str | None:
        """The holder's url."""
        holder = self.holders.get(self.name)
        return holder.url if holder is not None else None

    def release(self) -> None:
        """Give it up."""
        self._held = False
        if self.holders.get(self.name) is self:
            del self.holders[self.name]


class Leadership:
    """Renews the lease every `every_s`; while held, runs the leader's `duties` (started after `become` returned,
    cancelled when the lease is lost, `resign` then runs). A process that never holds the lease only follows."""

    def __init__(
        self,
        lease: Lease,
        become: Callable[[], Awaitable[None]],
        duties: Sequence[Callable[[], Coroutine[Any, Any, None]]],
        resign: Callable[[], None] = lambda: None,
        every_s: float = 1.0,
    ) -> None:
        self.lease = lease
        self.become = become
        self.duties = duties
        self.resign = resign
        self.every_s = every_s
        self.leading = False
        self._term = 0  # the lease's term this leadership began in
        self._tasks: list[asyncio.Task[None]] = []

    async def step(self) -> bool:
        """Renew once; start or stop the duties on a change. True while leading."""
        held = await asyncio.to_thread(self.lease.hold)
        if held and self.leading and self.lease.term != self._term:
            # Lost and taken again between two renewals: another process may have led meanwhile, so this one
            # starts over from the catalog as it is now.
            log.warning("the lease was lost and taken again; leading anew from the catalog")
            await self._stop()
            await asyncio.to_thread(self.resign)
        if held and not self.leading:
            log.info("this embedder leads the generations (build, switch, reap)")
            await self.become()
            self._term = self.lease.term  # after `become`, which may have advanced it past the catalog's
            self._tasks = [asyncio.create_task(duty()) for duty in self.duties]
            self.leading = True
        elif not held and self.leading:
            log.warning("this embedder no longer leads; following the catalog")
            await self._stop()
            await asyncio.to_thread(self.resign)
        return self.leading

    async def run(self) -> None:
        """Renew until cancelled; then stop the duties and release the lease."""
        try:
            while True:
                try:
                    await self.step()
                except Exception as exc:  # `become` failed (a store down): still holding, it is tried again
                    log.error("taking the lead failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(self.every_s)
        finally:
            was = self.leading
            await self._stop()
            if was:
                await asyncio.to_thread(self.resign)  # waits out a switch in progress before the lease goes
            await asyncio.to_thread(self.lease.release)

    async def _stop(self) -> None:
        tasks, self._tasks, self.leading = self._tasks, [], False
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # a duty that died is logged by its own failure handler; do not mask it
                log.error("leader duty failed", extra={"error": repr(exc)})
