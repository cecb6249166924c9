"""Config validation: every mistake is reported with the name of the field that is wrong."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ragtide.contracts.errors import ConfigError, StackError
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings, redact_dsn
from ragtide.ingest.sources import SourcesConfig, dsn_of, load_sources, source_dbs


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sources.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_repo_sources_file_is_valid() -> None:
    cfg = load_sources(REPO_ROOT / "config" / "sources.yaml")
    docs = cfg.get("public.docs")
    assert docs is not None and docs.key == ("id",) and docs.text_columns == ("title", "body")


@pytest.mark.parametrize(
    ("yaml_text", "field", "why"),
    [
        ("sources:\n  - {table: docs, key: [id], text: '{body}'}", "sources.0.table", "pattern"),
        ("sources:\n  - {table: public.docs, key: [], text: '{body}'}", "sources.0.key", "at least 1"),
        ("sources:\n  - {table: public.docs, key: [id], text: 'no fields'}", "sources.0.text", "names no column"),
        ("sources:\n  - {table: public.docs, key: [id], text: '{body'}", "sources.0.text", "not a valid template"),
        ("sources:\n  - {table: public.docs, key: [id], text: '{a.b}'}", "sources.0.text", "plain column"),
        ("sources:\n  - {table: public.docs, key: [id], text: '{b}', colour: red}", "sources.0.colour", "Extra"),
        ("sources: []", "sources", "at least 1"),
        (
            "sources:\n  - {table: public.a, key: [id], text: '{b}'}\n  - {table: public.a, key: [id], text: '{b}'}",
            "(root)",
            "listed twice",
        ),
    ],
)
def test_sources_errors_name_the_field(tmp_path: Path, yaml_text: str, field: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_sources(write(tmp_path, yaml_text))
    assert f"{field}:" in str(err.value)
    assert why in str(err.value)


def test_missing_and_unparsable_sources_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_sources(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sources(write(tmp_path, "sources: [unclosed"))


def test_render_text_metadata_and_tenant() -> None:
    cfg = SourcesConfig.model_validate(
        {
            "sources": [
                {
                    "table": "public.t",
                    "key": ["a", "b"],
                    "text": "{title}: {body}",
                    "metadata": ["m"],
                    "tenant_column": "org",
                }
            ]
        }
    )
    src = cfg.sources[0]
    assert src.render_text({"title": "T", "body": None}) == "T:"
    assert src.render_metadata({"m": 3, "x": 1}) == {"m": 3}
    assert src.tenant_of({"org": 9}) == "9" and src.tenant_of({}) == ""


def test_settings_from_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGTIDE_POSTGRES__PORT", "6543")
    monkeypatch.setenv("QDRANT_URL", "http://127.0.0.1:6333")
    s = load_settings(RagtideSettings)
    assert s.postgres.port == 6543 and s.qdrant_url == "http://127.0.0.1:6333"
    env = s.to_env()
    assert env["RAGTIDE_POSTGRES__PORT"] == "6543" and env["QDRANT_URL"] == "http://127.0.0.1:6333"
    monkeypatch.setenv("RAGTIDE_KAFKA__PARTITIONS", "0")
    with pytest.raises(ConfigError, match=r"kafka\.partitions:"):
        load_settings(RagtideSettings)


def test_settings_round_trip_through_env(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = {"url": "http://tei:8080/v1", "model": "bge", "api_key": "sk-new", "keys": {"api.openai.com": "sk-o"}}
    original = load_settings(
        RagtideSettings, api={"port": 61234}, batch={"window_ms": 7}, encoder={"backend": "openai", "api": provider}
    )
    for k, v in original.to_env().items():
        monkeypatch.setenv(k, v)
    again = load_settings(RagtideSettings)
    assert again == original


def test_settings_are_frozen() -> None:
    s = load_settings(RagtideSettings)
    with pytest.raises(Exception, match="frozen"):
        s.log_level = "DEBUG"  # type: ignore[misc]


def test_batch_size_follows_the_encoder_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(RagtideSettings)
    assert (s.batch.events_per_batch(on_gpu=False), s.batch.events_per_batch(on_gpu=True)) == (256, 4096)
    assert "RAGTIDE_BATCH__MAX_EVENTS" not in s.to_env()  # the default travels as a default
    monkeypatch.setenv("RAGTIDE_BATCH__MAX_EVENTS", "64")
    assert load_settings(RagtideSettings).batch.events_per_batch(on_gpu=True) == 64
    monkeypatch.setenv("RAGTIDE_BATCH__MAX_EVENTS", "0")
    with pytest.raises(ConfigError, match=r"batch\.max_events:"):
        load_settings(RagtideSettings)


def test_the_static_member_id_is_stable_valid_for_kafka_and_follows_the_subscription(tmp_path: Path) -> None:
    kafka = load_settings(RagtideSettings).kafka
    topics = ["ragtide.public.docs", "ragtide.public.notes"]
    first = kafka.member_id(tmp_path, topics)
    assert first is not None and first == kafka.member_id(tmp_path, list(reversed(topics)))  # a restart: the same
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,249}", first)
    assert kafka.member_id(tmp_path, [*topics, "ragtide.public.added"]) != first  # a new table: a new member
    assert kafka.member_id(tmp_path / "other", topics) != first  # another checkout on the host
    assert load_settings(RagtideSettings, kafka={"instance_id": ""}).kafka.member_id(tmp_path, topics) is None


def test_more_source_databases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_DSN", "postgresql://indexer@billing-db:5433/billing")
    text = """
