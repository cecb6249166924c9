"""Applying the connector's config over Connect's REST API, against a double of Connect that answers as Connect
does at its awkward moments (409 while it rebalances, a stop that takes a while). The real Connect:
tests/e2e/test_connector.py."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx
import pytest

from ragtide.contracts.errors import StackError
from ragtide.ingest import connector

URL = "http://connect.test/connectors/ragtide"
CONFIG = {
    "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "publication.autocreate.mode": "disabled",
}


@dataclass
class FakeConnect:
    """Connect's answers for one connector. `stops_after`: status reads before a stop shows (after that it shows
    STOPPED with no tasks); `stale_task_reads`: status reads after the connector is STOPPED that still list the old
    task RUNNING; `forced`: status codes to answer a request ("PUT /config") with, first to last, before answering
    it as Connect would; `always`: a status code a request always gets."""

    config: dict[str, str] | None = None
    state: str = "RUNNING"
    stops_after: int | None = 0
    stale_task_reads: int = 0
    forced: dict[str, list[int]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    _stopping: int | None = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/connectors/ragtide") or "/"
        call = f"{request.method} {path}"
        self.calls.append(call)
        code = self.always.get(call) or (self.forced[call].pop(0) if self.forced.get(call) else None)
        if code is not None:
            return httpx.Response(code, json={"message": f"answered {code}"})
        if self.config is None and path != "/config":
            return httpx.Response(404, json={"message": "no such connector"})
        if request.method == "GET" and path == "/config":
            if self.config is None:
                return httpx.Response(404, json={"message": "no such connector"})
            return httpx.Response(200, json={**self.config, "name": "ragtide"})
        if request.method == "PUT" and path == "/config":
            self.config = json.loads(request.content)
            return httpx.Response(200, json={})
        if request.method == "PUT" and path == "/stop":
            self._stopping = 0
            return httpx.Response(202)
        if request.method == "PUT" and path == "/resume":
            self.state, self._stopping = "RUNNING", None
            return httpx.Response(202)
        if request.method == "GET" and path == "/status":
            return httpx.Response(200, json=self._status())
        raise AssertionError(f"unexpected {request.method} {path}")

    def _status(self) -> dict[str, object]:
        tasks = [{"id": 0, "state": "RUNNING"}]
        if self._stopping is not None:
            self._stopping += 1
            if self.stops_after is not None and self._stopping > self.stops_after:
                self.state = "STOPPED"
                if self._stopping > self.stops_after + self.stale_task_reads:
                    tasks = []
        return {"connector": {"state": self.state}, "tasks": tasks}

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda _: None)  # the polls between status reads


def test_a_new_connector_is_created() -> None:
    fake = FakeConnect()
    with fake.client() as http:
        assert connector.apply_config(http, URL, CONFIG, timeout=5) is None
    assert fake.config == CONFIG
    assert "PUT /stop" not in fake.calls


def test_an_unchanged_config_is_not_written_again() -> None:
    fake = FakeConnect(config=dict(CONFIG))
    with fake.client() as http:
        assert connector.apply_config(http, URL, CONFIG, timeout=5) == {**CONFIG, "name": "ragtide"}
    assert [c for c in fake.calls if c.startswith("PUT")] == []


def test_a_publication_debezium_created_that_now_covers_the_tables_is_no_change() -> None:
    """The first registration lets Debezium create the publication ("filtered"); once it covers the tables the
    config renders "disabled", which streams the same: no stop and restart for it."""
    fake = FakeConnect(config={**CONFIG, "publication.autocreate.mode": "filtered"})
    with fake.client() as http:
        connector.apply_config(http, URL, CONFIG, timeout=5)
    assert [c for c in fake.calls if c.startswith("PUT")] == []
    assert connector.config_changed({**CONFIG, "publication.autocreate.mode": "disabled"}, {**CONFIG, "x": "1"})
    assert connector.config_changed(CONFIG, {**CONFIG, "publication.autocreate.mode": "filtered"})


def test_a_changed_config_is_put_while_the_connector_is_stopped_with_no_tasks() -> None:
    fake = FakeConnect(config=dict(CONFIG), stops_after=2, stale_task_reads=3)
    wanted = {**CONFIG, "table.include.list": "public.docs,public.notes"}
    with fake.client() as http:
        connector.apply_config(http, URL, wanted, timeout=5)
    assert fake.config == wanted
    puts = [c for c in fake.calls if c.startswith("PUT")]
    assert puts == ["PUT /stop", "PUT /config", "PUT /resume"]
    # the config went in only after a status with the connector STOPPED and its old task gone
    before_put = fake.calls[: fake.calls.index("PUT /config")]
    assert before_put.count("GET /status") >= 1 + 2 + 3 + 1


def test_a_stop_that_never_shows_still_resumes_the_connector() -> None:
    """A stop that timed out must not leave the connector stopped: the next `up` would refuse it and send the user
    to a full resync."""
    fake = FakeConnect(config=dict(CONFIG), stops_after=None)
    with fake.client() as http, pytest.raises(StackError, match="the connector to stop"):
        connector.apply_config(http, URL, {**CONFIG, "slot.name": "other"}, timeout=1)
    assert fake.calls[-1] == "PUT /resume"
    assert fake.config == CONFIG  # never written


def test_a_rebalancing_connect_is_asked_again_not_taken_for_no_connector() -> None:
    """A 409 on GET /config is Connect rebalancing: read as "absent", the changed config would be PUT on the
    running connector without stopping it."""
    fake = FakeConnect(config=dict(CONFIG), forced={"GET /config": [409, 409]})
    with fake.client() as http:
        connector.apply_config(http, URL, {**CONFIG, "slot.name": "other"}, timeout=5)
    assert fake.calls[:3] == ["GET /config", "GET /config", "GET /config"]
    assert [c for c in fake.calls if c.startswith("PUT")] == ["PUT /stop", "PUT /config", "PUT /resume"]


def test_a_config_put_refused_during_a_rebalance_is_tried_again_and_a_rejected_one_named() -> None:
    fake = FakeConnect(config=dict(CONFIG), forced={"PUT /config": [409]})
    with fake.client() as http:
        connector.apply_config(http, URL, {**CONFIG, "slot.name": "other"}, timeout=5)
    assert fake.config == {**CONFIG, "slot.name": "other"}
    assert fake.calls.count("PUT /config") == 2

    def rejecting(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"message": "slot.name is invalid"})

    with httpx.Client(transport=httpx.MockTransport(rejecting)) as http, pytest.raises(StackError, match=r"slot\.name"):
        connector._put_config(http, URL, CONFIG, timeout=5)


def test_a_stopped_connector_is_refused_with_what_to_run() -> None:
    fake = FakeConnect(config=dict(CONFIG), state="STOPPED")
    with fake.client() as http, pytest.raises(StackError, match="ragtide resync") as err:
        connector.apply_config(http, URL, {**CONFIG, "slot.name": "other"}, timeout=5)
    assert f"curl -X PUT {URL}/resume" in str(err.value)
    assert [c for c in fake.calls if c.startswith("PUT")] == []


def test_a_stop_and_a_resume_that_both_fail_say_both_and_how_to_resume() -> None:
    fake = FakeConnect(config=dict(CONFIG), stops_after=None, always={"PUT /resume": 500})
    with fake.client() as http, pytest.raises(StackError) as err:
        connector.apply_config(http, URL, {**CONFIG, "slot.name": "other"}, timeout=1)
    said = str(err.value)
    assert "the connector to stop" in said and "resuming the connector failed too" in said
    assert f"curl -X PUT {URL}/resume" in said


def test_an_answer_that_will_not_change_fails_at_once() -> None:
    """A 401 (credentials) or a 404 on a path that should exist is not waited out for two minutes."""
    fake = FakeConnect(config=dict(CONFIG), always={"GET /config": 401})
    with fake.client() as http, pytest.raises(StackError, match="401"):
        connector.apply_config(http, URL, CONFIG, timeout=60)
    assert fake.calls == ["GET /config"]


def test_a_connector_with_a_config_and_no_status_yet_is_not_taken_for_stopped() -> None:
    fake = FakeConnect(config=dict(CONFIG), forced={"GET /status": [404]})
    with fake.client() as http:
        connector.apply_config(http, URL, CONFIG, timeout=5)
    assert fake.calls == ["GET /config", "GET /status"]


def test_a_put_that_keeps_meeting_a_rebalance_times_out_naming_it() -> None:
    fake = FakeConnect(always={"PUT /config": 409})
    with fake.client() as http, pytest.raises(StackError, match="409"):
        connector.apply_config(http, URL, CONFIG, timeout=1)
