"""``@challenger``: the registered version that is being evaluated for ``@champion`` now.

A pipeline (the ``register`` and ``sweep`` stages) registers a new version with
``register_challenger``, which points ``@challenger`` at it before the gate
(``recsys.tracking.registry.promote_if_better``) compares it with the champion. The gate moves
the alias on: promoted to ``@champion``, refused (its export does not load) or beaten, the
version is no longer a challenger and the alias is removed; when the two could not be compared
(another catalog, a champion that does not load) it stays, waiting for a person.

Why under the champion lock: two pipelines may register at once. The alias is removed only if it
still points at the version that was decided (compare-and-delete), or the first decision would
remove the second pipeline's challenger; that needs the same lock as the moves of ``@champion``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from recsys.tracking.champion_lock import champion_lock
from recsys.tracking.errors import delete_alias
from recsys.tracking.model_card import write_card
from recsys.tracking.runs import client as _client
from recsys.tracking.runs import register_model

log = logging.getLogger(__name__)

CHALLENGER = "challenger"


def register_challenger(uri: str, model_uri: str, name: str, export: Path, *,
                        platform: str | None = None,
                        tags: Mapping[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` with its model card (description,
    test metrics as tags) and point ``@challenger`` at it; returns the version."""
    version = register_model(uri, model_uri, name, tags=tags)
    write_card(uri, name, version, export, platform)
    with champion_lock(uri, name):
        _client(uri).set_registered_model_alias(name, CHALLENGER, version)
    log.info("%s: @challenger -> v%s", name, version)
    return version


def clear_challenger_locked(c: MlflowClient, name: str, version: str) -> bool:
    """Remove ``@challenger`` if it points at ``version`` (the caller holds the champion lock);
    returns whether it did."""
    if str((c.get_registered_model(name).aliases or {}).get(CHALLENGER)) != version:
        return False
    delete_alias(c, name, CHALLENGER)
    return True


def clear_challenger(uri: str, name: str, version: str) -> bool:
    """``clear_challenger_locked`` under the champion lock."""
    with champion_lock(uri, name):
        return clear_challenger_locked(_client(uri), name, version)
