"""Cross-platform histories (``recsys.data.crossplatform``): no leakage across platforms in any
split, the same rows and targets as own-platform histories, every own transition trained once,
and the serving-side merge built the same way. Pure Arrow/numpy: no Ray."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.data.crossplatform import (
    TEST,
    TRAIN,
    VALID,
    build_cross_examples,
    history_elsewhere,
    merge_histories,
)
from recsys.data.examples import same_user_files
from recsys.data.schema import EVENTS_SCHEMA
from recsys.data.sequences import SequenceConfig, build_examples, item_index, user_sequences

T0 = datetime(2025, 1, 1, tzinfo=UTC)
PLATFORMS = ["shop_a", "shop_b", "shop_c"]


def events(platform: str, rows: list[tuple[str, str, int]]) -> pa.Table:
    """rows: (user, item, seconds)."""
    n = len(rows)
    return pa.Table.from_pydict({
        "platform": [platform] * n, "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows], "event_type": ["view"] * n,
        "timestamp": [T0 + timedelta(seconds=r[2]) for r in rows],
        "quantity": [None] * n, "price": [None] * n, "session_id": [None] * n,
        "event_index": list(range(n)),
    }, schema=EVENTS_SCHEMA)


def random_world(seed: int) -> dict[str, tuple[pa.Table, pa.Array]]:
    """Three platforms, overlapping users, coarse times (many ties within and across
    platforms). Every event has its own item, so an item index names one event."""
    rng = np.random.default_rng(seed)
    world = {}
    for p in PLATFORMS:
        rows = []
        for u in range(12):
            if rng.random() < 0.25:
                continue  # not on this platform
            for _ in range(int(rng.integers(1, 14))):
                rows.append((f"u{u}", f"{p}-{len(rows)}", int(rng.integers(0, 40))))
        order = rng.permutation(len(rows))
        table = events(p, [rows[i] for i in order])
        world[p] = (table, item_index(pa.array([r[1] for r in rows])))
    return world


def build(world: dict[str, tuple[pa.Table, pa.Array]], target: str,
          cfg: SequenceConfig) -> pa.Table:
    seqs = {p: user_sequences(ev, cat, cfg) for p, (ev, cat) in world.items()}
    return build_cross_examples(seqs, target, cfg, PLATFORMS)[0]


def event_facts(world: dict[str, tuple[pa.Table, pa.Array]], cfg: SequenceConfig
                ) -> dict[tuple[str, int], tuple[str, int, int, int, int]]:
    """(platform, item index) -> (user, time in us, stage on its platform, position in the
    user's sequence there, that sequence's length)."""
    out = {}
    for p, (ev, cat) in world.items():
        s = user_sequences(ev, cat, cfg)
        for k, (a, b) in enumerate(zip(s.starts.tolist(), s.ends.tolist())):
            stage = [TRAIN] * (b - a)
            if b - a >= cfg.min_seq_len:
                stage[-1], stage[-2] = TEST, VALID
            for j in range(a, b):
                out[(p, int(s.items[j]))] = (s.users[k], int(s.times[j]), stage[j - a], j - a,
                                             b - a)
    return out


MAX_STAGE = {"train": TRAIN, "valid": VALID, "test": TEST}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_len", [3, 50])
def test_no_history_event_at_or_after_the_target_and_held_out_events_stay_out(
        seed: int, max_len: int) -> None:
    world = random_world(seed)
    cfg = SequenceConfig(max_seq_len=max_len, cross_platform=True)
    facts = event_facts(world, cfg)
    foreign_seen = 0
    for target in PLATFORMS:
        for r in build(world, target, cfg).to_pylist():
            user, t_time = facts[(target, r["target"])][:2]
            assert user == r["user_id"]
            assert len(r["history"]) == len(r["history_platform"]) <= max_len
            times = []
            for item, p in zip(r["history"], r["history_platform"]):
                owner, time, stage, _, _ = facts[(p, item)]
                assert owner == r["user_id"]  # the same pseudonym, never another user's event
                if p == target:
                    assert time <= t_time  # own items: leave-one-out order (ties by source)
                else:
                    foreign_seen += 1
                    assert time < t_time, "an event elsewhere at or after the target's time"
                    assert stage <= MAX_STAGE[r["split"]], \
                        f"a {r['split']} row holds another platform's held-out event"
                times.append(time)
            assert times == sorted(times)  # merged by time, oldest first
    assert foreign_seen > 0, "the data must exercise cross-platform histories"


@pytest.mark.parametrize("seed", range(6))
def test_inside_a_training_window_every_label_is_later_than_the_items_from_elsewhere(
        seed: int) -> None:
    """The loss trains every position whose next item is the platform's own: the items from
    other platforms before it must be strictly earlier than that label too."""
    world = random_world(seed)
    cfg = SequenceConfig(max_seq_len=4, cross_platform=True)
    facts = event_facts(world, cfg)
    for target in PLATFORMS:
        for r in build(world, target, cfg).to_pylist():
            seq = list(zip(r["history"], r["history_platform"])) + [(r["target"], target)]
            for j, (item, p) in enumerate(seq):
                if p != target:
                    continue
                label_time = facts[(p, item)][1]
                assert all(facts[(q, i)][1] < label_time for i, q in seq[:j] if q != target)


@pytest.mark.parametrize("seed", range(6))
def test_same_rows_and_targets_as_own_histories_and_every_own_transition_trained_once(
        seed: int) -> None:
    world = random_world(seed)
    cfg = SequenceConfig(max_seq_len=3, cross_platform=True)
    facts = event_facts(world, cfg)
    for target in PLATFORMS:
        cross = build(world, target, cfg).to_pylist()
        own = build_examples(*world[target], cfg, target)[0].to_pylist()
        for split in ("valid", "test"):
            assert sorted((r["user_id"], r["target"]) for r in cross if r["split"] == split) \
                == sorted((r["user_id"], r["target"]) for r in own if r["split"] == split)
        # own-history rows: suffixes of the cross rows' own items, same targets
        by_key = {(r["user_id"], r["split"], r["target"]): r for r in cross}
        for r in own:
            if r["split"] == "train":
                continue
            c = by_key[(r["user_id"], r["split"], r["target"])]
            mine = [i for i, p in zip(c["history"], c["history_platform"]) if p == target]
            assert r["history"][-len(mine):] == mine if mine else True
        # every own training event with anything before it is a label exactly once
        labels = []
        for r in cross:
            if r["split"] != "train":
                continue
            seq = list(zip(r["history"], r["history_platform"])) + [(r["target"], target)]
            labels += [i for j, (i, p) in enumerate(seq) if p == target and j > 0]
        expected = []
        for (p, item), (user, time, stage, position, length) in facts.items():
            if p != target or stage != TRAIN or length < cfg.min_seq_len:
                continue  # a user too short for examples here has no rows
            elsewhere_before = any(f[0] == user and f[1] < time and f[2] == TRAIN
                                   for q, f in facts.items() if q[0] != p)
            if position > 0 or elsewhere_before:
                expected.append(item)
        assert sorted(labels) == sorted(expected)


def test_without_events_elsewhere_the_rows_are_the_own_platform_rows() -> None:
    world = random_world(3)
    cfg = SequenceConfig(max_seq_len=3, cross_platform=True)
    alone = {"shop_a": world["shop_a"]}
    seqs = {p: user_sequences(ev, cat, cfg) for p, (ev, cat) in alone.items()}
    cross = build_cross_examples(seqs, "shop_a", cfg, PLATFORMS)[0]
    own = build_examples(*world["shop_a"], cfg, "shop_a")[0]
    assert cross.drop_columns(["history_platform"]).to_pylist() == own.to_pylist()
    assert not history_elsewhere(cross).any()


def test_a_worked_example() -> None:
    """a: x1@1 x2@3 x3@5 x4@7 x5@9; b: y1@2 y2@5 y3@8 y4@9 (y3 valid, y4 test on b)."""
    a = events("a", [("u", f"x{i}", t) for i, t in enumerate([1, 3, 5, 7, 9], 1)])
    b = events("b", [("u", f"y{i}", t) for i, t in enumerate([2, 5, 8, 9], 1)])
    cfg = SequenceConfig(cross_platform=True)
    cat_a = item_index(pa.array([f"x{i}" for i in range(1, 6)]))
    cat_b = item_index(pa.array([f"y{i}" for i in range(1, 5)]))
    seqs = {"a": user_sequences(a, cat_a, cfg), "b": user_sequences(b, cat_b, cfg)}
    rows = build_cross_examples(seqs, "a", cfg, ["a", "b"])[0].to_pylist()
    got = {(r["split"], r["target"]): list(zip(r["history_platform"], r["history"]))
           for r in rows}
    # test x5@9: y4@9 is not earlier; y3@8 (b's valid target) is, and a test row may hold it
    assert got[("test", 5)] == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("a", 4),
                                ("b", 3)]
    # valid x4@7: y2@5 comes after x3@5 (own first at equal times)
    assert got[("valid", 4)] == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
    # train up to x3@5: only b's training events strictly earlier (y1@2); y2@5 is not earlier
    assert got[("train", 3)] == [("a", 1), ("b", 1), ("a", 2)]
    assert set(got) == {("test", 5), ("valid", 4), ("train", 3)}
    assert history_elsewhere(build_cross_examples(seqs, "a", cfg, ["a", "b"])[0]).all()


def test_serving_merge_orders_by_time_own_first_and_keeps_the_last() -> None:
    items, platforms = merge_histories(
        "a", {"a": ([1, 2, 3], [10, 30, 50]), "b": ([7, 8], [20, 30])}, max_len=4)
    assert list(zip(platforms, items)) == [("b", 7), ("a", 2), ("b", 8), ("a", 3)]
    assert merge_histories("a", {"b": ([7], [1])}, max_len=50) == ([7], ["b"])


def test_files_of_another_platform_that_can_hold_a_buckets_users() -> None:
    def files(n: int) -> list[Path]:
        return [Path(f"bucket-{i:04d}.parquet") for i in range(n)]

    mine = files(4)
    assert same_user_files(mine[1], mine, files(4)) == [Path("bucket-0001.parquet")]
    assert same_user_files(mine[3], mine, files(2)) == [Path("bucket-0001.parquet")]
    assert same_user_files(mine[2], mine, files(1)) == files(1)
    assert same_user_files(mine[2], mine, files(3)) == files(3)  # gcd 1: any bucket
    assert same_user_files(mine[2], mine, [Path("x.parquet")]) == [Path("x.parquet")]
    # the rule matches the lake's hash bucketing: h % 4 == 1 and h % 6 == i share users iff
    # i % 2 == 1
    for h in range(0, 240, 7):
        assert (h % 6) in [int(f.stem[-4:]) for f in same_user_files(mine[h % 4], mine, files(6))]
