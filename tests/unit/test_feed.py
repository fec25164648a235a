"""The worker-side feed: collate and the per-rank user part of a split every worker reads whole."""

from __future__ import annotations

import numpy as np

from recsys.data.feed import collate, iter_batches, user_part


class _Shard:
    """A stand-in for a Ray ``DataIterator``: yields the given numpy batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches

    def iter_batches(self, **_: object):
        yield from self.batches


def _users(n: int) -> np.ndarray:
    return np.array([f"u{i:05d}" for i in range(n)], dtype=object)


def test_user_parts_are_disjoint_cover_all_and_ignore_order() -> None:
    users = _users(1000)
    parts = [user_part(users, r, 3) for r in range(3)]
    assert (np.sum(parts, axis=0) == 1).all()  # each user in exactly one part
    assert all(200 < p.sum() < 470 for p in parts)  # roughly balanced
    perm = np.random.default_rng(0).permutation(len(users))
    assert (user_part(users[perm], 1, 3) == parts[1][perm]).all()
    assert user_part(users, 0, 1).all()


def test_iter_batches_part_keeps_this_ranks_rows_only() -> None:
    users = _users(40)
    batch = {"user_id": users, "history": np.array([np.array([1, 2, i % 5 + 1]) for i in range(40)],
                                                    dtype=object),
             "target": np.arange(40) % 7 + 1, "platform": np.array(["a"] * 40, dtype=object)}
    halves = [batch_slice(batch, slice(0, 25)), batch_slice(batch, slice(25, 40))]
    seen = []
    for rank in range(2):
        got = list(iter_batches(_Shard(halves), 512, 10, platform_ids={"a": 0}, part=(rank, 2)))
        seen.append(sum(len(b["target"]) for b in got))
        want = user_part(users, rank, 2)
        assert seen[-1] == int(want.sum())
        targets = np.concatenate([b["target"].numpy() for b in got])
        assert (targets == batch["target"][want]).all()
    assert sum(seen) == 40
    whole = list(iter_batches(_Shard(halves), 512, 10, platform_ids={"a": 0}))
    assert sum(len(b["target"]) for b in whole) == 40
    assert collate(halves[0], 10)["history"].shape == (25, 3)


def batch_slice(batch: dict[str, np.ndarray], s: slice) -> dict[str, np.ndarray]:
    return {k: v[s] for k, v in batch.items()}


def _rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n sequences with long-tailed lengths (mostly short, a few up to 50), as Scientific's."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(1 + rng.geometric(0.2, n), 50)
    return {"user_id": _users(n),
            "history": np.array([rng.integers(1, 100, k) for k in lengths], dtype=object),
            "target": np.arange(n) + 1, "platform": np.array(["a"] * n, dtype=object)}


def _reads(rows: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(rows["target"])
    return [batch_slice(rows, slice(i, i + size)) for i in range(0, n, size)]


def test_length_buckets_keep_every_row_once_and_cut_padding() -> None:
    rows = _rows(1000)
    bs, k = 32, 8
    plain = list(iter_batches(_Shard(_reads(rows, bs)), bs, 50, platform_ids={"a": 0}))
    bucketed = list(iter_batches(_Shard(_reads(rows, bs * k)), bs, 50, platform_ids={"a": 0},
                                 length_buckets=k, seed=3))
    for batches in (plain, bucketed):
        targets = np.concatenate([b["target"].numpy() for b in batches])
        assert sorted(targets.tolist()) == rows["target"].tolist()  # each row exactly once
        assert max(len(b["target"]) for b in batches) == bs
    # Equal shards give equal batch counts (DDP steps in lockstep): 1000 rows = 3 full reads of
    # 256 (8 batches each) + 232 rows (8 batches).
    assert len(bucketed) == len(plain) == 32

    def padded(batches: list) -> int:
        return sum(b["history"].numel() for b in batches)

    real = sum(len(h) for h in rows["history"])
    assert padded(bucketed) < 0.5 * padded(plain)  # several-fold less padding
    assert padded(bucketed) < 1.5 * real
    # Not a curriculum: the batch order within a read is shuffled (seeded).
    first_read = [int(b["history"].shape[1]) for b in bucketed[:k]]
    assert first_read != sorted(first_read)
    again = list(iter_batches(_Shard(_reads(rows, bs * k)), bs, 50, platform_ids={"a": 0},
                              length_buckets=k, seed=3))
    assert all((a["target"] == b["target"]).all() for a, b in zip(bucketed, again, strict=True))
