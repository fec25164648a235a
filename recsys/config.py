"""Typed job configs: YAML file + dotted ``key=value`` overrides -> a validated pydantic model.

Every job has one config class (``extra="forbid"`` all the way down), so a misspelt key fails at
start with a message naming it, instead of silently becoming a default.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    pass


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str):  # PyYAML reads 3e-4 as a string (YAML 1.1 wants 3.0e-4)
        value = _number_or_text(value)
    return key.split("."), value


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set nested keys; creating a missing section is allowed, the schema decides if it exists."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{loc}'")
        else:
            lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load YAML (if given), apply overrides, validate; all problems are reported at once."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def parse_job_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Every job's command line: ``--config FILE`` then dotted ``key=value`` overrides."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="YAML config of the job")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. optim.lr=3e-4 data.sequences.max_seq_len=20")
    return p.parse_args(argv)


def log_config(cfg: BaseModel, title: str = "config") -> None:
    log.info("%s:\n%s", title, json.dumps(cfg.model_dump(mode="json"), indent=2))
