"""The `Lease` contract: PostgresLease (an advisory lock in a real PostgreSQL) and its double, LocalLease, pass the
same suite: one holder at a time, the holder's address visible to anyone, a dead session hands over."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from ragtide.embedder.lease import Lease, LocalLease, PostgresLease
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
        holders: dict[str, LocalLease] = {}

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


def test_a_holder_whose_session_ended_cannot_confirm_and_retaking_is_a_new_tenure(kit: Kit) -> None:
    """Postgres ended the holder's session (a crash or a partition, as the server sees it): its very next
    confirmation says so, before any renewal; another process takes over; a later take is a new tenure."""
    a, b = kit.make("http://a:1"), kit.make("http://b:2")
    assert a.hold() is True
    tenure = a.tenure
    assert a.hold() is True and a.tenure == tenure  # renewals keep the tenure
    kit.kill(a)
    assert a.confirm() is False
    assert b.hold() is True and a.hold() is False
    b.release()
    assert a.hold() is True and a.tenure == tenure + 1


def test_a_session_that_stops_answering_is_the_lease_lost_not_a_hang(pg: str) -> None:
    """The holder's backend stops answering while its host still acknowledges the bytes (SIGSTOP: what a hung
    server or a stuck proxy looks like; TCP's own timeouts never fire). The confirmation gives up after its
    ping timeout and says the lease is lost, instead of holding the leader, and the lock every batch needs, for
    good."""
    import os
    import signal

    lease = PostgresLease(pg, "test-stopped-backend", "http://a:1")
    try:
        lease.ping_timeout_s = 1.0
        assert lease.hold() is True and lease._conn is not None
        backend = lease._conn.info.backend_pid
        try:
            os.kill(backend, signal.SIGSTOP)
        except PermissionError:
            pytest.skip("this user may not stop Postgres' backends")
        try:
            assert lease.confirm() is False
        finally:
            os.kill(backend, signal.SIGCONT)
    finally:
        lease.release()
