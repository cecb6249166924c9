"""Leadership: the leader's duties run only while the lease is held, stop when it is lost, and another process
takes over at its next renewal."""

from __future__ import annotations

import asyncio

import pytest

from ragtide.embedder.lease import Leadership, LocalLease

pytestmark = pytest.mark.unit


def test_duties_run_while_the_lease_is_held_and_move_to_the_next_holder() -> None:
    holders: dict[str, LocalLease] = {}
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
