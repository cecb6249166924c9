"""The Debezium connector: its config (infra/config/debezium-connector.json) and registration over Connect REST."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx
import psycopg

from ragtide.contracts import templates
from ragtide.contracts.errors import ConfigError, StackError
from ragtide.contracts.settings import KafkaSettings, RagtideSettings
from ragtide.ingest import pgsetup
from ragtide.ingest.sources import SourcesConfig, source_dbs

log = logging.getLogger(__name__)
T = TypeVar("T")


def connector_config(
    settings: RagtideSettings, sources: SourcesConfig, publication_mode: str = "filtered"
) -> dict[str, str]:
    """The connector config, rendered from the template in the repo. `publication_mode`: Debezium's
    publication.autocreate.mode; "filtered" creates or updates the publication (the tables' owner or a superuser
    only), "disabled" uses it as it is."""
    pg, c = settings.postgres, settings.connect
    values = {
        "PG_HOST": pg.host,
        "PG_PORT": str(pg.port),
        "PG_USER": pg.user,
        "PG_PASSWORD": pg.password.get_secret_value(),
        "PG_DATABASE": pg.database,
        "SLOT_NAME": c.slot_name,
        "PUBLICATION": c.publication,
        "TOPIC_PREFIX": c.topic_prefix,
        "TABLES": ",".join(sources.pg_tables),
        "HEARTBEAT_INTERVAL_MS": str(c.heartbeat_interval_ms),
        "POLL_INTERVAL_MS": str(c.poll_interval_ms),
        "PARTITIONS": str(settings.kafka.partitions),
        "REPLICATION_FACTOR": str(settings.kafka.replication),
        "HEARTBEAT_QUERY": pgsetup.HEARTBEAT_QUERY,
        "SIGNAL_TABLE": pgsetup.SIGNAL_TABLE,
        "PUBLICATION_MODE": publication_mode,
    }
    # JSON-escaped into the template: a password may hold any character
    rendered = templates.render("debezium-connector.json", {k: json.dumps(v)[1:-1] for k, v in values.items()})
    config: dict[str, str] = json.loads(rendered)
    if pg.sslmode:
        config["database.sslmode"] = pg.sslmode
    if pg.sslrootcert:
        config["database.sslrootcert"] = str(pg.sslrootcert)
    if not pg.source_writes:  # a read-only source: no heartbeat writes, no signal table
        del config["heartbeat.action.query"], config["signal.data.collection"]
    return config


def source_topics(settings: RagtideSettings, sources: SourcesConfig) -> list[str]:
    """The Kafka topic of each source table: <prefix>.<schema>.<table>."""
    return [f"{settings.connect.topic_prefix}.{t}" for t in sources.tables]


TOPIC_ALREADY_EXISTS = 36  # Kafka's error code: Debezium (or another node) created it first


async def ensure_topics(
    settings: RagtideSettings, topics: Sequence[str], wait_s: float = 30.0, partitions: int | None = None
) -> list[str]:
    """Create the source topics that do not exist yet, with Debezium's partition count (or `partitions`); returns
    those created.

    A table that is empty when Debezium snapshots it gets no topic until its first change. A consumer that
    subscribes before then is assigned none of its partitions ("Ignoring missing topic") and finds the topic
    only at its next metadata refresh, up to 5 minutes later: the table's first rows would wait that long.
    Not fatal: if Kafka cannot be reached in `wait_s` seconds, this warns and the consumer finds the topics
    at that refresh.
    """
    try:
        return await asyncio.wait_for(
            _create_missing(settings, topics, partitions or settings.kafka.partitions), wait_s
        )
    except Exception as exc:
        log.warning("could not create the missing source topics", extra={"error": repr(exc)})
        return []


async def _create_missing(settings: RagtideSettings, topics: Sequence[str], partitions: int) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**settings.kafka.client_config())
    await admin.start()
    try:
        missing = sorted(set(topics) - set(await admin.list_topics()))
        if not missing:
            return []
        response = await admin.create_topics([NewTopic(t, partitions, settings.kafka.replication) for t in missing])
        for name, code, *_ in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"creating topic {name} failed with Kafka error code {code}")
        log.info("created source topics", extra={"topics": missing})
        return missing
    finally:
        await admin.close()


async def broker_count(kafka: KafkaSettings) -> int:
    """How many brokers the cluster has."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka.client_config())
    await admin.start()
    try:
        return len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()


