"""The serving history store: per (pseudonym, platform) the last max_len items by time (funnels
collapsed, as the example set does), the purchased set, and popularity by event count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from recsys.data.schema import EVENTS_SCHEMA
from recsys.serving.history import HistoryStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def events(rows: list[tuple[str, str, str, int]], platform: str = "shop") -> pa.Table:
    """(user, item, event type, minute) rows, deliberately not in time order."""
    return pa.Table.from_pylist([
        {"platform": platform, "user_id": u, "item_id": i, "event_type": e,
         "timestamp": T0 + timedelta(minutes=m), "quantity": None, "price": None,
         "session_id": None, "event_index": k}
        for k, (u, i, e, m) in enumerate(rows)], schema=EVENTS_SCHEMA)


def test_histories_are_time_ordered_collapsed_and_cut() -> None:
    store = HistoryStore(max_len=3)
    store.add_platform("shop", events([
        ("u1", "c", "view", 5), ("u1", "a", "view", 1), ("u1", "a", "purchase", 2),
        ("u1", "b", "view", 3), ("u1", "b", "view", 4), ("u1", "a", "view", 6),
        ("u2", "x", "cart", 1), ("u2", "x", "purchase", 9)]))
    u1 = store.lookup("u1")["shop"]
    assert u1.items == ("b", "c", "a")  # a, b, c, a -> last 3; b's two views are one
    assert list(u1.times_us) == sorted(u1.times_us)
    assert u1.purchased == frozenset({"a"})
    assert store.lookup("u2")["shop"].items == ("x",)
    assert store.lookup("nobody") == {}
    assert store.popular["shop"] == [("a", 3), ("b", 2), ("x", 2), ("c", 1)]


def test_event_types_choose_what_counts_as_history() -> None:
    store = HistoryStore(max_len=5)
    store.add_platform("shop", events([("u", "a", "view", 1), ("u", "b", "purchase", 2)]),
                       event_types=["purchase"])
    assert store.lookup("u")["shop"].items == ("b",)
    assert store.popular["shop"] == [("a", 1), ("b", 1)]  # popularity counts every event


def test_from_lake_reads_every_platform(tiny_encoder: str, tmp_path: Path) -> None:
    from recsys.data.pseudonym import Pseudonymizer
    from recsys.serving.toy import build_toy_world

    pseudo = Pseudonymizer(bytes(range(32)))
    world = build_toy_world(tmp_path, tiny_encoder, pseudo)
    store = HistoryStore.from_lake(world.lake, max_len=6)
    dave = store.lookup(pseudo.one("dave"))
    assert set(dave) == {"shop_a", "shop_b"}
    assert dave["shop_a"].items == ("shop_a-009", "shop_a-010")
    assert dave["shop_a"].purchased == frozenset({"shop_a-010"})
    assert set(store.lookup(pseudo.one("erin"))) == {"shop_z"}
    assert store.lookup("dave") == {}  # raw ids are never keys
    only_a = HistoryStore.from_lake(world.lake, platforms=["shop_a"])
    assert set(only_a.popular) == {"shop_a"}
    with pytest.raises(FileNotFoundError, match="no-lake"):
        HistoryStore.from_lake(tmp_path / "no-lake")
