"""Leadership: the leader's duties run only while the lease is held, stop when it is lost, and another process
takes over at its next renewal."""

from __future__ import annotations

import asyncio

import pytest

from ragtide.embedder.lease import Leadership, LocalLease, LocalLeases

pytestmark = pytest.mark.unit


def test_duties_run_while_the_lease_is_held_and_move_to_the_next_holder() -> None:
    holders = LocalLeases()
    events: list[str] = []

    def leadership(name: str) -> tuple[Leadership, LocalLease]:
        lease = LocalLease(holders, "embedders", f"http://{name}")

        async def become() -> None:
            events.append(f"{name} leads")

        async def duty() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                events.append(f"{name} duty stopped")

        return Leadership(lease, become, [duty], resign=lambda: events.append(f"{name} resigned")), lease

    async def scenario() -> None:
        a, lease_a = leadership("a")
        b, _ = leadership("b")
        assert await a.step() is True
        assert await b.step() is False
        assert len(a._tasks) == 1 and not b._tasks
        lease_a.release()  # a's session dies: the lock goes with it
        assert await b.step() is True
        assert await a.step() is False
        assert lease_a.leader() == "http://b"
        await b._stop()

    asyncio.run(scenario())
    assert events == ["a leads", "b leads", "a duty stopped", "a resigned", "b duty stopped"]


def test_a_lease_lost_and_taken_again_between_renewals_is_led_anew() -> None:
    """The session died and this process took the lease again before its next renewal noticed: another process
    may have led in between, so the duties stop, it resigns and becomes leader again from the catalog."""
    holders = LocalLeases()
    lease = LocalLease(holders, "embedders", "http://a")
    events: list[str] = []

    async def become() -> None:
        events.append("leads")

    async def duty() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            events.append("duty stopped")

    async def scenario() -> None:
        lead = Leadership(lease, become, [duty], resign=lambda: events.append("resigned"))
        assert await lead.step() is True
        assert await lead.step() is True and events == ["leads"]  # renewed: the same tenure
        lease.release()  # the session died...
        other = LocalLease(holders, "embedders", "http://b")
        assert other.hold() and not lease.confirm()  # ...another led for a moment...
        other.release()
        assert await lead.step() is True  # ...and this one took it again at its next renewal
        await asyncio.sleep(0)
        assert events == ["leads", "duty stopped", "resigned", "leads"]
        await lead._stop()

    asyncio.run(scenario())


def test_a_term_moved_on_while_becoming_leader_is_not_taken_for_a_lost_lease() -> None:
    """`become` may advance the lease's term past the catalog's (a reset lease table): the next renewal sees the
    same term the leadership began in, and leads on (no resign, no second `become`)."""
    lease = LocalLease(LocalLeases(), "embedders", "http://a")
    events: list[str] = []

    async def become() -> None:
        lease.advance(41)
        events.append(f"leads in {lease.term}")

    async def scenario() -> None:
        lead = Leadership(lease, become, [], resign=lambda: events.append("resigned"))
        assert await lead.step() is True
        assert await lead.step() is True
        await lead._stop()

    asyncio.run(scenario())
    assert events == ["leads in 42"]
