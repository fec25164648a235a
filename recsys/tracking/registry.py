"""Champion/challenger in the MLflow model registry, as free functions keyed by (uri, name).

One registered model per platform (``recsys-<platform>`` by default). ``@champion`` is the
version serving should load. A new version takes it only by beating the current champion on the
same validation data, re-evaluated here (``promote_if_better``), never copied from training logs;
otherwise it stays a tagged challenger with both scores. Every move of ``@champion`` pushes the
version it replaced onto the ``champion_history`` tag of the registered model (and points
``@previous_champion`` at it), so ``rollback`` is one call. Used by sweeps, the CLI
(``recsys registry ...``) and the serving endpoint. This module holds the project's one alias
lookup (``alias_version``) and its one download of a version's export (``download_export``);
``recsys.serving.model_source`` resolves ``models:/`` uris through them.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from recsys.tracking.runs import _process_tracking_uri, mlflow_key
from recsys.tracking.runs import client as _client

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous_champion"
HISTORY_TAG = "champion_history"
HISTORY_LIMIT = 50  # tag values are limited in size; older moves are in the versions' tags
EXPORT_ARTIFACT = "export"  # the pyfunc's artifact key (recsys.model.pyfunc)

Scorer = Callable[[Path], float]


class RegistryError(RuntimeError):
    pass


def default_model_name(platform: str) -> str:
    return f"recsys-{platform}"


def _not_found(e: MlflowException) -> bool:
    return e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


@dataclass
class VersionInfo:
    version: str
    run_id: str | None
    aliases: list[str]
    tags: dict[str, str]
    created: float
    source: str


@dataclass
class Decision:
    """What ``promote_if_better`` did, with both validation scores."""

    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    challenger_score: float | None
    champion_version: str | None
    champion_score: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_versions(uri: str, name: str) -> list[VersionInfo]:
    """Every version of ``name``, newest first, with aliases and tags."""
    c = _client(uri)
    try:
        aliases_of = _aliases(c, name)
    except MlflowException as e:
        if _not_found(e):
            raise RegistryError(f"no registered model named {name!r} at {uri}") from None
        raise
    versions = c.search_model_versions(f"name='{name}'")
    out = [VersionInfo(version=str(v.version), run_id=v.run_id,
                       aliases=sorted(aliases_of.get(str(v.version), [])),
                       tags=dict(v.tags or {}), created=v.creation_timestamp / 1000.0,
                       source=str(v.source)) for v in versions]
    return sorted(out, key=lambda v: int(v.version), reverse=True)


def _aliases(c: MlflowClient, name: str) -> dict[str, list[str]]:
    model = c.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def champion_history(uri: str, name: str) -> list[str]:
    """Versions that held ``@champion`` before the current one, oldest first."""
    tags = _client(uri).get_registered_model(name).tags or {}
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None if the model or the alias does not exist.

    Reads the registered model's alias map: asking for the alias directly answers a missing alias
    with INVALID_PARAMETER_VALUE, the same code as a malformed request.
    """
    try:
        model = _client(uri).get_registered_model(name)
    except MlflowException as e:
        if _not_found(e):
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return None if version is None else str(version)


