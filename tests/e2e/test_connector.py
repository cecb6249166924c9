"""Registering the Debezium connector on a running one, as every `ragtide up` and `sources apply` does: an unchanged
config is left alone, a changed one runs when registration returns, a stopped connector is not resumed blindly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import RagtideSettings
from ragtide.ingest.connector import connector_state, stop, topic_end_offsets, wait_until
from ragtide.stack.stack import Stack
from tests.e2e.conftest import LiveStack, poll

CONFIG_TOPIC = "ragtide-connect-configs"  # infra/config/connect-distributed.properties


def connector_url(settings: RagtideSettings) -> str:
    return f"{settings.connect.url}/connectors/{settings.connect.connector_name}"


def with_heartbeat(settings: RagtideSettings, ms: int) -> RagtideSettings:
    return settings.model_copy(update={"connect": settings.connect.model_copy(update={"heartbeat_interval_ms": ms})})


@pytest.fixture
def restored(live: LiveStack) -> Iterator[LiveStack]:
    """The connector registered with the live stack's own config again after the test."""
    yield live
    live.stack.register_connectors()


def slot_holder(live: LiveStack) -> int | None:
    """The pid of the walsender that streams the connector's slot to Debezium (None: no one holds it)."""
    rows = live.sql(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (live.settings.connect.slot_name,)
    )
    return rows[0][0] if rows else None


def test_a_changed_config_is_what_runs_when_registration_returns(restored: LiveStack) -> None:
    streaming = poll(lambda: slot_holder(restored), "Debezium to hold its slot")
    changed = with_heartbeat(restored.settings, restored.settings.connect.heartbeat_interval_ms + 1000)
    Stack(changed).register_connectors()
    # the task that streamed with the old config has let go of the slot (a registration that returned on the old
    # task's RUNNING, before Connect restarted it, leaves it holding the slot here)
    assert slot_holder(restored) != streaming
    url = connector_url(changed)
    with httpx.Client(timeout=30) as http:
        tasks = http.get(f"{url}/tasks").raise_for_status().json()
        assert [t["config"]["heartbeat.interval.ms"] for t in tasks] == [str(changed.connect.heartbeat_interval_ms)]
        assert connector_state(http, url) == ("RUNNING", ["RUNNING"])
    poll(lambda: slot_holder(restored), "the new task to stream from the slot")


def test_an_unchanged_config_is_not_written_again(live: LiveStack) -> None:
    before = asyncio.run(topic_end_offsets(live.settings.kafka, CONFIG_TOPIC))
    assert sum(before.values()) > 0  # the topic that records every PUT
    live.stack.register_connectors()
    assert asyncio.run(topic_end_offsets(live.settings.kafka, CONFIG_TOPIC)) == before


def test_a_stopped_connector_is_not_resumed_by_registration(restored: LiveStack) -> None:
    url = connector_url(restored.settings)
    with httpx.Client(timeout=30) as http:
        stop(http, url)
        try:
            with pytest.raises(StackError, match=r"is stopped .*run `ragtide resync`.*/resume"):
                restored.stack.register_connectors()
            assert connector_state(http, url)[0] == "STOPPED"
        finally:
            http.put(f"{url}/resume").raise_for_status()
            wait_until(lambda: connector_state(http, url) == ("RUNNING", ["RUNNING"]), "the connector to run", 120)