sources:
  - {table: public.docs, key: [id], text: "{body}"}
databases:
  billing:
    dsn: ${BILLING_DSN}
    source_writes: false
    sources:
      - {table: public.docs, key: [id], text: "{body}"}
"""
    cfg = load_sources(write(tmp_path, text))
    assert cfg.tables == ["public.docs", "ragtide.canary", "billing.public.docs"]
    assert cfg.pg_tables == ["public.docs", "ragtide.canary", "public.docs"]
    assert cfg.get("billing.public.docs").database == "billing"  # type: ignore[union-attr]
    settings = load_settings(RagtideSettings, sources_file=tmp_path / "sources.yaml")
    primary, billing = source_dbs(settings, cfg)
    assert (primary.name, primary.settings.connect.slot_name) == ("ragtide", "ragtide_slot")
    pg, c = billing.settings.postgres, billing.settings.connect
    assert (pg.host, pg.port, pg.database, pg.user, pg.managed, pg.source_writes) == (
        "billing-db",
        5433,
        "billing",
        "indexer",
        False,
        False,
    )
    assert pg.state() == settings.postgres.dsn()  # ragtide's state stays in one place
    assert (c.connector_name, c.slot_name, c.publication, c.topic_prefix) == (
        "ragtide-pg-billing",
        "ragtide_slot_billing",
        "ragtide_pub_billing",
        "ragtide.billing",
    )
    assert billing.sources.tables == ["billing.public.docs"] and billing.sources.pg_tables == ["public.docs"]
    assert dsn_of(settings, cfg)("billing.public.docs") == "postgresql://indexer@billing-db:5433/billing"


@pytest.mark.parametrize(
    ("databases", "message"),
    [
        ("{Billing: {dsn: x, sources: [{table: a.b, key: [id], text: '{v}'}]}}", "'Billing' is not a name"),
        ("{billing: {dsn: x, sources: []}}", "databases.billing.sources"),
        ("{billing: {sources: [{table: a.b, key: [id], text: '{v}'}]}}", "databases.billing.dsn"),
    ],
)
def test_source_database_mistakes_name_the_field(tmp_path: Path, databases: str, message: str) -> None:
    text = f"sources: [{{table: public.docs, key: [id], text: '{{body}}'}}]\ndatabases: {databases}\n"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sources(write(tmp_path, text))


def test_a_source_database_dsn_mistake_names_the_database(tmp_path: Path) -> None:
    text = (
        "sources: [{table: public.docs, key: [id], text: '{body}'}]\n"
        "databases: {billing: {dsn: 'postgresql://h/db', sources: [{table: a.b, key: [id], text: '{v}'}]}}\n"
    )
    cfg = load_sources(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"databases\.billing") as err:
        source_dbs(load_settings(RagtideSettings), cfg)
    assert "dsn must name user" in str(err.value)


def test_kafka_security_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"kafka: .*SASL_SSL needs sasl_username and sasl_password"):
        load_settings(RagtideSettings, kafka={"security_protocol": "SASL_SSL"})
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        load_settings(RagtideSettings, kafka={"bootstrap_servers": "no port"})
    k = load_settings(
        RagtideSettings,
        kafka={
            "bootstrap_servers": "a:9092,b:9092",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_username": "u",
            "sasl_password": 'p w"d',
            "sasl_mechanism": "SCRAM-SHA-256",
        },
    ).kafka
    assert not k.managed and k.bootstrap == "a:9092,b:9092"
    assert k.client_config() == {
        "bootstrap_servers": "a:9092,b:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "u",
        "sasl_plain_password": 'p w"d',
    }
    assert k.java_properties()["sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" password="p w\\"d";'
    )


def test_a_user_database_dsn_fills_the_postgres_section() -> None:
    pg = load_settings(
        RagtideSettings, postgres={"dsn": "postgresql://indexer:p%40ss@db.internal/shop?sslmode=require"}
    ).postgres
    assert (pg.host, pg.port, pg.database, pg.user, pg.password.get_secret_value(), pg.sslmode, pg.managed) == (
        "db.internal",
        5432,
        "shop",
        "indexer",
        "p@ss",
        "require",
        False,
    )
    assert pg.dsn() == "postgresql://indexer:p%40ss@db.internal:5432/shop?sslmode=require"
    with pytest.raises(ConfigError, match=r"postgres: .*dsn must name user"):
        load_settings(RagtideSettings, postgres={"dsn": "postgresql://db.internal/shop"})


def test_a_dsn_is_printed_without_its_password() -> None:
    assert redact_dsn("postgresql://indexer:s3cr%40t@db:5432/shop") == "postgresql://indexer:****@db:5432/shop"
    assert redact_dsn("postgresql://indexer@db/shop") == "postgresql://indexer@db/shop"
    assert redact_dsn("host=db user=u password='a b' dbname=x") == "host=db user=u password=**** dbname=x"
    assert redact_dsn("host=db password=secret") == "host=db password=****"


def test_any_password_survives_the_connector_config_and_kafka_replication_follows_where_it_runs() -> None:
    from ragtide.ingest.connector import connector_config

    sources = SourcesConfig.model_validate({"sources": [{"table": "a.b", "key": ["id"], "text": "{v}"}]})
    local = load_settings(RagtideSettings, postgres={"password": 'q"uo\\te\n$x'})
    config = connector_config(local, sources)
    assert config["database.password"] == 'q"uo\\te\n$x'
    assert config["topic.creation.default.replication.factor"] == "1"
    theirs = load_settings(RagtideSettings, kafka={"bootstrap_servers": "k:9092"})
    assert connector_config(theirs, sources)["topic.creation.default.replication.factor"] == "3"
    assert theirs.kafka.model_copy(update={"replication_factor": 2}).replication == 2


def test_a_missing_kafka_ca_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kafka: .*ssl_cafile .* is not a file"):
        load_settings(RagtideSettings, kafka={"ssl_cafile": str(tmp_path / "nope.pem")})


def test_a_dsn_with_two_hosts_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"postgres: .*name one host"):
        load_settings(RagtideSettings, postgres={"dsn": "postgresql://u@a,b/db"})


def test_every_default_listening_port_lies_below_the_ephemeral_range() -> None:
    """A server port inside Linux's ephemeral range (32768-60999) can be held by any outgoing connection's local end
    when the server (re)binds it: a node restarted after a load test failed with `address already in use` on its
    old default port for most of a minute. Every port `ragtide up` listens on by default stays below it, as the
    cluster's do, no two are equal, and the tests' free ports never are one of them."""
    from ragtide.contracts.settings import default_ports
    from ragtide.stack.process import free_port

    ports = default_ports()
    assert {name: p for name, p in ports.items() if not 1024 <= p < 32768} == {}
    assert len(set(ports.values())) == len(ports)
    assert RagtideSettings().api.port == ports["api.port"] or "RAGTIDE_API__PORT" in os.environ
    for name in ("api.port", "postgres.port", "cluster.base_port + 0"):
        with pytest.raises(StackError, match="no free port"):  # the one candidate is a default: never handed out
            free_port(low=ports[name], high=ports[name] + 1)
