"""The offline gate before a canary: ``promote_if_better``'s comparison without its promotion.

A registered version (``@challenger`` since ``register_challenger``) is scored with the champion
on the same validation data, as ``recsys.tracking.registry.promote_if_better`` does, but one
that beats it gets ``@canary`` (keeping ``@challenger``): the Serve app's canary share answers
from it, and the online judge (``recsys.production.canary``) decides on ``@champion``. The rest
is the registry's: a version whose export does not load is refused (``role=rejected``), a beaten
one is tagged and loses ``@challenger``, one that cannot be compared (another catalog, a
champion that does not load) keeps it for a person, and the first version of a model (no
champion to canary against) becomes champion directly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from recsys.tracking import registry
from recsys.tracking.challenger import clear_challenger
from recsys.tracking.metric_names import mlflow_key
from recsys.tracking.runs import client


def offline_gate(uri: str, name: str, version: str | int, score: registry.Scorer, *,
                 platform: str, metric: str = "valid_ndcg@10",
                 challenger_export: Path | None = None,
                 min_improvement: float = 0.0) -> registry.Decision:
    """Same arguments as ``promote_if_better``. ``promoted`` is True only for a first
    champion; ``extra["canary"]`` is True when the version got ``@canary``."""
    version = str(version)
    if registry.alias_version(uri, name, registry.CHAMPION) is None:
        return registry.promote_if_better(uri, name, version, score, platform=platform,
                                          metric=metric, challenger_export=challenger_export,
                                          min_improvement=min_improvement)
    c, key = client(uri), mlflow_key(metric)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mine = registry.loaded_export(challenger_export or registry.download_export(
                uri, name, version, Path(tmp) / "challenger"))
            mine_score = float(score(mine))
        except registry.UNLOADABLE as e:
            return registry.reject_version(c, uri, name, version, key, e)
        c.set_model_version_tag(name, version, key, f"{mine_score:.6f}")
        champion = registry.alias_version(uri, name, registry.CHAMPION)
        assert champion is not None  # champions are moved, never removed
        theirs = registry.score_champion(uri, name, champion, mine, score, platform,
                                          Path(tmp) / f"champion-v{champion}")
    decision = registry.Decision(name, version, False, "", key, mine_score, champion,
                                 theirs.score, {"canary": False})
    if theirs.score is None:
        decision.reason = theirs.why_not
    elif mine_score > theirs.score + min_improvement:
        decision.reason = (f"{key} {mine_score:.4f} > champion v{champion} "
                           f"{theirs.score:.4f}: canary next")
        decision.extra["canary"] = True
    else:
        decision.reason = (f"{key} {mine_score:.4f} does not beat champion v{champion} "
                           f"{theirs.score:.4f}" + (f" by more than {min_improvement}"
                                                    if min_improvement else ""))
    registry.tag_challenger(c, name, version, key, mine_score, champion, theirs.score,
                             decision.reason)
    if decision.extra["canary"]:
        from recsys.production.canary import CANARY

        registry.set_alias(uri, name, CANARY, version)
    elif theirs.score is not None:
        clear_challenger(uri, name, version)  # beaten: no longer under evaluation
    return decision
