"""The synthetic world: deterministic, overlapping, heavy-tailed, taste carried across shops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data.ingest import runner, synthetic
from recsys.data.ingest.base import IngestOptions
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENT_TYPES

SCALE = 1.0  # small catalogs (scale < 0.5) have too few items per sub-category for a long tail


@pytest.fixture(scope="module")
def world() -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    return synthetic.generate(3, SCALE, seed=7)


def _clean(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    ok = events["event_type"].isin(EVENT_TYPES) & events["item_id"].isin(items["item_id"])
    return events[ok]


def test_deterministic_per_seed() -> None:
    a, b = synthetic.generate(3, 0.1, seed=1), synthetic.generate(3, 0.1, seed=1)
    c = synthetic.generate(3, 0.1, seed=2)
    assert list(a) == list(b) == ["shop_a", "shop_b", "shop_c"]
    for name in a:
        pd.testing.assert_frame_equal(a[name][0], b[name][0])
        pd.testing.assert_frame_equal(a[name][1], b[name][1])
    assert not a["shop_a"][0][["user_id", "item_id"]].equals(c["shop_a"][0][["user_id", "item_id"]])


def test_frame_shape_and_names() -> None:
    w = synthetic.generate(4, 0.05, seed=0, names=["x", "y", "z", "w"])
    assert list(w) == ["x", "y", "z", "w"]
    events, items = w["x"]
    assert list(events.columns) == ["user_id", "item_id", "event_type", "timestamp", "quantity",
                                    "price", "session_id", "event_index", "_file", "_row"]
    assert set(items.columns) == {"item_id", "title", "description", "brand", "category",
                                  "price", "_file", "_row"}
    assert events["event_index"].is_unique and events["event_index"].dtype == np.int64
    assert events["_row"].tolist() == list(range(1, len(events) + 1))
    assert str(events["timestamp"].dt.tz) == "UTC"
    assert events["timestamp"].min() >= pd.Timestamp("2025-01-01", tz="UTC")
    assert events["timestamp"].max() <= pd.Timestamp("2025-06-30", tz="UTC")
    with pytest.raises(ValueError):
        synthetic.generate(3, 0.05, seed=0, names=["x", "y"])


def test_users_and_catalogs_overlap(world: dict) -> None:
    assert len(world) >= 3
    users = {n: set(e["user_id"]) for n, (e, _) in world.items()}
    cats = {n: set(i["item_id"]) for n, (_, i) in world.items()}
    everyone = set().union(*users.values())
    multi = sum(sum(u in s for s in users.values()) >= 2 for u in everyone) / len(everyone)
    assert 0.4 < multi < 0.75
    for a in world:
        for b in world:
            if a < b:
                assert len(users[a] & users[b]) / len(users[a]) > 0.2
                share = len(cats[a] & cats[b]) / len(cats[a] | cats[b])
                assert 0.15 < share < 0.8
    # The same item has the same text on every shop that sells it.
    ea, ia = world["shop_a"]
    ib = world["shop_b"][1]
    both = ia.merge(ib, on="item_id", suffixes=("_a", "_b"))
    assert len(both) and (both["title_a"] == both["title_b"]).all()
    assert (both["brand_a"] == both["brand_b"]).all()


def test_popularity_heavy_tailed_and_funnel(world: dict) -> None:
    for events, items in world.values():
        ev = _clean(events, items)
        counts = ev["item_id"].value_counts()
        n_top = max(1, len(items) // 10)
        assert counts.iloc[:n_top].sum() / len(ev) > 0.4
        kinds = ev["event_type"].value_counts()
        assert kinds["view"] > kinds["click"] > kinds["cart"] > kinds["purchase"] > 0
        buys = ev[ev["event_type"] == "purchase"]
        assert buys["quantity"].ge(1).all() and buys["price"].gt(0).all()
        views = ev[ev["event_type"] == "view"].groupby("user_id").size()
        assert views.min() >= 3 and 6 <= views.mean() <= 20 and views.max() > 3 * views.mean()
        # Strictly increasing time per user (clean rows only; injected copies duplicate times).
        per_user = ev.groupby("user_id")["timestamp"].diff().dropna()
        assert (per_user > pd.Timedelta(0)).all()


def _category_hist(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    top = items.set_index("item_id")["category"].dropna().map(lambda c: c[0])
    ev = _clean(events, items)
    ev = ev[ev["event_type"] == "view"]
    return pd.crosstab(ev["user_id"], ev["item_id"].map(top))


def test_taste_carries_across_platforms(world: dict) -> None:
    ha = _category_hist(*world["shop_a"])
    hb = _category_hist(*world["shop_b"])
    cols = sorted(set(ha.columns) | set(hb.columns))
    both = ha.index.intersection(hb.index)
    assert len(both) > 50
    a = ha.reindex(index=both, columns=cols, fill_value=0).to_numpy(float, copy=True)
    b = hb.reindex(index=both, columns=cols, fill_value=0).to_numpy(float, copy=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    same = (a * b).sum(axis=1).mean()
    shuffled = (a * b[np.random.default_rng(0).permutation(len(b))]).sum(axis=1).mean()
    assert same > shuffled + 0.25, (same, shuffled)


def test_sequences_have_short_term_structure(world: dict) -> None:
    events, items = world["shop_a"]
    sub = items.set_index("item_id")["category"].dropna().map(lambda c: c[1])
    views = _clean(events, items)
    views = views[views["event_type"] == "view"].assign(sub=lambda d: d["item_id"].map(sub))
    same_user = views["user_id"].eq(views["user_id"].shift())
    same_sub = views["sub"].eq(views["sub"].shift())
    base_rate = (views["sub"].value_counts(normalize=True) ** 2).sum()
    assert same_sub[same_user].mean() > base_rate + 0.3


def test_dirty_rows_are_small_and_controllable() -> None:
    dirty = synthetic.generate(3, 0.1, seed=3)
    clean = synthetic.generate(3, 0.1, seed=3, dirty_fraction=0.0)
    for name in dirty:
        (ed, itd), (ec, itc) = dirty[name], clean[name]
        bad = len(ed) - len(_clean(ed, itd))
        assert 0 < bad <= max(2, 0.005 * len(ed))
        assert (itd["title"].str.strip() == "").sum() >= 2
        assert len(_clean(ec, itc)) == len(ec) and (itc["title"].str.strip() != "").all()


def test_ingest_writes_balanced_lake(tmp_path: Path) -> None:
    opts = IngestOptions(source="synthetic", out=tmp_path / "lake", scale=0.2)
    written = runner.ingest(opts, Pseudonymizer(bytes(range(32))))
    assert [w.platform for w in written] == ["shop_a", "shop_b", "shop_c"]
    quarantined = 0
    for w in written:
        report = json.loads((w.path / "report.json").read_text())
        assert report["events"]["invariant_holds"] and report["items"]["invariant_holds"]
        assert report["events"]["rows_out"] > 0
        assert "unknown_event_type" in report["events"]["quarantined_by_reason"]
        assert "item_not_in_catalog" in report["events"]["quarantined_by_reason"]
        assert report["items"]["quarantined_by_reason"].get("missing_title", 0) >= 2
        assert report["quirks"]["synthetic_parameters"]["scale"] == 0.2
        quarantined += report["events"]["rows_quarantined"]
    assert quarantined > 0
