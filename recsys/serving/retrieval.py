"""Top-k over one catalog: exact (score every item) or, when the export has an approximate index
of the catalog (``recsys.model.ann``, built above ``ann_threshold`` items), index candidates
re-scored exactly.

The approximate path asks the index for k + |excluded| + ``margin`` candidates, adds the user's
seen items of this catalog (the repeat bias may lift them above any candidate), scores them with
the model's own formula (``Recommender.score_items``) and applies exclusions and filters exactly.
When fewer than k candidates survive (a narrow filter, a long exclusion list) it scores the whole
catalog instead: the answer is never shorter than the exact one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from recsys.model.ann import AnnIndex
from recsys.model.recommender import Recommender

MARGIN = 32
"""Extra candidates asked of the index beyond k + |excluded| (recall of the true top k)."""


def rank(scores: torch.Tensor, k: int, excluded: Sequence[int], allowed: np.ndarray | None,
         ids: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """Top k item indices and their scores: padding, excluded and filtered-out items never
    appear. ``scores`` (N+1,) over the whole catalog, or (M,) over the items ``ids`` (M,)."""
    if ids is None:  # the whole catalog: masks by position
        keep = torch.ones_like(scores, dtype=torch.bool)
        if allowed is not None:
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[torch.as_tensor(allowed, dtype=torch.long)] = True
        keep[0] = False
        if len(excluded):
            keep[torch.as_tensor(list(excluded), dtype=torch.long)] = False
    else:
        keep = ids > 0
        if allowed is not None:
            keep &= torch.as_tensor(np.isin(ids.numpy(), allowed))
        if len(excluded):
            keep &= ~torch.isin(ids, torch.as_tensor(list(excluded), dtype=ids.dtype))
    scores = scores.masked_fill(~keep, float("-inf"))
    n = int(torch.isfinite(scores).sum())
    top = torch.topk(scores, min(k, n))
    return (top.indices if ids is None else ids[top.indices]).tolist(), top.values.tolist()


def eligible(num_items: int, excluded: Sequence[int], allowed: np.ndarray | None) -> int:
    """How many items of a catalog of ``num_items`` may be returned."""
    pool = np.arange(1, num_items + 1) if allowed is None else np.asarray(allowed)
    return int(len(pool) - np.isin(pool, np.asarray(list(excluded), np.int64)).sum())


def candidates(ann: AnnIndex, query: torch.Tensor, k: int, excluded: Sequence[int],
               extra: Sequence[int] = (), margin: int = MARGIN) -> torch.Tensor:
    """Item indices (M,) to re-score: the index's best k + |excluded| + margin for ``query``
    (D,) and the ``extra`` items, each once, padding dropped."""
    found = ann.search(query.detach().float().numpy()[None], k + len(excluded) + margin)[0]
    ids = np.union1d(found, np.asarray(list(extra), np.int64))
    return torch.as_tensor(ids[ids > 0], dtype=torch.long)


@torch.inference_mode()
def top_items(model: Recommender, table: torch.Tensor, ann: AnnIndex | None,
              user: torch.Tensor, seen: Sequence[int], platform_id: int, k: int,
              excluded: Sequence[int], allowed: np.ndarray | None
              ) -> tuple[list[int], list[float]]:
    """A user's (D,) top k of a catalog ``table`` (N+1, D) by ``model.score``: similarity plus
    the repeat bias on ``seen``; through ``ann``'s candidates when there is an index."""
    pid = torch.tensor([platform_id])
    if ann is not None:
        query = F.normalize(user, dim=-1) if model.normalize else user
        ids = candidates(ann, query, k, excluded, extra=seen)
        mask = torch.isin(ids, torch.as_tensor(list(seen), dtype=torch.long))[None]  # (1, M)
        scores = model.score_items(user[None], table[ids], mask, pid)[0]               # (M,)
        idx, values = rank(scores, k, excluded, allowed, ids)
        if len(idx) >= k or len(idx) >= eligible(len(table) - 1, excluded, allowed):
            return idx, values
    history = torch.as_tensor(list(seen), dtype=torch.long)[None]                     # (1, S)
    scores = model.score(history, pid, table, user=user[None])[0]                     # (N+1,)
    return rank(scores, k, excluded, allowed)


def search_items(scoring: torch.Tensor, ann: AnnIndex | None, query: torch.Tensor, k: int
                 ) -> tuple[list[int], list[float]]:
    """Top k of a catalog's scoring vectors (N+1, D) for a search vector (D,)."""
    if ann is not None:
        ids = candidates(ann, query, k, ())
        idx, values = rank(scoring[ids] @ query, k, (), None, ids)
        if len(idx) >= min(k, len(scoring) - 1):
            return idx, values
    return rank(scoring @ query, k, (), None)
