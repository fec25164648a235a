"""One spelling per metric in MLflow: how a project name becomes an MLflow key, and every key the
platform logs.

Why one place: the project names its ranking metrics ``ndcg@10`` (evaluation, Tune, reports), but
MLflow rejects ``@`` in metric, param and tag names (allowed: ``[A-Za-z0-9_-. /]`` and, off
Windows, ``:``; not used here so that a store stays portable). Every name therefore passes through
``mlflow_key`` on its way to MLflow, and the result has exactly one form:

* ``<split>_<metric>`` for the user-weighted mean over platforms: ``valid_ndcg_at_10``;
* ``<split>_<metric>/<platform>`` for one platform: ``test_ndcg_at_10/shop_c`` (the UI groups
  the charts by the part before ``/``: one section per metric, one chart per platform);
* ``best_valid_ndcg_at_10``: the best validation score so far (per epoch, and a sweep's best).

``KNOWN`` lists every key (as patterns); ``runs.log_metrics`` warns about a key not in it and
the audit test (``tests/unit/test_metric_names.py``) fails on one, so a second spelling of a
metric cannot creep in unnoticed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

log = logging.getLogger(__name__)

_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_renamed: set[str] = set()
_warned: set[str] = set()

_RANKING = r"(?:(?:recall|ndcg|hr|precision)_at_\d+|mrr)"
_PLATFORM = r"(?:/[A-Za-z0-9_\-.]+)?"
KNOWN: dict[str, str] = {
    # recsys.training.loop (one value per epoch; step = epoch)
    "validation ranking": rf"valid_{_RANKING}{_PLATFORM}",
    "users evaluated": rf"(?:valid|test)_users{_PLATFORM}",
    "best validation score so far": rf"best_valid_{_RANKING}{_PLATFORM}",
    "training": r"epoch|train_loss|lr|train_seconds|epoch_seconds|setup_seconds"
                r"|sequences_per_s|skipped_steps|gpu_max_memory_gib",
    "privacy accounting (DP-SGD)": r"privacy_(?:epsilon|delta|noise_multiplier|max_grad_norm"
                                   r"|sample_rate|steps)",
    # recsys.training.run (the exported model on the test split)
    "test ranking": rf"test_{_RANKING}{_PLATFORM}",
    "test CTR AUC": rf"test_ctr_auc{_PLATFORM}",
    # recsys.federated.server (one value per round; step = round)
    "federated rounds": r"round|round_seconds|bytes_(?:up|down)|client_seconds_max|client_steps"
                        r"|mean_update_norm|update_norm_max|dp_noise_std|dp_clipped_share"
                        r"|client_dp_(?:epsilon|delta|noise_multiplier|clip)",
    # recsys.monitoring.report (one run per check of the drift monitor)
    "drift monitor": rf"monitor_(?:popularity_js|popularity_psi|new_item_rate"
                     rf"|history_length_ks|score_ks|online_ctr|ndcg_at_10|drifted|new_events)"
                     rf"{_PLATFORM}",
    # recsys.tuning.sweep (the sweep's parent run)
    "sweep summary": r"trials|trials_(?:completed|early_stopped|errored)"
                     r"|sweep_(?:fit|total)_seconds",
}
_KNOWN = re.compile("|".join(f"(?:{p})" for p in KNOWN.values()))


def mlflow_key(name: str) -> str:
    """The MLflow name of a metric/param/tag key: ``valid_ndcg@10`` -> ``valid_ndcg_at_10``
    (``@`` becomes ``_at_``, any other invalid character ``_``; logged once per name)."""
    key = _INVALID_CHARS.sub("_", name.replace("@", "_at_"))
    if key != name and name not in _renamed:
        _renamed.add(name)
        log.debug("MLflow name for %r is %r (MLflow allows only [A-Za-z0-9_-. /])", name, key)
    return key


def mlflow_keys(names: Iterable[str]) -> dict[str, str]:
    """``mlflow_key`` for each name; refuses two names that would land on the same key."""
    keys = {name: mlflow_key(name) for name in names}
    if len(set(keys.values())) < len(keys):
        clashes = sorted(n for n in keys if list(keys.values()).count(keys[n]) > 1)
        raise ValueError(f"names {clashes} map to the same MLflow key; rename one of them")
    return keys


def is_known(key: str) -> bool:
    """Whether ``key`` (an MLflow key, after ``mlflow_key``) is one of the spellings in KNOWN."""
    return _KNOWN.fullmatch(key) is not None


def unknown(keys: Iterable[str]) -> list[str]:
    """The keys of ``keys`` that are not in KNOWN, sorted (what the audit test reports)."""
    return sorted({k for k in keys if not is_known(k)})


def warn_unknown(keys: Iterable[str]) -> None:
    """Warn once per key about a metric spelling that KNOWN does not list: either a second
    spelling of an existing metric (rename it) or a new metric (add it to KNOWN)."""
    for key in unknown(keys):
        if key not in _warned:
            _warned.add(key)
            log.warning("MLflow metric %r is not in recsys.tracking.metric_names.KNOWN: reuse "
                        "an existing spelling or add it there", key)


SAME_AS = {"count": "users"}
"""Evaluation names of a metric that MLflow knows under another: the users evaluated are
``valid_users`` in the training loop, so the test split's ``count`` is ``test_users``."""


def metric_key(split: str, metric: str, platform: str | None = None) -> str:
    """The one MLflow key of ``metric`` (``ndcg@10``) on ``split`` (``valid``, ``test``), for
    one platform or (None) the mean over platforms: ``test_ndcg_at_10/shop_c``."""
    metric = SAME_AS.get(metric, metric)
    return mlflow_key(f"{split}_{metric}" + (f"/{platform}" if platform else ""))