def set_alias(uri: str, name: str, alias: str, version: str | int) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` as is: no history and no tags (moves of
    ``@champion`` go through ``promote``, which keeps both)."""
    _client(uri).set_registered_model_alias(name, alias, str(version))


def describe(uri: str, name: str) -> dict[str, Any]:
    """The registered model at a glance: champion, previous champion, history, versions."""
    versions = list_versions(uri, name)
    return {
        "name": name,
        "champion": alias_version(uri, name, CHAMPION),
        "previous_champion": alias_version(uri, name, PREVIOUS),
        "champion_history": champion_history(uri, name),
        "versions": [asdict(v) for v in versions],
    }


def _set_history(c: MlflowClient, name: str, history: list[str]) -> None:
    history = history[-HISTORY_LIMIT:]
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    if history:
        c.set_registered_model_alias(name, PREVIOUS, history[-1])
    else:
        try:
            c.delete_registered_model_alias(name, PREVIOUS)
        except MlflowException as e:
            if not _not_found(e):
                raise


def promote(uri: str, name: str, version: str | int, reason: str = "manual") -> str | None:
    """Point ``@champion`` at ``version``; the replaced champion goes onto the history.
    Returns the previous champion (None if there was none)."""
    c = _client(uri)
    version = str(version)
    c.get_model_version(name, version)  # raises if it does not exist
    previous = alias_version(uri, name, CHAMPION)
    if previous == version:
        return previous
    c.set_registered_model_alias(name, CHAMPION, version)
    if previous is not None:
        _set_history(c, name, [*champion_history(uri, name), previous])
    c.set_model_version_tag(name, version, "role", CHAMPION)
    c.set_model_version_tag(name, version, "promoted_at", str(int(time.time())))
    c.set_model_version_tag(name, version, "promotion_reason", reason)
    if previous is not None:
        c.set_model_version_tag(name, previous, "role", "former_champion")
    log.info("%s: @champion %s -> %s (%s)", name, previous, version, reason)
    return previous


def rollback(uri: str, name: str) -> str:
    """Give ``@champion`` back to the version it replaced last; returns that version."""
    c = _client(uri)
    history = champion_history(uri, name)
    if not history:
        raise RegistryError(f"{name}: no previous champion to roll back to")
    current = alias_version(uri, name, CHAMPION)
    target = history.pop()
    c.set_registered_model_alias(name, CHAMPION, target)
    _set_history(c, name, history)
    c.set_model_version_tag(name, target, "role", CHAMPION)
    c.set_model_version_tag(name, target, "promotion_reason", f"rollback from {current}")
    if current is not None:
        c.set_model_version_tag(name, current, "role", "rolled_back")
    log.info("%s: rolled @champion back %s -> %s", name, current, target)
    return target


def download_export(uri: str, name: str, version: str | int, dst: Path) -> Path:
    """Download a registered pyfunc version under ``dst``; return the export directory inside it
    (the pyfunc's ``export`` artifact)."""
    import mlflow.artifacts

    dst.mkdir(parents=True, exist_ok=True)
    # The version's own artifact location, asked of this server: a ``models:/`` artifact uri
    # would be resolved against the process-wide registry (MLflow 3's default: ./mlflow.db).
    # The process uri is still swapped for the call (under the runs module's lock), because
    # MLflow 3 model sources (``models:/<model_id>``) resolve through it as well.
    with _process_tracking_uri(uri):
        source = _client(uri).get_model_version_download_uri(name, str(version))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                         tracking_uri=uri))
    return _export_inside(local, f"{name} v{version}")


def _export_inside(model_dir: Path, what: str) -> Path:
    """The export directory inside a downloaded pyfunc model (its ``export`` artifact)."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise RegistryError(f"{what}: {model_dir} is not an MLflow model (no MLmodel file)")
    flavor = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
    rel = flavor.get("artifacts", {}).get(EXPORT_ARTIFACT, {}).get("path")
    if rel is None:
        raise RegistryError(f"{what}: {mlmodel} has no {EXPORT_ARTIFACT!r} artifact (log the "
                            f"pyfunc with artifacts={{{EXPORT_ARTIFACT!r}: <export dir>}})")
    export = model_dir / rel
    if not (export / "export.json").is_file():
        raise RegistryError(f"{what}: no export.json in its {EXPORT_ARTIFACT!r} artifact "
                            f"({export})")
    return export


def _same_catalog(a: Path, b: Path, platform: str) -> bool:
    import numpy as np

    fa, fb = a / "items" / f"{platform}.npz", b / "items" / f"{platform}.npz"
    if not (fa.exists() and fb.exists()):
        return False
    ia = np.load(fa, allow_pickle=True)["item_ids"]
    ib = np.load(fb, allow_pickle=True)["item_ids"]
    return bool(len(ia) == len(ib) and (ia == ib).all())


def promote_if_better(uri: str, name: str, version: str | int, score: Scorer, *,
                      platform: str, metric: str = "valid_ndcg@10",
                      challenger_export: Path | None = None,
                      min_improvement: float = 0.0) -> Decision:
    """Make ``version`` the champion only if ``score`` (higher is better, evaluated here on both
    exports) beats the current champion by more than ``min_improvement``; otherwise tag it a
    challenger with both scores. The champion must rank the same catalog of ``platform``: a
    comparison on different items would not be on the same validation data."""
    c = _client(uri)
    version = str(version)
    metric = mlflow_key(metric)  # a tag key: MLflow rejects '@'
    with tempfile.TemporaryDirectory() as tmp:
        mine = challenger_export or download_export(uri, name, version, Path(tmp) / "challenger")
        mine_score = float(score(Path(mine)))
        champion = alias_version(uri, name, CHAMPION)
        c.set_model_version_tag(name, version, metric, f"{mine_score:.6f}")
        if champion is None:
            promote(uri, name, version, reason=f"first champion ({metric} {mine_score:.4f})")
            return Decision(name, version, True, "no champion yet", metric, mine_score, None, None)
        if champion == version:
            return Decision(name, version, True, "already champion", metric, mine_score,
                            champion, mine_score)
        theirs = download_export(uri, name, champion, Path(tmp) / "champion")
        if not _same_catalog(Path(mine), theirs, platform):
            reason = (f"champion v{champion} ranks another catalog of {platform}: not comparable "
                      "on the same validation data; promote by hand if intended")
            _tag_challenger(c, name, version, metric, mine_score, champion, None, reason)
            return Decision(name, version, False, reason, metric, mine_score, champion, None)
        their_score = float(score(theirs))
    if mine_score > their_score + min_improvement:
        reason = f"{metric} {mine_score:.4f} > champion v{champion} {their_score:.4f}"
        promote(uri, name, version, reason=reason)
        c.set_model_version_tag(name, version, f"champion_{metric}_at_promotion",
                                f"{their_score:.6f}")
        return Decision(name, version, True, reason, metric, mine_score, champion, their_score)
    reason = (f"{metric} {mine_score:.4f} does not beat champion v{champion} {their_score:.4f}"
              + (f" by more than {min_improvement}" if min_improvement else ""))
    _tag_challenger(c, name, version, metric, mine_score, champion, their_score, reason)
    return Decision(name, version, False, reason, metric, mine_score, champion, their_score)


def _tag_challenger(c: MlflowClient, name: str, version: str, metric: str, mine: float,
                    champion: str, theirs: float | None, reason: str) -> None:
    tags = {"role": "challenger", "challenger": "true", f"challenger_{metric}": f"{mine:.6f}",
            "champion_version": champion, "decision": reason}
    if theirs is not None:
        tags[f"champion_{metric}"] = f"{theirs:.6f}"
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    log.info("%s v%s stays a challenger: %s", name, version, reason)


def valid_scorer(example_set: Any, platform: str, metric: str = "ndcg@10",
                 split: str = "valid") -> Scorer:
    """A scorer for ``promote_if_better``: ``metric`` of an export on ``split`` of
    ``example_set`` for ``platform`` (full ranking, ``recsys.evaluation.offline``)."""
    from recsys.evaluation.offline import evaluate_export
    from recsys.model.export import load_export

    def score(export_dir: Path) -> float:
        exported = load_export(export_dir)
        if platform not in exported.items:
            raise RegistryError(f"{export_dir}: the export has no items for {platform!r}")
        fraction = exported.meta.user_fraction
        report = evaluate_export(exported, example_set, split=split, platforms=[platform],
                                 run=str(export_dir), user_fraction=fraction)
        if platform not in report.platforms:
            raise RegistryError(f"{example_set.path}: no {split} users for {platform!r}")
        return float(report.platforms[platform].metrics[metric])

    return score
