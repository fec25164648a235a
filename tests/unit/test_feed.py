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
