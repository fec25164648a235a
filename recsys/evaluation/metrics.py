"""Full-ranking metrics for next-item recommendation, and CTR AUC. Pure, seeded functions.

One path for validation and test: a model scores every item of the platform for a batch of users,
``rank_of_target`` turns the scores into the 1-based rank of the held-out item, and
``RankingAccumulator`` gathers ranks batch by batch (per platform and per named subset of users,
such as cold-start targets) into ``ranking_metrics``. Nothing here samples negatives: sampled
metrics read 3-4x higher and are not comparable with published full-ranking numbers.

Protocol of the published numbers (RecBole full-sort, UniSRec/VQ-Rec): items already in the user's
history are NOT masked. That is ``rank_of_target(scores, targets)``; the history-excluded protocol
(``exclude=histories``) reads higher and must be reported beside it, labelled.

Ties: ``rank = 1 + #(items scoring strictly higher) + #(other items scoring equal) / 2``, the
expected rank when ties are broken uniformly at random (RecBole's ``topk`` breaks them
arbitrarily). So a model that gives every item the same score ranks the target in the middle
((N + 1) / 2), never first, and items with identical text (identical embeddings) neither help nor
hurt on average. Ranks can therefore be half-integers; ``rank <= k`` is a hit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import torch

ALL = "all"
"""Name of the whole-population entry in ``RankingAccumulator.result()``."""
COLD_START = "cold_start"
"""Conventional subset name: test targets never seen in the platform's training data."""
DEFAULT_KS: tuple[int, ...] = (10, 50)

RankArray = np.ndarray | torch.Tensor
Exclude = torch.Tensor | Sequence[np.ndarray | Sequence[int]]


# --------------------------------------------------------------------------- ranks


def rank_of_target(
    scores: torch.Tensor, targets: torch.Tensor, exclude: Exclude | None = None
) -> torch.Tensor:
    """1-based rank of each target among all items of the platform. ``(B, N+1), (B,) -> (B,)``.

    Column 0 is padding and never competes (its score may be anything, ``-inf`` included). Ties
    count half (see the module docstring). ``exclude``: per-row item indices that do not compete
    (the history-excluded protocol); either a list of B index arrays or a ``(B, L)`` integer tensor
    padded with 0. The target itself is never excluded: its own score is what is ranked.
    Returns float64 ranks on the device of ``scores``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (B, N+1) with N >= 1 items, got {tuple(scores.shape)}")
    batch, n_cols = scores.shape
    device = scores.device
    targets = torch.as_tensor(targets, device=device).long()
    if targets.shape != (batch,):
        raise ValueError(f"targets must be ({batch},), got {tuple(targets.shape)}")
    if batch == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    if int(targets.min()) < 1 or int(targets.max()) >= n_cols:
        raise ValueError(f"targets must be item indices in 1..{n_cols - 1} (0 is padding), got "
                         f"range {int(targets.min())}..{int(targets.max())}")
    if torch.isnan(scores[:, 1:]).any():
        raise ValueError("scores contain NaN: every comparison with NaN is false, so the target "
                         "would rank first")

    rows = torch.arange(batch, device=device)
    target_score = scores[rows, targets].unsqueeze(1)  # (B, 1)
    competes = torch.ones_like(scores, dtype=torch.bool)  # (B, N+1)
    competes[:, 0] = False
    if exclude is not None:
        competes &= ~_exclude_mask(exclude, batch, n_cols, device)
    competes[rows, targets] = False  # the target is not its own competitor (and never masked)

    greater = ((scores > target_score) & competes).sum(dim=1)  # (B,)
    tied = ((scores == target_score) & competes).sum(dim=1)  # (B,)
    return 1.0 + greater.to(torch.float64) + 0.5 * tied.to(torch.float64)


def _exclude_mask(exclude: Exclude, batch: int, n_cols: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(B, N+1)`` mask of excluded items; indices out of 0..N are an error."""
    mask = torch.zeros(batch, n_cols, dtype=torch.bool, device=device)
    if isinstance(exclude, torch.Tensor):
        if exclude.dim() != 2 or exclude.shape[0] != batch:
            raise ValueError(f"exclude tensor must be ({batch}, L), got {tuple(exclude.shape)}")
        idx = exclude.to(device=device, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_cols):
            raise ValueError(f"exclude indices must be in 0..{n_cols - 1}")
        return mask.scatter_(1, idx, True)  # padding 0 lands on column 0, which never competes
    if len(exclude) != batch:
        raise ValueError(f"exclude must hold one index array per row ({batch}), got {len(exclude)}")
    per_row = [np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]
    cols = np.concatenate(per_row) if per_row else np.zeros(0, np.int64)
    if cols.size and (cols.min() < 0 or cols.max() >= n_cols):
        raise ValueError(f"exclude indices must be in 0..{n_cols - 1}")
    rows = np.repeat(np.arange(batch), [e.size for e in per_row])
    mask[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = True
    return mask


# --------------------------------------------------------------------------- ranking metrics


def _as_ranks(ranks: RankArray) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    out = np.asarray(ranks, dtype=np.float64).reshape(-1)
    bad = int(np.count_nonzero(~(np.isfinite(out) & (out >= 1.0))))
    if bad:
        raise ValueError(f"ranks must be finite and >= 1 (1-based); {bad} of {out.size} are not")
    return out


_METRIC = re.compile(r"^(recall|hit|ndcg)@(\d+)$")


def per_user(ranks: RankArray, metric: str) -> np.ndarray:
    """Per-user ``recall@k`` (= ``hit@k``), ``ndcg@k`` or ``mrr``; their mean is the metric.

    With one target per user, recall@k is the hit rate and NDCG@k is ``1 / log2(rank + 1)`` when
    ``rank <= k`` (the ideal DCG is 1). Exposed so that bootstrap intervals use the same formulas.
    """
    r = _as_ranks(ranks)
    if metric == "mrr":
        return 1.0 / r
    m = _METRIC.match(metric)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(f"unknown metric {metric!r}; known: recall@k, hit@k, ndcg@k (k >= 1), mrr")
    k = int(m.group(2))
    hit = r <= k
    if m.group(1) in ("recall", "hit"):
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)


