"""Drift statistics between a reference sample and a current one: pure numpy/scipy functions.

Every function compares what a model was trained on (the reference) with what came after (the
current window) and returns one number; :mod:`recsys.monitoring.monitor` sets them beside their
thresholds. All are deterministic and cheap (counts, sorts), so that a monitor can run every few
minutes on a laptop.

* item popularity shift: :func:`popularity_buckets` puts both windows' events on the same
  bins (the reference's items by popularity rank, each bin about 1/bins of its events, and a
  bin for new items), then :func:`psi` (population stability index) or :func:`js_distance`
  (Jensen-Shannon distance, base 2: 0 identical, 1 disjoint) compares them;
* :func:`new_item_rate`: share of current events on items the reference never saw;
* :func:`ks_statistic`: two-sample Kolmogorov-Smirnov distance of history lengths or scores;
* :func:`online_ctr` + :func:`wilson_interval`: clicks per impression with its 95% interval.

Why not Evidently (evidently 0.7.23): it installs against requirements/constraints.txt without
moving a pin, but brings 27 packages (a litestar web server, statsmodels, nltk, plotly, Faker,
iterative-telemetry) for what is a few lines each here. Its drift presets compare dataframe
columns; item popularity over a catalog of thousands of ids, new-item rate and clicks joined to
impressions by request are computed by hand there as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

EPSILON = 1e-4
"""Smoothing of empty buckets (PSI takes the log of each share)."""
NEW = "new"


def popularity_buckets(reference: Sequence[str] | np.ndarray, current: Sequence[str] | np.ndarray,
                       bins: int = 20) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Counts of both windows over the same popularity bins: the reference's items ranked by
    their count (ties by id) are cut into ``bins`` bins of about equal reference mass (``0-5%``
    holds the head items that make the first 5% of its events, ``95-100%`` the long tail), plus
    one ``new`` bin for items the reference never saw. A shift of demand towards the tail (or
    the head) moves mass between bins whatever the catalog's size. Returns (labels, reference
    counts, current counts), each of length ``bins + 1``."""
    ref = np.asarray(reference, dtype=object)
    cur = np.asarray(current, dtype=object)
    items, counts = np.unique(ref, return_counts=True)
    order = np.lexsort((items, -counts))
    items, counts = items[order], counts[order]
    before = (np.cumsum(counts) - counts) / max(counts.sum(), 1)  # share of heavier items
    item_bin = np.minimum((before * bins).astype(np.int64), bins - 1)
    index = dict(zip(items.tolist(), item_bin.tolist(), strict=True))

    def bucket(values: np.ndarray) -> np.ndarray:
        idx = np.array([index.get(v, bins) for v in values.tolist()], dtype=np.int64)
        return np.bincount(idx, minlength=bins + 1).astype(np.float64)

    labels = [f"{100 * k / bins:g}-{100 * (k + 1) / bins:g}%" for k in range(bins)]
    return labels + [NEW], bucket(ref), bucket(cur)


def _shares(counts: np.ndarray, eps: float) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("a distribution with no counts cannot be compared")
    p = counts / counts.sum()
    p = np.maximum(p, eps)
    return p / p.sum()


def psi(reference_counts: np.ndarray, current_counts: np.ndarray,
        eps: float = EPSILON) -> float:
    """Population stability index ``sum((c - r) * ln(c / r))`` over shares, empty buckets
    smoothed to ``eps``. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted."""
    r, c = _shares(reference_counts, eps), _shares(current_counts, eps)
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (square root of the divergence, base 2): 0 for the same shares,
    1 for disjoint supports. Symmetric and finite without smoothing."""
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(current_counts, dtype=np.float64)
    if r.sum() <= 0 or c.sum() <= 0:
        raise ValueError("a distribution with no counts cannot be compared")
    return float(jensenshannon(r / r.sum(), c / c.sum(), base=2))


def new_item_rate(reference_items: Sequence[str] | np.ndarray,
                  current_items: Sequence[str] | np.ndarray) -> float:
    """Share of current events whose item has no event in the reference (nan: no events)."""
    cur = np.asarray(current_items, dtype=object)
    if len(cur) == 0:
        return float("nan")
    seen = np.isin(cur, np.unique(np.asarray(reference_items, dtype=object)))
    return float(1.0 - seen.mean())


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance (largest gap between the two empirical CDFs,
    0..1); nan when a sample is empty."""
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    if len(reference) == 0 or len(current) == 0:
        return float("nan")
    return float(ks_2samp(reference, current).statistic)


def prior_interactions(users: np.ndarray, order_key: np.ndarray, cap: int) -> np.ndarray:
    """For each event, how many earlier events its user has (capped at ``cap``: the longest
    history a model reads). ``order_key`` sorts events in time (ties: input order)."""
    users = np.asarray(users, dtype=object)
    order = np.lexsort((np.arange(len(users)), np.asarray(order_key), users))
    sorted_users = users[order]
    starts = np.r_[True, sorted_users[1:] != sorted_users[:-1]] if len(users) else np.zeros(
        0, bool)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(users)), 0))
    position = np.arange(len(users)) - group_start
    out = np.empty(len(users), dtype=np.int64)
    out[order] = np.minimum(position, cap)
    return out


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (nan, nan for no trials)."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def online_ctr(impressions: tuple[np.ndarray, np.ndarray],
               clicks: tuple[np.ndarray, np.ndarray]) -> tuple[int, int]:
    """(clicked impressions, impressions): an impression (request id, item id) counts as
    clicked when a click on the same item carries the same request id."""
    req, item = (np.asarray(a, dtype=object) for a in impressions)
    shown = {(r, i) for r, i in zip(req.tolist(), item.tolist(), strict=True)}
    clicked = {(r, i) for r, i in zip(*(np.asarray(a, dtype=object).tolist() for a in clicks),
                                      strict=True)}
    return len(shown & clicked), len(shown)
