"""The champion a platform is monitored against, and its NDCG@10 on the newest window.

The champion is ``<model_name>@champion`` in the MLflow registry (or a local export given in the
config). What the monitor reads from it: the newest event of the platform its example set saw
(``export.json``'s ``data_until``: the reference cutoff), its recorded test NDCG@10 (the version's
``test_ndcg_at_10/<platform>`` tag written by the model card, else its export's metrics), and
the model itself, to rank the newest window.

Offline NDCG@10 on the newest window: for (at most ``ndcg.users``, seeded) users with an
interaction in the current window, the target is their last one and the history every
interaction before it (lake order, the platform's own items; users with no catalog item
before their target are left out: nothing to rank from); the model ranks the platform's
whole catalog (``recsys.evaluation.ranking``, no sampled negatives). A target outside the
export's catalog (an item new since training) is a miss: the model cannot recommend it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.monitoring.config import MonitorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    """What the monitor knows about a platform's champion."""

    version: str
    """Registry version, or ``local`` for an export named in the config."""
    export: Path
    data_until: datetime | None
    """The newest event of the platform in the champion's training data (None: unrecorded)."""
    test_ndcg10: float | None


def find_champion(cfg: MonitorConfig, platform: str, uri: str | None,
                  cache: Path) -> Champion | None:
    """The platform's champion (None: none registered, or tracking off and no local export)."""
    from recsys.model.export import read_meta

    tag: float | None = None
    if platform in cfg.exports:
        version, export = "local", Path(cfg.exports[platform])
    elif uri is not None:
        from recsys.tracking import registry
        from recsys.tracking.metric_names import metric_key
        from recsys.tracking.runs import client

        name = cfg.champion_name(platform)
        found = registry.alias_version(uri, name, registry.CHAMPION)
        if found is None:
            return None
        version = found
        export = registry.download_export(uri, name, version, cache / f"{name}-v{version}")
        tags = client(uri).get_model_version(name, version).tags or {}
        raw = tags.get(metric_key("test", "ndcg@10", platform))
        tag = None if raw is None else float(raw)
    else:
        return None
    meta = read_meta(export)
    recorded = tag if tag is not None else next(
        (float(meta.metrics[k]) for k in (f"test_ndcg@10/{platform}", "test_ndcg@10")
         if k in meta.metrics), None)
    return Champion(version, export, meta.data_until.get(platform), recorded)


@dataclass(frozen=True)
class WindowNdcg:
    ndcg10: float
    users: int
    unknown_targets: int
    """Targets outside the export's catalog (counted as misses)."""


def window_examples(events: pa.Table, current: pa.Table, item_ids: list[str], users: int,
                    seed: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(histories, targets, unknown targets) of at most ``users`` sampled users of the current
    window: item indices into the export's catalog (i + 1; 0 = not in it)."""
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    cur_users = np.unique(np.asarray(current["user_id"].to_pylist(), dtype=object))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(cur_users, size=min(users, len(cur_users)), replace=False).tolist()
                 ) if len(cur_users) else set()
    last_time = {}
    for u, t in zip(current["user_id"].to_pylist(), current["timestamp"].to_pylist(),
                    strict=True):
        if u in chosen:
            last_time[u] = t  # current is in time order: the last one wins
    seqs: dict[str, list[int]] = {u: [] for u in chosen}
    for u, item, t in zip(events["user_id"].to_pylist(), events["item_id"].to_pylist(),
                          events["timestamp"].to_pylist(), strict=True):
        if u in chosen and t <= last_time[u]:
            seqs[u].append(index.get(item, 0))
    histories, targets = [], []
    for u in sorted(seqs):
        *history, target = seqs[u]
        histories.append(np.asarray([h for h in history if h > 0], dtype=np.int64))
        targets.append(target)
    targets_arr = np.asarray(targets, dtype=np.int64)
    return histories, targets_arr, int((targets_arr == 0).sum())


def window_ndcg(export_dir: Path, platform: str, events: pa.Table, current: pa.Table,
                users: int, seed: int, batch_size: int) -> WindowNdcg | None:
    """NDCG@10 of the export on the newest window (None: the export cannot rank
    ``platform``, or the window has no user)."""
    import torch

    from recsys.data.feed import collate
    from recsys.evaluation.metrics import ranking_metrics
    from recsys.evaluation.offline import platform_tensors
    from recsys.evaluation.ranking import rank_batches
    from recsys.model.export import load_export

    exported = load_export(export_dir)
    if platform not in exported.items:
        log.warning("%s: the champion export has no items for %s", export_dir, platform)
        return None
    items = exported.items[platform]
    histories, targets, _ = window_examples(events, current, items.item_ids, users, seed)
    with_history = np.asarray([len(h) > 0 for h in histories], dtype=bool)
    histories = [h for h, keep in zip(histories, with_history, strict=True) if keep]
    targets = targets[with_history]  # a user with no known item before the target: no query
    if len(targets) == 0:
        return None
    known = targets > 0
    unknown = int((~known).sum())
    if not known.any():
        return WindowNdcg(0.0, len(targets), unknown)
    tensors = platform_tensors(exported, {platform: np.zeros(items.num_items + 1)}, [platform])
    ids = {platform: items.platform_id}
    rows = np.flatnonzero(known)
    batches = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        batch = {"history": [histories[j] for j in part], "target": targets[part],
                 "platform": np.asarray([platform] * len(part), dtype=object)}
        batches.append(collate(batch, exported.model.config["max_len"], ids))
    with torch.inference_mode():
        ranks = rank_batches(exported.model, tensors, batches)[items.platform_id]["rank"]
    ndcg_known = ranking_metrics(ranks, ks=(10,))["ndcg@10"]
    return WindowNdcg(float(ndcg_known) * known.mean(), len(targets), unknown)
