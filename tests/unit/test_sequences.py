from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from recsys.data.schema import EVENTS_SCHEMA
from recsys.data.sequences import SequenceConfig, build_examples, item_index

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def events(rows: list[tuple[str, str, int, str]]) -> pa.Table:
    """rows: (user, item, seconds, event_type); event_index = position."""
    n = len(rows)
    return pa.Table.from_pydict({
        "platform": ["p"] * n,
        "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows],
        "event_type": [r[3] for r in rows],
        "timestamp": [T0 + timedelta(seconds=r[2]) for r in rows],
        "quantity": [None] * n, "price": [None] * n, "session_id": [None] * n,
        "event_index": list(range(n)),
    }, schema=EVENTS_SCHEMA)


CATALOG = item_index(pa.array(["a", "b", "c", "d", "e", "f"]))  # a=1 ... f=6


def by_split(table: pa.Table) -> dict[str, list[tuple[list[int], int]]]:
    out: dict[str, list[tuple[list[int], int]]] = {}
    for r in table.to_pylist():
        out.setdefault(r["split"], []).append((r["history"], r["target"]))
    return out


def test_leave_one_out_by_time_not_by_row_order() -> None:
    # rows deliberately out of time order
    ev = events([("u", "c", 3, "view"), ("u", "a", 1, "view"), ("u", "e", 5, "view"),
                 ("u", "b", 2, "view"), ("u", "d", 4, "view")])
    table, stats = build_examples(ev, CATALOG, SequenceConfig(), "p")
    s = by_split(table)
    assert s["test"] == [([1, 2, 3, 4], 5)]
    assert s["valid"] == [([1, 2, 3], 4)]
    assert s["train"] == [([1, 2], 3)]
    assert stats.users == 1 and stats.events_used == 5


def test_timestamp_ties_break_by_source_order() -> None:
    ev = events([("u", "b", 0, "view"), ("u", "a", 0, "view"), ("u", "c", 0, "view")])
    s = by_split(build_examples(ev, CATALOG, SequenceConfig(), "p")[0])
    assert s["test"] == [([2, 1], 3)]


def test_short_users_counted_not_used() -> None:
    ev = events([("u", "a", 1, "view"), ("u", "b", 2, "view"), ("v", "a", 1, "view"),
                 ("v", "b", 2, "view"), ("v", "c", 3, "view")])
    table, stats = build_examples(ev, CATALOG, SequenceConfig(), "p")
    assert stats.users == 2 and stats.users_too_short == 1
    assert set(table["user_id"].to_pylist()) == {"v"}


def test_history_capped_and_train_windows_cover_every_transition() -> None:
    items = "abcdefabcdef"  # 12 events -> train part = first 10
    ev = events([("u", it, i, "view") for i, it in enumerate(items)])
    cfg = SequenceConfig(max_seq_len=3, min_seq_len=3)
    s = by_split(build_examples(ev, CATALOG, cfg, "p")[0])
    assert s["test"] == [([3, 4, 5], 6)]
    assert s["valid"] == [([2, 3, 4], 5)]
    seq = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]
    covered = []
    for hist, target in s["train"]:
        assert len(hist) <= 3
        full = hist + [target]
        covered += list(zip(full[:-1], full[1:]))
    assert sorted(covered) == sorted(zip(seq[:-1], seq[1:]))  # each transition exactly once
    one = by_split(build_examples(ev, CATALOG, cfg.model_copy(update={"train_windows": False}),
                                  "p")[0])
    assert one["train"] == [([1, 2, 3], 4)]


def test_collapse_repeats_and_event_type_filter() -> None:
    ev = events([("u", "a", 1, "view"), ("u", "a", 2, "click"), ("u", "a", 3, "purchase"),
                 ("u", "b", 4, "view"), ("u", "c", 5, "view"), ("u", "c", 6, "cart"),
                 ("u", "d", 7, "view")])
    table, stats = build_examples(ev, CATALOG, SequenceConfig(collapse_repeats=True), "p")
    assert stats.repeats_collapsed == 3
    assert by_split(table)["test"] == [([1, 2, 3], 4)]
    table, stats = build_examples(
        ev, CATALOG, SequenceConfig(event_types=["click", "purchase", "cart"]), "p")
    assert stats.events_other_type == 4 and stats.events_used == 3
    assert by_split(table)["test"] == [([1, 1], 3)]


def test_unknown_items_counted() -> None:
    ev = events([("u", "a", 1, "view"), ("u", "zzz", 2, "view"), ("u", "b", 3, "view"),
                 ("u", "c", 4, "view")])
    table, stats = build_examples(ev, CATALOG, SequenceConfig(), "p")
    assert stats.events_unknown_item == 1
    assert by_split(table)["test"] == [([1, 2], 3)]


def test_empty_input() -> None:
    table, stats = build_examples(events([]), CATALOG, SequenceConfig(), "p")
    assert table.num_rows == 0 and stats.users == 0


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError):
        SequenceConfig(min_seq_len=2)
