"""Champion/challenger in the MLflow model registry, as free functions keyed by (uri, name).

One registered model per platform (``recsys-<platform>``). ``@champion`` is the version serving
loads. A new version takes it only by beating the champion on the same validation data,
re-evaluated here (``promote_if_better``), never copied from training logs; otherwise it stays a
tagged challenger with both scores, and a decision removes its ``@challenger`` alias
(``recsys.tracking.challenger``). Every move of ``@champion`` pushes the version it replaced onto
the ``champion_history`` tag (and points ``@previous_champion`` at it): ``rollback`` is one call.
Used by sweeps, the CLI and the serving endpoint; holds the one alias lookup (``alias_version``)
and the one download of a version's export (``download_export``).

Concurrent writers (two sweeps promoting at once, a rollback during a promotion) are safe:
every move of ``@champion`` (``promote``, ``rollback``, ``promote_if_better``) reads the champion,
history and generation, checks that the champion is still the one its decision was taken against,
and writes, all under ``recsys.tracking.champion_lock`` (compare-and-set; why a lock in the
registry itself: that module). Downloading and scoring exports happen outside the lock: when the
champion moved meanwhile, ``promote_if_better`` scores the new one and decides again.
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

from recsys.tracking.challenger import CHALLENGER, clear_challenger, clear_challenger_locked
from recsys.tracking.champion_lock import champion_lock
from recsys.tracking.errors import RegistryError, delete_alias, not_found
from recsys.tracking.metric_names import mlflow_key
from recsys.tracking.runs import _process_tracking_uri
from recsys.tracking.runs import client as _client

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous_champion"
HISTORY_TAG = "champion_history"
HISTORY_LIMIT = 50  # tag values are limited in size; older moves are in the versions' tags
EXPORT_ARTIFACT = "export"  # the pyfunc's artifact key (recsys.model.pyfunc)
GENERATION_TAG = "champion_generation"  # moves of @champion so far (each one adds 1)
MAX_ATTEMPTS = 10  # champions scored by one promote_if_better before it gives up

Scorer = Callable[[Path], float]


def default_model_name(platform: str) -> str:
    return f"recsys-{platform}"


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
    """What ``promote_if_better`` did, with both validation scores. ``extra``: ``generation``
    (of ``@champion`` when the decision was taken), ``moved`` (whether ``@champion`` moved),
    ``attempts`` (champions compared with), or ``rejected`` (the export did not load)."""

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
        if not_found(e):
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
    return champion_state(uri, name).history


def alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None if the model or the alias does not exist.

    Reads the registered model's alias map: asking for the alias directly answers a missing alias
    with INVALID_PARAMETER_VALUE, the same code as a malformed request.
    """
    try:
        model = _client(uri).get_registered_model(name)
    except MlflowException as e:
        if not_found(e):
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return None if version is None else str(version)


def set_alias(uri: str, name: str, alias: str, version: str | int) -> None:
    """Point ``@<alias>`` at ``version``, no history or tags (``promote`` keeps both)."""
    _client(uri).set_registered_model_alias(name, alias, str(version))


def describe(uri: str, name: str) -> dict[str, Any]:
    """The registered model at a glance: champion, previous champion, history, versions."""
    versions = list_versions(uri, name)
    return {
        "name": name,
        "champion": alias_version(uri, name, CHAMPION),
        "previous_champion": alias_version(uri, name, PREVIOUS),
        "challenger": alias_version(uri, name, CHALLENGER),
        "champion_history": champion_history(uri, name),
        "versions": [asdict(v) for v in versions],
    }


# --- moves of @champion (each one under the lock) -----------------------------------------


@dataclass(frozen=True)
class ChampionState:
    """``@champion``, the versions that held it before (oldest first) and the number of moves
    so far: what a move reads, checks and writes under the champion lock."""

    champion: str | None
    history: list[str]
    generation: int


def champion_state(uri: str, name: str) -> ChampionState:
    return _read_state(_client(uri), name)


def _read_state(c: MlflowClient, name: str) -> ChampionState:
    model = c.get_registered_model(name)
    tags = model.tags or {}
    champion = (model.aliases or {}).get(CHAMPION)
    return ChampionState(champion=None if champion is None else str(champion),
                         history=[str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))],
                         generation=int(tags.get(GENERATION_TAG, "0")))


def _move(c: MlflowClient, name: str, state: ChampionState, champion: str,
          history: list[str]) -> int:
    """Write a move from ``state`` (read under the lock held now); returns its generation."""
    history = history[-HISTORY_LIMIT:]
    generation = state.generation + 1
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    c.set_registered_model_tag(name, GENERATION_TAG, str(generation))
    c.set_registered_model_alias(name, CHAMPION, champion)
    if history:
        c.set_registered_model_alias(name, PREVIOUS, history[-1])
    else:
        delete_alias(c, name, PREVIOUS)
    return generation


