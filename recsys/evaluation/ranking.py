"""Model-side evaluation: batches of (history, target) -> full-ranking ranks, per platform.

One function for validation inside training and for the test split in ``jobs.evaluate``. The
item table of a platform is computed once per call; each batch then runs the user tower once
and scores every item of the platform (full ranking, nothing masked: RecBole's protocol).
A cross-platform history (``history_platform``) embeds each item with its own platform's table.
A catalog of more than ``chunk`` items is ranked ``chunk`` items at a time
(``recsys.evaluation.chunked``): memory O(batch x chunk), not O(batch x items).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from recsys.evaluation.chunked import CHUNK_ITEMS, chunked_ranks
from recsys.evaluation.metrics import rank_of_target
from recsys.model.history import own_items
from recsys.model.recommender import Recommender
from recsys.training.objective import PlatformTensors


@torch.inference_mode()
def rank_batches(model: Recommender, platforms: dict[int, PlatformTensors],
                 batches: Iterable[dict[str, torch.Tensor]],
                 with_history_excluded: bool = False, chunk: int = CHUNK_ITEMS
                 ) -> dict[int, dict[str, np.ndarray]]:
    """Ranks of each target per platform id: {"rank": (n,), "target": (n,)[, "rank_excl"]};
    catalogs of more than ``chunk`` items (0: none) are scored chunk by chunk."""
    was_training = model.training
    model.eval()
    tables: dict[int, torch.Tensor] = {}
    out: dict[int, dict[str, list[np.ndarray]]] = {}
    for batch in batches:
        history, target, platform = batch["history"], batch["target"], batch["platform"]
        hp = batch.get("history_platform")  # (B, L) a cross-platform history's item platforms
        needed = platform.unique() if hp is None else torch.cat([platform, hp.flatten()])
        for pid in needed.unique().tolist():
            if pid not in tables:
                tables[pid] = platforms[pid].item_table(model)  # (N+1, D)
        for pid in platform.unique().tolist():
            rows = platform == pid
            hp_rows = None if hp is None else hp[rows]
            acc = out.setdefault(pid, {"rank": [], "target": [], "rank_excl": []})
            acc["target"].append(target[rows].cpu().numpy())
            if chunk and tables[pid].shape[0] > chunk:
                user = model.user_vector(history[rows], tables[pid], platform[rows], hp_rows,
                                         tables)                                # (b, D)
                got = chunked_ranks(model, user, tables[pid],
                                    own_items(history[rows], platform[rows], hp_rows),
                                    platform[rows], target[rows],
                                    exclude_own=with_history_excluded, chunk=chunk)
                acc["rank"].append(got.rank.cpu().numpy())
                if got.rank_excl is not None:
                    acc["rank_excl"].append(got.rank_excl.cpu().numpy())
                continue
            scores = model.score(history[rows], platform[rows], tables[pid],
                                 history_platforms=hp_rows, item_tables=tables)  # (b, N+1)
            acc["rank"].append(rank_of_target(scores, target[rows]).cpu().numpy())
            if with_history_excluded:  # the platform's own items only
                own = own_items(history[rows], platform[rows], hp_rows)
                seen = [h[h > 0].cpu().numpy() for h in own]
                acc["rank_excl"].append(
                    rank_of_target(scores, target[rows], exclude=seen).cpu().numpy())
    model.train(was_training)
    return {pid: {k: np.concatenate(v) for k, v in acc.items() if v} for pid, acc in out.items()}
