"""Render the config templates in infra/config with values from the settings."""

from __future__ import annotations

import string
from pathlib import Path

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "infra" / "config"


def render(name: str, values: dict[str, str]) -> str:
    """Fill `${NAME}` placeholders of infra/config/<name>; a missing value is a ConfigError."""
    text = (CONFIG_DIR / name).read_text(encoding="utf-8")
    try:
        return string.Template(text).substitute(values)
    except KeyError as exc:
        raise ConfigError(f"infra/config/{name} needs a value for ${{{exc.args[0]}}}") from exc


def write(name: str, values: dict[str, str], target: Path) -> Path:
    """Render a template into `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(name, values), encoding="utf-8")
    return target