def _promote_locked(c: MlflowClient, name: str, version: str, reason: str,
                    state: ChampionState) -> int:
    previous = state.champion
    history = state.history if previous is None else [*state.history, previous]
    generation = _move(c, name, state, version, history)
    for k, v in {"role": CHAMPION, "promoted_at": str(int(time.time())),
                 "promotion_reason": reason, GENERATION_TAG: str(generation)}.items():
        c.set_model_version_tag(name, version, k, v)
    if previous is not None:
        c.set_model_version_tag(name, previous, "role", "former_champion")
    clear_challenger_locked(c, name, version)
    log.info("%s: @champion %s -> %s (%s)", name, previous, version, reason)
    return generation


def promote(uri: str, name: str, version: str | int, reason: str = "manual", *,
            if_champion: str | None = None) -> str | None:
    """Point ``@champion`` at ``version``; the replaced champion goes onto the history.
    Returns the previous champion (None if there was none). ``if_champion``: only if
    ``@champion`` is still that version (compare-and-set; RegistryError otherwise)."""
    c = _client(uri)
    version = str(version)
    c.get_model_version(name, version)  # raises if it does not exist
    with champion_lock(uri, name):
        state = _read_state(c, name)
        if if_champion is not None and state.champion != if_champion:
            raise RegistryError(f"{name}: @champion is v{state.champion}, not v{if_champion}")
        if state.champion != version:
            _promote_locked(c, name, version, reason, state)
    return state.champion


def rollback(uri: str, name: str) -> str:
    """Give ``@champion`` back to the version it replaced last; returns that version."""
    c = _client(uri)
    with champion_lock(uri, name):
        state = _read_state(c, name)
        if not state.history:
            raise RegistryError(f"{name}: no previous champion to roll back to")
        current, target = state.champion, state.history[-1]
        generation = _move(c, name, state, target, state.history[:-1])
        for k, v in {"role": CHAMPION, "promotion_reason": f"rollback from {current}",
                     GENERATION_TAG: str(generation)}.items():
            c.set_model_version_tag(name, target, k, v)
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
    """The export directory inside a downloaded pyfunc model (its ``export`` artifact). The path
    comes from the model's own MLmodel file, so it is checked to stay inside ``model_dir`` (and
    so is every file of the export: no link out of it)."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise RegistryError(f"{what}: {model_dir} is not an MLflow model (no MLmodel file)")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get(
        "python_function", {})
    rel = flavor.get("artifacts", {}).get(EXPORT_ARTIFACT, {}).get("path")
    if rel is None:
        raise RegistryError(f"{what}: {mlmodel} has no {EXPORT_ARTIFACT!r} artifact (log the "
                            f"pyfunc with artifacts={{{EXPORT_ARTIFACT!r}: <export dir>}})")
    root = model_dir.resolve()
    export = (model_dir / str(rel)).resolve()
    outside = [p for p in (export, *export.rglob("*")) if not p.resolve().is_relative_to(root)]
    if outside:
        raise RegistryError(f"{what}: {mlmodel} points its {EXPORT_ARTIFACT!r} artifact at "
                            f"{outside[0]}, outside the download directory {root}; refused")
    if not (export / "export.json").is_file():
        raise RegistryError(f"{what}: no export.json in its {EXPORT_ARTIFACT!r} artifact "
                            f"({export})")
    return export


def _same_catalog(a: Path, b: Path, platform: str) -> bool:
    from recsys.model.export import item_ids

    ids_a = item_ids(a, platform)
    return ids_a is not None and ids_a == item_ids(b, platform)


UNLOADABLE = (ValueError, OSError, RegistryError)
"""What downloading, loading or scoring a broken or tampered export raises (``ExportError`` is a
ValueError): the version is refused, not the caller's process."""


