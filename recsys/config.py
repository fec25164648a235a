"""Typed job configs: YAML file + dotted overrides -> a validated pydantic model.

Every job has one config class (``extra="forbid"`` all the way down), so a misspelt key fails at
start with a message naming it, instead of silently becoming a default.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True)


class ConfigError(ValueError):
    pass


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 0.0003). Values are parsed as YAML scalars/lists."""
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
    return key, value


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"``; returns ``data`` (changed in place).

    The project's one way to apply an override: command-line strings are parsed first
    (:func:`parse_override`), typed values (pipeline stage overrides, sampled sweep values) are
    set as they are. A missing or null section is created (the schema decides if it exists);
    a key under a plain value is an error naming both.
    """
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override key {key!r} has an empty key segment")
    node = data
    *path, last = key.split(".")
    for part in path:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[last] = value
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] = (),
                    values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Apply ``key=value`` strings, then already-typed ``values`` (dotted key -> value), in
    order: a later key wins, and a whole section set after a dotted key replaces it."""
    for item in overrides:
        set_dotted(data, *parse_override(item))
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
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


def load_config(cls: type[T], path: str | Path | None, overrides: Iterable[str] | None = None,
                values: Mapping[str, Any] | None = None) -> T:
    """Load YAML (if given), apply overrides, validate; all problems are reported at once.

    ``overrides`` are command-line strings (``optim.lr=3e-4``); ``values`` maps dotted keys to
    values that are already typed (``{"optim.epochs": 5}``), applied after the strings.
    """
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
    data = apply_overrides(data, overrides or (), values)
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
    """The whole validated config in the log; with a job log file, one line on the console."""
    from recsys.logs import FILE_ONLY_RECORD, log_files

    text = json.dumps(cfg.model_dump(mode="json"), indent=2)
    files = log_files()
    if not files:
        log.info("%s:\n%s", title, text)
        return
    log.info("%s:\n%s", title, text, extra=FILE_ONLY_RECORD)
    log.info("%s: config validated (in full in %s)", title, files["driver"])
