"""Config validation: every mistake is reported with the name of the field that is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.ingest.sources import SourcesConfig, load_sources


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
    original = load_settings(RagtideSettings, api={"port": 61234}, batch={"window_ms": 7})
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
