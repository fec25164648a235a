"""The Serve config (serve/config.yaml) read with Ray's own schema, for deploying from Python.

``serve deploy`` / KubeRay validate the file with ``ray.serve.schema.ServeDeploySchema``; the
pipeline's deploy stage and the benchmarks use the same schema here, so an option means the same
thing on both paths. Ray's schema ignores unknown keys on purpose (an older Serve accepts a newer
config); we do not: a misspelt key (``max_queued_request``) would silently deploy the default,
so every key is checked against the schema's fields and all problems are raised at once, each
naming the file and the key.
"""

from __future__ import annotations

import difflib
import os
import secrets
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema


class ServeConfigError(ValueError):
    """A Serve config that Ray's schema refuses or that has keys it would ignore."""


def load_serve_config(path: str | Path, deployments: Collection[str] = ()) -> ServeDeploySchema:
    """Read and validate a Serve config; ``deployments``, if given, are the deployment names the
    app has (an options block for any other name would be dropped, so it is an error)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ServeConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ServeConfigError(f"{path}: expected a mapping (http_options, applications, ...)")
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        problems = [f"{_loc(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ServeConfigError(_report(path, problems)) from None
    problems = _unknown_keys(config, raw, "")
    for i, app in enumerate(config.applications):
        for j, dep in enumerate(app.deployments):
            where = f"applications[{i}].deployments[{j}]"
            if deployments and dep.name not in deployments:
                problems.append(f"{where}: no deployment named {dep.name!r} in app "
                                f"{app.name!r}{_hint(dep.name, deployments)}")
            if isinstance(dep.autoscaling_config, dict):  # the schema keeps it a plain dict
                problems += _check_autoscaling(dep.autoscaling_config,
                                               f"{where}.autoscaling_config")
    if problems:
        raise ServeConfigError(_report(path, problems))
    return config


def deployment_options(app: ServeApplicationSchema, name: str) -> dict[str, Any]:
    """Every option the config sets for deployment ``name`` (as ``Deployment.options`` takes
    them: unset ones are left to the ``@serve.deployment`` defaults); {} if it sets none."""
    for dep in app.deployments:
        if dep.name == name:
            return dep.model_dump(exclude_unset=True, exclude={"name"})
    return {}


def with_env_vars(options: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``options`` with ``env`` merged into the replicas' ``runtime_env.env_vars`` (over what the
    config sets there). Never a secret: the Ray dashboard shows a runtime_env to anyone who
    can reach it; secrets travel as files (``secret_file``) whose paths go here."""
    if not env:
        return dict(options)
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
    actor["runtime_env"] = runtime_env
    return {**options, "ray_actor_options": actor}


def secret_file(path: Path, content: str | None = None) -> tuple[Path, bool]:
    """A file only its owner may read (0600), holding ``content``, or one random API key line
    when ``content`` is None and the file is missing; returns (path, whether it was written)."""
    if content is None and path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    text = content if content is not None else f"default {secrets.token_urlsafe(32)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path, True


# -- unknown keys ---------------------------------------------------------------------------------


def _unknown_keys(model: BaseModel, raw: object, where: str) -> list[str]:
    """Keys of ``raw`` that ``model``'s class does not know, here and in nested models."""
    if not isinstance(raw, Mapping):
        return []
    fields = type(model).model_fields
    known = {n: n for n in fields} | {f.alias: n for n, f in fields.items() if f.alias}
    problems = [f"{_join(where, str(k))}: unknown key{_hint(str(k), list(known))}"
                for k in raw if k not in known]
    for key, value in raw.items():
        if key not in known:
            continue
        attr = getattr(model, known[key])
        if isinstance(attr, BaseModel):
            problems += _unknown_keys(attr, value, _join(where, str(key)))
        elif isinstance(attr, list) and isinstance(value, list):
            for i, (item, item_raw) in enumerate(zip(attr, value)):
                if isinstance(item, BaseModel):
                    problems += _unknown_keys(item, item_raw, f"{_join(where, str(key))}[{i}]")
    return problems


def _check_autoscaling(raw: dict[str, Any], where: str) -> list[str]:
    try:
        parsed = AutoscalingConfig.model_validate(raw)
    except ValidationError as e:
        return [f"{_join(where, _loc(err['loc']))}: {err['msg']}" for err in e.errors()]
    return _unknown_keys(parsed, raw, where)


def _hint(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" {key!r} (did you mean {close[0]!r}?)" if close else f" {key!r}"


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else _join("." if out else "", str(part))
    return out.lstrip(".")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _report(path: Path, problems: list[str]) -> str:
    return f"{path}: {len(problems)} problem(s) in the Serve config:\n" + "\n".join(
        f"  {p}" for p in problems)
