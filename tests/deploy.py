"""What the deployment tests share: reading docker-compose.yml as a container sees it, and checking that an
environment names real settings and builds them (tests/unit/test_compose.py, tests/unit/test_k8s.py)."""

from __future__ import annotations

import copy
import os
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pytest
import yaml
from pydantic import BaseModel

from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings

MonkeyPatch = pytest.MonkeyPatch
D = TypeVar("D")

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = REPO_ROOT / "docker-compose.gpu.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PROJECT_SERVICES = ("connector-init", "embedder", "retriever")
# What a user sets in the shell: only the one secret the file insists on.
SHELL_ENV = {
    "POSTGRES_PASSWORD": "compose-test-secret",
    "RAGTIDE_ADMIN_KEY": "5d0f8e2a9c4b7163e8f1a2d4c6b9e0f37a5c8d1e2b4f6a9c0d3e5f7a1b2c4d6e",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|APIKEY|ADMIN_KEY", re.I)
REQUIRED_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
WILDCARD_HOSTS = {"", "0.0.0.0"}

Compose = dict[str, Any]


def load_compose(gpu: bool = False) -> Compose:
    """docker-compose.yml, merged with docker-compose.gpu.yml when `gpu` (`docker compose -f a -f b`)."""
    doc: Compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    if gpu:
        merge_compose(doc, yaml.safe_load(COMPOSE_GPU_FILE.read_text(encoding="utf-8")))
    return doc


def merge_compose(doc: Compose, override: Mapping[str, Any]) -> None:
    """Compose's merge of a second file: mappings merge key by key, anything else is replaced."""
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(doc.get(key), dict):
            merge_compose(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def mutated(doc: D, change: Callable[[D], object]) -> D:
    """A deep copy of a document (compose file, list of Kubernetes objects) with one change applied."""
    out = copy.deepcopy(doc)
    change(out)
    return out


REF = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, shell: Mapping[str, str]) -> str:
    """Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}."""

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg, val = m["op"], m["arg"] or "", shell.get(name)
        unset_or_empty = val is None or (val == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else str(val)
        if op in (":?", "?"):
            if unset_or_empty:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return str(val)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return val or ""

    return REF.sub(sub, value)


def raw_environment(svc: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's environment as written (mapping or list form); None = passed through from the shell."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return dict(pairs)
    return {str(k): None if v is None else _scalar(v) for k, v in env.items()}


def _scalar(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def environment(doc: Compose, service: str, shell: Mapping[str, str] = SHELL_ENV) -> dict[str, str]:
    """A service's environment as the container sees it with `shell` as the user's environment."""
    env = {}
    for k, v in raw_environment(doc["services"][service]).items():
        if v is not None:
            env[k] = interpolate(v, shell)
        elif k in shell:
            env[k] = shell[k]
    return env


def image_tag(doc: Compose, service: str) -> tuple[str, str]:
    repo, _, tag = str(doc["services"][service]["image"]).rpartition(":")
    return repo, tag


def pom_version(name: str) -> str:
    pom = (REPO_ROOT / "infra" / "maven" / "pom.xml").read_text(encoding="utf-8")
    m = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", pom)
    assert m, f"{name} not in infra/maven/pom.xml"
    return m.group(1).strip()


def pinned(package: str) -> str:
    text = (REPO_ROOT / "constraints.txt").read_text()
    m = re.search(rf"^{re.escape(package)}==(\S+)\s*$", text, re.M | re.I)
    assert m, f"{package} not pinned in constraints.txt"
    return m.group(1)


def parse_properties(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def settings_from(env: Mapping[str, str], monkeypatch: MonkeyPatch) -> RagtideSettings:
    """RagtideSettings exactly as a container with this environment builds them (nothing from our shell)."""
    for key in list(os.environ):
        if key.upper().startswith("RAGTIDE_") or key.upper() == "QDRANT_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(RagtideSettings)


def command_words(svc: Mapping[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def listener_map(value: str) -> dict[str, tuple[str, int]]:
    """`PLAINTEXT://host:9092,CONTROLLER://:9093` -> {"PLAINTEXT": ("host", 9092), ...}."""
    out = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        name, _, rest = item.partition("://")
        host, _, port = rest.rpartition(":")
        out[name] = (host, int(port))
    return out


def published_container_ports(svc: Mapping[str, Any]) -> list[int]:
    ports = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            ports.append(int(p["target"]))
        else:
            ports.append(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def settings_env_problems(env: Mapping[str, object]) -> list[str]:
    """Every RAGTIDE_* name resolves to a field of RagtideSettings or of one of its sections."""
    problems = []
    fields = RagtideSettings.model_fields
    for key in env:
        if key == "QDRANT_URL" or not key.upper().startswith("RAGTIDE_"):
            continue
        if key != key.upper():
            problems.append(f"{key}: settings variables are upper case")
        path = key[len("RAGTIDE_") :].lower().split("__")
        field = fields.get(path[0])
        if field is None:
            problems.append(f"{key}: RagtideSettings has no field {path[0]!r}")
            continue
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            if len(path) != 2 or path[1] not in section.model_fields:
                problems.append(f"{key}: {section.__name__} has no field {'.'.join(path[1:])!r}")
        elif len(path) != 1:
            problems.append(f"{key}: {path[0]} is not a section")
    return problems