def promote_if_better(uri: str, name: str, version: str | int, score: Scorer, *,
                      platform: str, metric: str = "valid_ndcg@10",
                      challenger_export: Path | None = None,
                      min_improvement: float = 0.0) -> Decision:
    """Make ``version`` the champion only if ``score`` (higher is better, evaluated here on both
    exports) beats the current champion by more than ``min_improvement``; otherwise tag it a
    challenger with both scores. The champion must rank the same catalog of ``platform``: a
    comparison on different items would not be on the same validation data.

    A version whose export does not download, load or score (a pickle inside, a path out of its
    directory, truncated weights) is refused and tagged ``role=rejected``. The decision is
    compare-and-set: written under ``champion_lock`` only if the champion it was taken against
    is still the champion; when another writer moved it during the (slow, unlocked) scoring,
    the new champion is scored and the decision taken again."""
    c = _client(uri)
    version = str(version)
    metric = mlflow_key(metric)  # a tag key: MLflow rejects '@'
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mine = loaded_export(challenger_export
                           or download_export(uri, name, version, Path(tmp) / "challenger"))
            mine_score = float(score(mine))
        except UNLOADABLE as e:
            return reject_version(c, uri, name, version, metric, e)
        c.set_model_version_tag(name, version, metric, f"{mine_score:.6f}")
        scored: dict[str, Theirs] = {}
        for attempt in range(1, MAX_ATTEMPTS + 1):
            champion = alias_version(uri, name, CHAMPION)
            if champion not in (None, version) and champion not in scored:
                scored[champion] = score_champion(uri, name, champion, mine, score, platform,
                                                   Path(tmp) / f"champion-v{champion}")
            with champion_lock(uri, name):
                state = _read_state(c, name)
                if state.champion == champion:
                    theirs = None if champion is None else scored.get(champion)
                    return _decide(c, name, version, metric, mine_score, state, theirs,
                                   min_improvement, attempt)
            log.info("%s: @champion moved from %s to %s while v%s was compared with it; "
                     "comparing again", name, champion, state.champion, version)
    raise RegistryError(f"{name}: @champion moved {MAX_ATTEMPTS} times while v{version} was "
                        "being compared with it; try again")


@dataclass(frozen=True)
class Theirs:
    """The champion's side of a comparison: its score, or why there is none."""

    score: float | None
    why_not: str = ""


def loaded_export(export: str | Path) -> Path:
    """``export``, once it has loaded: a pickled catalog, truncated weights or a malformed file
    raises here, before a scorer (which may not load it the same way) reads it."""
    from recsys.model.export import load_export

    load_export(export)
    return Path(export)


def score_champion(uri: str, name: str, champion: str, mine: Path, score: Scorer,
                    platform: str, dst: Path) -> Theirs:
    try:
        theirs = loaded_export(download_export(uri, name, champion, dst))
        if not _same_catalog(mine, theirs, platform):
            return Theirs(None, f"champion v{champion} ranks another catalog of {platform}: "
                                 "not comparable on the same validation data; promote by hand "
                                 "if intended")
        return Theirs(float(score(theirs)))
    except UNLOADABLE as e:
        log.warning("%s: champion v%s does not load: %s", name, champion, e)
        return Theirs(None, f"champion v{champion} does not load ({e}): not compared; promote "
                             "by hand if intended")


def _decide(c: MlflowClient, name: str, version: str, metric: str, mine: float,
            state: ChampionState, theirs: Theirs | None, min_improvement: float,
            attempt: int) -> Decision:
    """The decision against ``state.champion``, written while the champion lock is held.
    ``extra``: the generation it was taken at (a promotion makes the next one), whether
    ``@champion`` moved, and how many champions were tried."""
    champion = state.champion
    extra: dict[str, Any] = {"generation": state.generation, "moved": False,
                             "attempts": attempt}
    if champion is None:
        _promote_locked(c, name, version, f"first champion ({metric} {mine:.4f})", state)
        return Decision(name, version, True, "no champion yet", metric, mine, None, None,
                        {**extra, "moved": True})
    if champion == version:
        return Decision(name, version, True, "already champion", metric, mine, champion, mine,
                        extra)
    if theirs is None or theirs.score is None:
        reason = theirs.why_not if theirs else f"champion v{champion} was not scored"
        tag_challenger(c, name, version, metric, mine, champion, None, reason)
        return Decision(name, version, False, reason, metric, mine, champion, None, extra)
    if mine > theirs.score + min_improvement:
        reason = f"{metric} {mine:.4f} > champion v{champion} {theirs.score:.4f}"
        _promote_locked(c, name, version, reason, state)
        c.set_model_version_tag(name, version, f"champion_{metric}_at_promotion",
                                f"{theirs.score:.6f}")
        return Decision(name, version, True, reason, metric, mine, champion, theirs.score,
                        {**extra, "moved": True})
    reason = (f"{metric} {mine:.4f} does not beat champion v{champion} {theirs.score:.4f}"
              + (f" by more than {min_improvement}" if min_improvement else ""))
    tag_challenger(c, name, version, metric, mine, champion, theirs.score, reason)
    clear_challenger_locked(c, name, version)  # beaten: no longer under evaluation
    return Decision(name, version, False, reason, metric, mine, champion, theirs.score, extra)


def reject_version(c: MlflowClient, uri: str, name: str, version: str, metric: str,
            error: Exception) -> Decision:
    """Refuse a version whose export does not load: tagged, never promoted."""
    reason = f"v{version} refused: its export does not load safely ({error})"
    tags = {"role": "rejected", "decision": reason[:4000], "rejected_at": str(int(time.time()))}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    clear_challenger(uri, name, version)
    log.warning("%s: %s", name, reason)
    return Decision(name, version, False, reason, metric, None,
                    alias_version(uri, name, CHAMPION), None, {"rejected": True})


def tag_challenger(c: MlflowClient, name: str, version: str, metric: str, mine: float,
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