def check_replication(kafka: KafkaSettings) -> None:
    """Refuse a replication factor larger than the cluster: Connect would wait forever for its internal topics."""
    try:
        brokers = asyncio.run(asyncio.wait_for(broker_count(kafka), 30))
    except Exception as exc:
        raise StackError(
            f"cannot reach Kafka at {kafka.bootstrap} ({exc!r}); check kafka.bootstrap_servers and its "
            "security settings"
        ) from exc
    if kafka.replication > brokers:
        raise ConfigError(
            f"kafka.replication_factor is {kafka.replication} but Kafka at {kafka.bootstrap} has {brokers} "
            f"broker(s): set RAGTIDE_KAFKA__REPLICATION_FACTOR={brokers}"
        )


def register(settings: RagtideSettings, sources: SourcesConfig, timeout: float = 120.0) -> list[str]:
    """Create or update the connector and wait until its task runs with this config.

    Tables added to an existing connector get their existing rows through an incremental snapshot (a signal
    row in Debezium's signal table) while the stream goes on. Returns those tables.
    """
    url = f"{settings.connect.url}/connectors/{settings.connect.connector_name}"
    covered = pgsetup.publication_covers(
        settings.postgres.dsn(), settings.connect.publication, pgsetup.publication_tables(settings, sources)
    )
    config = connector_config(settings, sources, "disabled" if covered else "filtered")
    with httpx.Client(timeout=30.0) as http:
        existing = apply_config(http, url, config, timeout)
        wait_running(http, url, timeout)
    if existing is None:
        return []
    before = set(existing.get("table.include.list", "").split(","))
    added = [t for t in sources.pg_tables if t not in before]
    if added and settings.postgres.source_writes:  # read-only: Stack.apply_sources reads them
        snapshot_until_started(settings, added)
    return added


def apply_config(http: httpx.Client, url: str, config: dict[str, str], timeout: float) -> dict[str, str] | None:
    """Make the connector at `url` run `config`; returns the config it had (None: it did not exist).

    An unchanged config is left as it is: a PUT restarts the task, a pause in the stream for nothing. A changed one
    is applied with the connector stopped (stop, PUT, resume): Connect restarts a running connector some moments
    after a PUT, so a status read in between still shows the old task RUNNING, and `up` returned while the old
    config ran and the task was about to restart. Once it was STOPPED with no tasks, every RUNNING seen is the new
    config's. It is resumed whatever happened in between: a stop that timed out or a rejected config leaves it
    running as it was, never stopped.
    """
    existing = current_config(http, url, timeout)
    if existing is None:
        _put_config(http, url, config, timeout)
        return None
    if _retrying(lambda: _stopped(http, url), "the connector's status", timeout):
        raise StackError(
            f"connector {url.rsplit('/', 1)[-1]} is stopped (a `ragtide resync` that did not finish, or a PUT "
            f"{url}/stop): run `ragtide resync`, which takes it up again from the source as it is now; if it was "
            f"stopped on purpose and its position still holds, resume it: curl -X PUT {url}/resume"
        )
    if not config_changed(existing, config):
        return existing
    try:
        stop(http, url, timeout)
        _put_config(http, url, config, timeout)
    except BaseException as exc:
        try:
            resume(http, url, timeout)
        except Exception as again:  # both said: the first is why, the second that it may be left stopped
            raise StackError(
                f"{exc}; resuming the connector failed too ({again}), so it may be stopped: once Connect answers, "
                f"curl -X PUT {url}/resume"
            ) from exc
        raise
    resume(http, url, timeout)
    return existing


