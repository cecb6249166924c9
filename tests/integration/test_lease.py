"""The `Lease` contract: PostgresLease (an advisory lock in a real PostgreSQL) and its double, LocalLease, pass the
same suite: one holder at a time, the holder's address visible to anyone, a dead session hands over."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from ragtide.embedder.lease import Lease, LocalLease, LocalLeases, PostgresLease
from tests.sourcedb import source_db

pytestmark = pytest.mark.integration

MakeLease = Callable[[str | None], Lease]


class Kit:
    """Makes leases of one name, and kills a holder's session the way a crash or a partition would."""

    def __init__(self, make: MakeLease, kill: Callable[[Lease], None]) -> None:
        self.make = make
        self.kill = kill


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with source_db("state") as db:
        yield db.dsn()


@pytest.fixture(params=["postgres", "local"])
def kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    made: list[Lease] = []
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg")
        name = f"test-{request.node.name}"

        def make(url: str | None) -> Lease:
            made.append(PostgresLease(dsn, name, url))
            return made[-1]

        def kill(lease: Lease) -> None:  # the server ends the holder's session: a crash, as Postgres sees it
            assert isinstance(lease, PostgresLease) and lease._conn is not None
            backend = lease._conn.info.backend_pid
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))  # waits until it has gone

        yield Kit(make, kill)
    else:
        holders = LocalLeases()

        def make_local(url: str | None) -> Lease:
            made.append(LocalLease(holders, "embedders", url))
            return made[-1]

        def kill_local(lease: Lease) -> None:
            lease.release()  # what the server does with a dead session's locks

        yield Kit(make_local, kill_local)
    for lease in made:
        lease.release()


def test_one_holder_at_a_time_and_everyone_sees_its_address(kit: Kit) -> None:
    a, b, reader = kit.make("http://a:1"), kit.make("http://b:2"), kit.make(None)
    assert reader.leader() is None
    assert a.hold() is True
    assert b.hold() is False
    assert a.hold() is True  # renewing keeps it
    assert reader.leader() == b.leader() == "http://a:1"


def test_a_release_hands_over_at_the_next_hold(kit: Kit) -> None:
    a, b = kit.make("http://a:1"), kit.make("http://b:2")
    assert a.hold() and not b.hold()
    a.release()
    assert b.leader() is None
    assert b.hold() is True and a.leader() == "http://b:2"
    assert a.hold() is False


def test_a_dead_holder_loses_the_lease_and_another_takes_it(kit: Kit) -> None:
    a, b = kit.make("http://a:1"), kit.make("http://b:2")
    assert a.hold() and not b.hold()
    kit.kill(a)
    assert b.hold() is True
    assert a.hold() is False  # the old holder learns it at its next renewal, and does not take it back
    assert a.leader() == "http://b:2"


def test_confirm_is_true_only_for_the_holder_and_never_takes_the_lease(kit: Kit) -> None:
    a, b = kit.make("http://a:1"), kit.make("http://b:2")
    assert a.confirm() is False  # free, and confirming does not take it
    assert b.hold() is True and b.confirm() is True
    assert a.confirm() is False and a.hold() is False and b.confirm() is True


def test_a_holder_whose_session_ended_cannot_confirm_and_every_take_is_a_later_term(kit: Kit) -> None:
    """Postgres ended the holder's session (a crash or a partition, as the server sees it): its very next
    confirmation says so, before any renewal; another process takes over in a later term; taking it back is a
    later term again. Renewals keep the term."""
    a, b = kit.make("http://a:1"), kit.make("http://b:2")
    assert a.hold() is True
    first = a.term
    assert first > 0 and a.hold() is True and a.term == first  # renewals keep the term
    kit.kill(a)
    assert a.confirm() is False
    assert b.hold() is True and a.hold() is False
    assert b.term == first + 1  # counted across processes: a later leader's term is higher
    b.release()
    assert a.hold() is True and a.term == first + 2