def ranking_metrics(ranks: RankArray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """``recall@k``, ``ndcg@k`` for each k, full ``mrr`` and ``count`` (users).

    With no users the metrics are NaN and ``count`` is 0, so that an empty subset (no cold-start
    target on a platform) is reported as such rather than as zero.
    """
    r = _as_ranks(ranks)
    names = [f"{kind}@{k}" for k in ks for kind in ("recall", "ndcg")] + ["mrr"]
    out: dict[str, float] = {}
    for name in names:
        out[name] = float(per_user(r, name).mean()) if r.size else math.nan
    out["count"] = int(r.size)
    return out


class RankingAccumulator:
    """Gathers ranks batch by batch, per platform and per named user subset; pure Python state.

    Pass the same subset names with every batch of a platform (a mask per subset, aligned with the
    ranks); a subset added on some batches only would silently cover part of the users, so that is
    an error. ``merge`` combines accumulators from parallel evaluation workers.
    """

    def __init__(self, ks: Iterable[int] = DEFAULT_KS) -> None:
        self.ks = tuple(int(k) for k in ks)
        self._ranks: dict[str, dict[str, list[np.ndarray]]] = {}

    def add(
        self,
        platform: str,
        ranks: RankArray,
        subsets: Mapping[str, np.ndarray | torch.Tensor | Sequence[bool]] | None = None,
    ) -> None:
        """Add one batch of ranks of ``platform``; ``subsets``: name -> boolean mask per rank."""
        r = _as_ranks(ranks)
        subsets = dict(subsets or {})
        if ALL in subsets:
            raise ValueError(f"subset name {ALL!r} is reserved for the whole population")
        names = {ALL, *subsets}
        store = self._ranks.get(platform)
        if store is None:
            store = self._ranks[platform] = {name: [] for name in names}
        elif set(store) != names:
            raise ValueError(f"platform {platform!r}: subsets {sorted(names - {ALL})} differ from "
                             f"earlier batches {sorted(set(store) - {ALL})}")
        store[ALL].append(r)
        for name, mask in subsets.items():
            if isinstance(mask, torch.Tensor):
                mask = mask.detach().cpu().numpy()
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.shape != r.shape:
                raise ValueError(f"subset {name!r}: need a boolean mask of shape {r.shape}, "
                                 f"got {m.dtype} {m.shape}")
            store[name].append(r[m])

    def merge(self, other: RankingAccumulator) -> None:
        """Add everything ``other`` holds (same ks, same subset names per platform)."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge accumulators with ks {other.ks} into {self.ks}")
        for platform, store in other._ranks.items():
            mine = self._ranks.setdefault(platform, {name: [] for name in store})
            if set(mine) != set(store):
                raise ValueError(f"platform {platform!r}: subsets {sorted(store)} differ from "
                                 f"{sorted(mine)}")
            for name, parts in store.items():
                mine[name].extend(parts)

    @property
    def platforms(self) -> list[str]:
        return sorted(self._ranks)

    def subsets(self, platform: str) -> list[str]:
        """Subset names of ``platform``, ``ALL`` first."""
        return [ALL, *sorted(set(self._ranks[platform]) - {ALL})]

    def ranks(self, platform: str, subset: str = ALL) -> np.ndarray:
        """All ranks gathered for ``platform`` (and ``subset``), in the order they were added."""
        if platform not in self._ranks:
            raise KeyError(f"no ranks for platform {platform!r}; have {self.platforms}")
        parts = self._ranks[platform].get(subset)
        if parts is None:
            raise KeyError(f"platform {platform!r} has no subset {subset!r}; "
                           f"have {self.subsets(platform)}")
        return np.concatenate(parts) if parts else np.zeros(0, np.float64)

    def result(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{platform: {"all" | subset: ranking_metrics}}``."""
        return {p: {s: ranking_metrics(self.ranks(p, s), self.ks) for s in self.subsets(p)}
                for p in self.platforms}


# --------------------------------------------------------------------------- subsets


def training_items(
    histories: Iterable[Sequence[int] | np.ndarray], targets: RankArray | Sequence[int]
) -> np.ndarray:
    """Sorted unique item indices (> 0) in training histories or targets: the "seen" items."""
    parts = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else targets
    parts.append(np.asarray(t, dtype=np.int64).reshape(-1))
    items = np.unique(np.concatenate(parts))
    return items[items > 0]


def cold_start_mask(
    targets: RankArray | Sequence[int], train_items: np.ndarray | Collection[int]
) -> np.ndarray:
    """True where the target item never appears in the platform's training data.

    ``train_items``: the item indices seen in training (as target or in a history) on the same
    platform, e.g. ``training_items(...)``; an array or a set.
    """
    t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else targets
    seen = train_items if isinstance(train_items, np.ndarray) else np.fromiter(
        train_items, dtype=np.int64, count=len(train_items))
    return ~np.isin(np.asarray(t, dtype=np.int64), seen)


# --------------------------------------------------------------------------- CTR and uncertainty


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via Mann-Whitney U; tied scores get their average rank (a tie counts half).

    Exact and O(n log n), so it needs no threshold grid; raises if only one class is present,
    where AUC is undefined (a platform with no clicks in the test window).
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(y)[:5]}")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positive and {n_neg} negative "
                         "labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum_pos = avg_rank[inverse.reshape(-1)][y].sum()
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def bootstrap_ci(
    per_user_values: RankArray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users (resampling users with replacement).

    Seeded, so a report is reproducible; resamples are drawn in chunks to bound memory on large
    platforms.
    """
    v = per_user_values
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if np.isnan(v).any():
        raise ValueError("per_user_values contain NaN")
    if n < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n >= 1 and 0 < alpha < 1, got n={n}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // v.size)
    means = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)