def _stopped(http: httpx.Client, url: str) -> bool:
    resp = http.get(f"{url}/status")
    if resp.status_code == 404:  # a connector just created has a config before it has a status: not stopped
        return False
    return bool(resp.raise_for_status().json()["connector"]["state"] == "STOPPED")


def config_changed(existing: dict[str, str], desired: dict[str, str]) -> bool:
    """Whether the connector's config (as Connect returns it: with its "name") differs from `desired`. A
    publication created by Debezium ("filtered") that now covers the tables is rendered "disabled": the same
    stream, so no change."""
    have = {k: v for k, v in existing.items() if k != "name"}
    mode = "publication.autocreate.mode"
    if have.get(mode) == "filtered" and desired.get(mode) == "disabled":
        have[mode] = "disabled"
    return have != desired


def current_config(http: httpx.Client, url: str, timeout: float) -> dict[str, str] | None:
    """The connector's config; None only when Connect says there is no such connector (404). A 409 (Connect
    rebalancing), a 5xx or a connection error is asked again until `timeout` (taken for "absent", it would PUT a
    running connector's config without stopping it); any other status is a StackError at once."""

    def read() -> dict[str, str] | None:
        resp = http.get(f"{url}/config")
        if resp.status_code == 404:
            return None
        config: dict[str, str] = resp.raise_for_status().json()
        return config

    return _retrying(read, "the connector's config", timeout)


def wait_running(http: httpx.Client, url: str, timeout: float) -> None:
    """Wait until the connector and each of its tasks (at least one) run; StackError on a FAILED one or after
    `timeout`."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        st = http.get(f"{url}/status")
        if st.is_success:
            body = st.json()
            tasks = body.get("tasks", [])
            states = [body["connector"]["state"], *(t["state"] for t in tasks)]
            last = json.dumps(body)[:2000]
            if tasks and all(s == "RUNNING" for s in states):
                return
            if "FAILED" in states:
                raise StackError(f"connector failed: {last}")
        time.sleep(0.5)
    raise StackError(f"connector not running after {timeout:.0f}s: {last}")


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `check` every half second; StackError after `timeout`. An error that may pass counts as not yet: a
    409 (Connect rebalancing), a 5xx, a connection error. Any other HTTP status (a wrong URL, credentials) is a
    StackError at once. (stack.process has the native stack's own, which reads daemons' logs; ingest stays below
    stack.)"""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            if code != 409 and code < 500:
                raise StackError(
                    f"Connect answered {code} to {exc.request.method} {exc.request.url} while waiting for {what}: "
                    f"{exc.response.text[:500]}"
                ) from exc
            last = exc
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})")


def _retrying(read: Callable[[], T], what: str, timeout: float) -> T:
    """`read()`'s value, asked again while it raises an HTTP error that may pass (see wait_until)."""
    got: list[T] = []

    def once() -> bool:
        got.append(read())
        return True

    wait_until(once, what, timeout)
    return got[0]


def _put_config(http: httpx.Client, url: str, config: dict[str, str], timeout: float = 120.0) -> None:
    _put(http, f"{url}/config", "the connector config", timeout, config)


def _put(http: httpx.Client, url: str, what: str, timeout: float, body: dict[str, str] | None = None) -> None:
    """PUT to Connect; a 409 (Connect rebalancing, as it does right after a stop) or a connection error is tried
    again until `timeout`, any other error is a StackError naming `what`."""

    def put() -> bool:
        resp = http.put(url, json=body)
        if resp.status_code == 409:
            resp.raise_for_status()  # tried again, and named if it times out
        if resp.status_code >= 400:
            raise StackError(f"Connect rejected {what} ({resp.status_code}): {resp.text}")
        return True

    wait_until(put, f"Connect to take {what}", timeout)


