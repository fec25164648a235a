import math

import numpy as np
import pytest
import torch

from recsys.evaluation.metrics import (
    ALL,
    COLD_START,
    RankingAccumulator,
    auc,
    bootstrap_ci,
    cold_start_mask,
    per_user,
    rank_of_target,
    ranking_metrics,
    training_items,
)

# Scores over padding + 5 items; column 0 is padding.
SCORES = torch.tensor([
    [math.inf, 0.1, 0.9, 0.5, 0.3, 0.7],  # item 3 (0.5): items 2 and 5 above -> rank 3
    [-math.inf, 0.9, 0.1, 0.2, 0.3, 0.4],  # item 1 on top -> rank 1
])


def test_rank_is_one_plus_strictly_greater_and_padding_never_counts() -> None:
    ranks = rank_of_target(SCORES, torch.tensor([3, 1]))
    assert ranks.tolist() == [3.0, 1.0]
    assert ranks.dtype == torch.float64
    # the padding score (+inf in row 0) did not push the target down
    assert rank_of_target(SCORES, torch.tensor([2, 2])).tolist() == [1.0, 5.0]


def test_ties_count_half() -> None:
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.2, 0.5]])  # target 1 tied with items 2 and 4
    assert rank_of_target(scores, torch.tensor([1])).item() == 1 + 0 + 2 / 2
    # a constant scorer ranks the target in the middle, not first: (N + 1) / 2
    flat = torch.zeros(3, 11)
    assert rank_of_target(flat, torch.tensor([1, 5, 10])).tolist() == [5.5, 5.5, 5.5]


def test_exclude_masks_history_but_never_the_target() -> None:
    targets = torch.tensor([3, 1])
    # row 0: exclude items 2 and 5 (both above the target) and the target itself
    ranks = rank_of_target(SCORES, targets, exclude=[np.array([2, 5, 3]), np.array([], int)])
    assert ranks.tolist() == [1.0, 1.0]
    # excluding only the target changes nothing
    same = rank_of_target(SCORES, targets, exclude=[np.array([3]), np.array([1])])
    assert same.tolist() == [3.0, 1.0]
    # padded (B, L) tensor form, 0 = padding
    padded = torch.tensor([[2, 0, 0], [0, 0, 0]])
    assert rank_of_target(SCORES, targets, exclude=padded).tolist() == [2.0, 1.0]


def test_rank_input_errors() -> None:
    with pytest.raises(ValueError, match="padding"):
        rank_of_target(SCORES, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1..5"):
        rank_of_target(SCORES, torch.tensor([6, 1]))
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(torch.tensor([[0.0, math.nan, 1.0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="exclude indices"):
        rank_of_target(SCORES, torch.tensor([3, 1]), exclude=[np.array([9]), np.array([1])])
    assert rank_of_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_ranking_metrics_hand_computed() -> None:
    m = ranking_metrics(np.array([1, 3, 11, 60]), ks=(10, 50))
    assert m["count"] == 4
    assert m["recall@10"] == pytest.approx(2 / 4)  # rank 11 is a miss at 10
    assert m["recall@50"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1.0 + 0.5) / 4)  # rank 3 -> 1/log2(4) = 0.5
    assert m["ndcg@50"] == pytest.approx((1.0 + 0.5 + 1 / math.log2(12)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 60) / 4)
    assert per_user(torch.tensor([1.0]), "ndcg@10").tolist() == [1.0]
    assert per_user(np.array([10.5]), "hit@10").tolist() == [0.0]  # a half tie past k misses


def test_ranking_metrics_empty_and_bad_input() -> None:
    m = ranking_metrics(np.zeros(0))
    assert m["count"] == 0 and math.isnan(m["ndcg@10"])
    with pytest.raises(ValueError, match="1-based"):
        ranking_metrics(np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown metric"):
        per_user(np.array([1.0]), "precision@10")


def test_accumulator_equals_one_shot_and_separates_platforms_and_subsets() -> None:
    rng = np.random.default_rng(0)
    ranks_a = rng.integers(1, 200, size=300).astype(float)
    cold_a = rng.random(300) < 0.2
    ranks_b = rng.integers(1, 50, size=40).astype(float)
    acc = RankingAccumulator(ks=(10, 50))
    for lo in range(0, 300, 64):  # uneven batches, platforms interleaved
        acc.add("a", torch.from_numpy(ranks_a[lo:lo + 64]), {COLD_START: cold_a[lo:lo + 64]})
        if lo == 0:
            acc.add("b", ranks_b, {COLD_START: np.zeros(40, bool)})
    res = acc.result()
    assert set(res) == {"a", "b"}
    assert res["a"][ALL] == ranking_metrics(ranks_a)
    assert res["a"][COLD_START] == ranking_metrics(ranks_a[cold_a])
    assert res["b"][ALL] == ranking_metrics(ranks_b)
    assert res["b"][COLD_START]["count"] == 0
    np.testing.assert_array_equal(acc.ranks("a"), ranks_a)

    # merging two halves gives the same as one accumulator
    left, right = RankingAccumulator(), RankingAccumulator()
    left.add("a", ranks_a[:100], {COLD_START: cold_a[:100]})
    right.add("a", ranks_a[100:], {COLD_START: cold_a[100:]})
    left.merge(right)
    assert left.result()["a"] == res["a"]


def test_accumulator_rejects_inconsistent_subsets() -> None:
    acc = RankingAccumulator()
    acc.add("a", np.array([1.0, 2.0]), {COLD_START: np.array([True, False])})
    with pytest.raises(ValueError, match="differ"):
        acc.add("a", np.array([1.0]))
    with pytest.raises(ValueError, match="boolean mask"):
        acc.add("a", np.array([1.0]), {COLD_START: np.array([1])})


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.integers(0, 2, size=200)
        s = rng.integers(0, 8, size=200).astype(float)  # heavy ties
        assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    y = rng.random(500) < 0.3
    s = rng.normal(size=500) + y
    assert auc(y, s) == pytest.approx(brute_auc(y.astype(int), s), abs=1e-12)
    assert auc(np.array([0, 1]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0, 1]), np.array([1.0, 1.0])) == 0.5


def test_auc_errors() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="0/1"):
        auc(np.array([0, 2]), np.array([0.0, 1.0]))


def test_cold_start_mask() -> None:
    seen = training_items([[1, 2, 0], np.array([4])], np.array([2, 7]))
    assert seen.tolist() == [1, 2, 4, 7]  # padding 0 dropped
    targets = torch.tensor([1, 3, 7, 9])
    assert cold_start_mask(targets, seen).tolist() == [False, True, False, True]
    assert cold_start_mask([1, 3], {1, 2}).tolist() == [False, True]


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    v = per_user(np.random.default_rng(2).integers(1, 100, size=400), "ndcg@10")
    lo, hi = bootstrap_ci(v, n=500, seed=3)
    assert (lo, hi) == bootstrap_ci(v, n=500, seed=3)
    assert (lo, hi) != bootstrap_ci(v, n=500, seed=4)
    assert lo < v.mean() < hi
    assert bootstrap_ci(np.full(10, 0.25), n=50) == (0.25, 0.25)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci(np.zeros(0))