def test_advance_moves_the_holders_term_past_a_catalogs_and_only_while_held(kit: Kit) -> None:
    """A catalog written in a term this lease does not count (its table reset): the holder leads past it; the
    next holder's term is later still. A process that does not hold the lease cannot move it."""
    a, b = kit.make("http://a:1"), kit.make("http://b:2")
    assert a.hold() is True
    assert b.advance(a.term + 50) == b.term == 0  # not held: nothing moves
    taken = a.term
    assert a.advance(taken + 50) == taken + 51 == a.term
    assert a.advance(3) == a.term  # already past: unchanged
    moved = a.term
    a.release()
    assert b.hold() is True and b.term == moved + 1


def test_a_leaders_table_of_before_terms_gets_the_column_and_a_reset_row_is_led_past(pg: str) -> None:
    """A state database whose leaders table predates terms gets the column on connect (its old row counts from
    0); a row deleted while held (the table reset) does not stop the holder from moving past a catalog's term."""
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute("DROP SCHEMA IF EXISTS ragtide_embedder CASCADE")
        admin.execute("CREATE SCHEMA ragtide_embedder")
        admin.execute(  # the table as the code of before terms made it, with its leader's row
            "CREATE TABLE ragtide_embedder.leaders (name text PRIMARY KEY, url text, backend_pid int NOT NULL, "
            "host text NOT NULL, pid int NOT NULL, since timestamptz NOT NULL DEFAULT now())"
        )
        admin.execute("INSERT INTO ragtide_embedder.leaders VALUES ('old', 'http://old', 1, 'h', 1, now())")
        lease = PostgresLease(pg, "old", "http://a:1")
        try:
            assert lease.hold() is True and lease.term == 1
            admin.execute("DELETE FROM ragtide_embedder.leaders")  # reset under the holder
            assert lease.advance(7) == 8 == lease.term and lease.confirm() is True
            assert lease.leader() == "http://a:1"
        finally:
            lease.release()


def within(seconds: float, call: Callable[[], bool]) -> bool:
    """`call()`'s answer, failing (not hanging) if it takes longer than `seconds`."""
    answer: list[bool] = []
    worker = threading.Thread(target=lambda: answer.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert answer, f"no answer within {seconds} s: the call hangs on a backend that stopped answering"
    return answer[0]


@contextlib.contextmanager
def stopped(conn: psycopg.Connection[Any] | None) -> Iterator[None]:
    """The connection's backend stops answering while its host still acknowledges the bytes (SIGSTOP: what a hung
    server or a stuck proxy looks like; TCP's own timeouts never fire)."""
    assert conn is not None
    backend = conn.info.backend_pid
    try:
        os.kill(backend, signal.SIGSTOP)
    except PermissionError:
        pytest.skip("this user may not stop Postgres' backends")
    try:
        yield
    finally:
        os.kill(backend, signal.SIGCONT)


def test_a_session_that_stops_answering_is_the_lease_lost_not_a_hang(pg: str) -> None:
    """The holder's backend stops answering: the confirmation gives up after its timeout and says the lease is lost,
    instead of holding the leader, and the lock every batch needs, for good."""
    lease = PostgresLease(pg, "test-stopped-backend", "http://a:1")
    try:
        lease.ping_timeout_s = 1.0
        assert lease.hold() is True
        with stopped(lease._conn):
            assert within(10, lease.confirm) is False
        deadline = time.monotonic() + 10  # a new session takes the lock once Postgres has ended the stopped one
        while not within(10, lease.hold):
            assert time.monotonic() < deadline, "the lock of a session cut off was never freed"
            time.sleep(0.2)
    finally:
        lease.release()


def test_a_follower_whose_session_stops_answering_does_not_hang(pg: str) -> None:
    """A follower's try for the lock gets no answer: it gives up (not held) instead of holding the lease's lock, which
    a shutdown's `release` waits for, and its next try for leadership, for good."""
    holder = PostgresLease(pg, "test-stopped-follower", "http://a:1")
    follower = PostgresLease(pg, "test-stopped-follower", "http://b:2")
    try:
        follower.ping_timeout_s = 1.0
        assert holder.hold() is True and follower.hold() is False
        with stopped(follower._conn):
            assert within(10, follower.hold) is False
    finally:
        holder.release()
        follower.release()
