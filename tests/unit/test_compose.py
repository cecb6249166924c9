"""docker-compose.yml cannot run here (no Docker engine): parse it and check it agrees with the native stack."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.stack.postgres import SERVER_SETTINGS

COMPOSE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def pom_version(name: str) -> str:
    m = re.search(rf"<{name}>([^<]+)</{name}>", (REPO_ROOT / "infra" / "maven" / "pom.xml").read_text())
    assert m, name
    return m.group(1)


def pinned(package: str) -> str:
    m = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M | re.I)
    assert m, package
    return m.group(1)


def image_tag(compose: dict[str, Any], service: str) -> str:
    return str(compose["services"][service]["image"]).rsplit(":", 1)[1]


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` and `${VAR:?error}` as a user with only POSTGRES_PASSWORD=x set sees them."""
    value = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "x", value)
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def env_of(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in compose["services"][service]["environment"].items()}


def test_images_match_the_native_stack_versions(compose: dict[str, Any]) -> None:
    assert image_tag(compose, "kafka") == pom_version("kafka.version")
    assert image_tag(compose, "connect") == pom_version("debezium.version")
    assert image_tag(compose, "postgres").split(".")[0] == "15"
    major_minor = ".".join(pinned("qdrant-client").split(".")[:2])
    assert image_tag(compose, "qdrant").lstrip("v").startswith(major_minor + ".")


def test_postgres_runs_with_the_native_wal_settings(compose: dict[str, Any]) -> None:
    command = compose["services"]["postgres"]["command"]
    for key in ("wal_level", "max_wal_senders", "max_replication_slots", "max_slot_wal_keep_size", "wal_writer_delay"):
        assert f"-c {key}={SERVER_SETTINGS[key]}" in command


def test_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep == "connector-init" else "service_healthy"
            assert cond == {"condition": want}, f"{name} -> {dep}"
            if want == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"


def test_ragtide_env_names_real_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fields = RagtideSettings.model_fields
    for service in ("embedder", "retriever", "connector-init"):
        env = env_of(compose, service)
        for key in env:
            if key == "QDRANT_URL":
                continue
            assert key.startswith("RAGTIDE_"), key
            path = key.removeprefix("RAGTIDE_").lower().split("__")
            assert path[0] in fields, f"{service}: {key} is not a setting"
            if len(path) == 2:
                section = fields[path[0]].annotation
                assert path[1] in section.model_fields, f"{service}: {key} is not a setting"  # type: ignore[union-attr]
        for key in [k for k in os.environ if k.startswith("RAGTIDE_") or k == "QDRANT_URL"]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s = load_settings(RagtideSettings)
        assert s.qdrant_url == "http://qdrant:6333" and s.kafka.bootstrap == "kafka:9092"
        assert s.postgres.host == "postgres" and s.connect.url == "http://connect:8083"


def test_no_default_secrets(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    for m in re.finditer(r"PASSWORD:\s*(\S+)", text):
        assert m.group(1).startswith("${POSTGRES_PASSWORD:?"), m.group(0)


def test_retriever_port_matches_its_api_setting(compose: dict[str, Any]) -> None:
    svc = compose["services"]["retriever"]
    port = env_of(compose, "retriever")["RAGTIDE_API__PORT"]
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])
    assert compose["services"]["vllm"]["profiles"] == ["gpu"]


def test_docker_compose_config_when_the_client_can() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client")
    out = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "POSTGRES_PASSWORD": "test"},
    )
    assert out.returncode == 0, out.stderr