def connector_state(http: httpx.Client, url: str) -> tuple[str, list[str]]:
    """The state of the connector at `url` (Connect's /connectors/<name>) and of each of its tasks."""
    body = http.get(f"{url}/status").raise_for_status().json()
    return body["connector"]["state"], [t["state"] for t in body.get("tasks", [])]


def stop(http: httpx.Client, url: str, timeout: float = 120.0) -> None:
    """Stop the connector (`PUT <url>/stop`: its tasks end, its config and offsets stay) and wait until it is
    STOPPED with no tasks (a task's status can still read RUNNING a moment after the connector's reads STOPPED)."""
    _put(http, f"{url}/stop", "the stop", timeout)
    wait_until(lambda: connector_state(http, url) == ("STOPPED", []), "the connector to stop", timeout)


def resume(http: httpx.Client, url: str, timeout: float = 120.0) -> None:
    """Resume a stopped or paused connector (`PUT <url>/resume`), asked again while Connect rebalances."""
    _put(http, f"{url}/resume", "the resume", timeout)


def signal_snapshots(settings: RagtideSettings, sources: SourcesConfig, tables: list[str]) -> None:
    """Signal an incremental snapshot of `tables` (identities) in each source database that holds some of them and
    may be written to (a read-only one has no signal table: its rows are read by verify --repair instead)."""
    for db in source_dbs(settings, sources):
        mine = [s.table for s in db.sources.all if s.id in tables]
        if mine and db.settings.postgres.source_writes:
            signal_incremental_snapshot(db.settings.postgres.dsn(), mine)


def signal_incremental_snapshot(dsn: str, tables: list[str]) -> str:
    """Ask Debezium (through its signal table) to snapshot `tables` incrementally; returns the signal id."""
    signal_id = uuid.uuid4().hex
    data = json.dumps({"data-collections": tables, "type": "incremental"})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {pgsetup.SIGNAL_TABLE} (id, type, data) VALUES (%s, 'execute-snapshot', %s)",
            (signal_id, data),
        )
    return signal_id


def _rows_in_source(dsn: str, table: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone() == (True,)  # validated name


async def _topic_has_records(kafka: KafkaSettings, topic: str) -> bool:
    return sum((await topic_end_offsets(kafka, topic)).values()) > 0


async def topic_end_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    """Partition -> end offset of `topic` (empty when it does not exist)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka.client_config())
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            return {}
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    parts = [TopicPartition(topic, int(p["partition"])) for d in described for p in d.get("partitions", [])]
    if not parts:
        return {}
    consumer = AIOKafkaConsumer(**kafka.client_config(), enable_auto_commit=False)
    await consumer.start()
    try:
        return {tp.partition: int(end) for tp, end in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()


def snapshot_until_started(
    settings: RagtideSettings, tables: list[str], attempts: int = 4, wait_s: float = 20.0
) -> None:
    """Signal an incremental snapshot of `tables`; return once each table with rows has records in its topic
    (so a consumer started next finds the topic: Faust ignores topics that do not exist yet), signalling again
    while one has produced nothing.

    Right after a connector reconfiguration Connect may still be restarting the task: a signal that the old task
    picks up is lost with it (Debezium then logs "Received request to close window ... request ignored").
    A repeated signal is harmless: snapshot reads are idempotent in the index.
    """
    import asyncio

    dsn = settings.postgres.dsn()
    pending = [t for t in tables if _rows_in_source(dsn, t)]
    for attempt in range(1, attempts + 1):
        signal_incremental_snapshot(dsn, tables if attempt == 1 else pending)
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            pending = [
                t
                for t in pending
                if not asyncio.run(_topic_has_records(settings.kafka, f"{settings.connect.topic_prefix}.{t}"))
            ]
            time.sleep(0.5)
        if not pending:
            return
    raise StackError(f"Debezium did not start the incremental snapshot of {pending} after {attempts} signals")
