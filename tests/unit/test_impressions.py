"""Impressions (issue 21): exposures, never interactions; the shown-not-chosen item before each
label is the CTR head's negative there. Unit tier: Arrow tables and tiny models, no Ray."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.crossplatform import build_cross_examples
from recsys.data.feed import collate
from recsys.data.ingest.synthetic import generate
from recsys.data.schema import EVENTS_SCHEMA
from recsys.data.sequences import SequenceConfig, build_examples, item_index, user_sequences
from recsys.evaluation.offline import head_auc
from recsys.training.objective import RecommenderObjective
from tests.unit.test_objective import batch, platforms, tiny_model

T0 = datetime(2025, 1, 1, tzinfo=UTC)
CATALOG = item_index(pa.array(list("abcdefgh")))  # a=1 ... h=8


def events(rows: list[tuple[str, str, int, str]], platform: str = "p") -> pa.Table:
    """rows: (user, item, seconds, event_type); event_index = position."""
    n = len(rows)
    return pa.Table.from_pydict({
        "platform": [platform] * n, "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows], "event_type": [r[3] for r in rows],
        "timestamp": [T0 + timedelta(seconds=r[2]) for r in rows],
        "quantity": [None] * n, "price": [None] * n, "session_id": [None] * n,
        "event_index": list(range(n)),
    }, schema=EVENTS_SCHEMA)


LOG = events([
    ("u", "f", 0, "impression"), ("u", "a", 0, "impression"), ("u", "a", 1, "view"),
    ("u", "g", 2, "impression"), ("u", "b", 3, "view"),   # f, g: g is the latest before b
    ("u", "c", 5, "view"),                                 # nothing shown since b: 0
    ("u", "h", 6, "impression"), ("u", "d", 6, "impression"), ("u", "d", 6, "impression"),
    ("u", "d", 7, "click"),                                # h: d (twice) is the label
    ("u", "e", 9, "impression"),                           # after the last interaction
    ("v", "a", 0, "view"), ("v", "h", 1, "impression"), ("v", "b", 1, "view"),
    ("v", "c", 2, "view"), ("w", "g", 0, "impression"),    # w: impressions only
])


def test_impressions_are_never_interactions_and_each_label_gets_the_latest_shown() -> None:
    seqs = user_sequences(LOG, CATALOG, SequenceConfig())
    assert seqs.stats.impressions == 9 and seqs.stats.events_used == 7
    assert list(seqs.users) == ["u", "v"]
    # u: a (f shown; a itself shown too but it is the label), b (g), c (none), d (h, not d)
    assert seqs.items.tolist() == [1, 2, 3, 4, 1, 2, 3]
    assert seqs.shown.tolist() == [6, 7, 0, 8, 0, 8, 0]
    table, _ = build_examples(LOG, CATALOG, SequenceConfig(), "p", shown=True)
    rows = {(r["user_id"], r["split"]): r for r in table.to_pylist()}
    assert rows[("u", "test")]["history"] == [1, 2, 3]       # no impression in a history
    assert rows[("u", "test")]["shown"] == [7, 0, 8]           # labels b, c, d
    assert rows[("u", "valid")]["shown"] == [7, 0]             # labels b, c
    assert rows[("v", "test")]["shown"] == [8, 0]
    assert "shown" not in build_examples(LOG, CATALOG, SequenceConfig(), "p")[0].column_names


def test_impressions_cannot_be_made_interactions() -> None:
    with pytest.raises(ValueError, match="exposure, not an interaction"):
        SequenceConfig(event_types=["view", "impression"])


def test_a_bucket_without_impressions_gets_zeros_in_a_set_that_has_them() -> None:
    plain = events([(u, i, t, "view") for u in "xy" for t, i in enumerate("abc")])
    table, stats = build_examples(plain, CATALOG, SequenceConfig(), "p", shown=True)
    assert stats.impressions == 0 and table.num_rows == 4  # 3 items: test + valid
    assert all(set(s) == {0} and len(s) == len(h)
               for s, h in zip(table["shown"].to_pylist(), table["history"].to_pylist()))


def test_cross_platform_rows_keep_each_label_its_own_shown_item() -> None:
    a = events([("u", "a", 10, "view"), ("u", "g", 19, "impression"), ("u", "b", 20, "view"),
                ("u", "h", 29, "impression"), ("u", "c", 30, "view"),
                ("u", "f", 39, "impression"), ("u", "d", 40, "view")], "pa")
    b = events([("u", "e", 15, "view"), ("u", "a", 25, "view"), ("u", "b", 26, "view")], "pb")
    cfg = SequenceConfig(cross_platform=True)
    seqs = {"pa": user_sequences(a, CATALOG, cfg), "pb": user_sequences(b, CATALOG, cfg)}
    table, _ = build_cross_examples(seqs, "pa", cfg, ["pa", "pb"], shown=True)
    test = next(r for r in table.to_pylist() if r["split"] == "test")
    # merged: a(pa,10) e(pb,15) b(pa,20) a(pb,25) b(pb,26) c(pa,30); target d (f shown)
    assert test["history"] == [1, 5, 2, 1, 2, 3]
    assert test["history_platform"] == ["pa", "pb", "pa", "pb", "pb", "pa"]
    # labels: e (other platform: 0), b (g=7), a, b (other platform: 0), c (h=8), d (f=6)
    assert test["shown"] == [0, 7, 0, 0, 8, 6]


def test_collate_pads_shown_like_the_history() -> None:
    out = collate({"history": [np.array([1, 2, 3]), np.array([4])],
                   "shown": [np.array([0, 5, 6]), np.array([7])],
                   "target": np.array([9, 9])}, max_len=2)
    assert out["history"].tolist() == [[2, 3], [0, 4]]
    assert out["shown"].tolist() == [[5, 6], [0, 7]]


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax"])
def test_the_ctr_head_trains_against_the_shown_items(kind: str) -> None:
    """With a shown item at every position the CTR loss no longer depends on the sampler's
    random draws (it does without), and it equals the BCE against exactly those items."""
    history, target, platform = batch()
    shown = torch.where(history > 0, (history % 5) + 11, 0)  # (B, L) an item per label
    shown[:, -1] = 14
    from recsys.training.config import LossConfig
    obj = RecommenderObjective(tiny_model(dropout=0.0),
                               LossConfig(kind=kind, num_negatives=8), platforms()).eval()
    ctr = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ctr.append(obj(history, target, platform, None, shown)[1]["ctr_loss"])
    assert ctr[0] == pytest.approx(ctr[1], abs=1e-6)
    sampled = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        sampled.append(obj(history, target, platform)[1]["ctr_loss"])
    assert sampled[0] != pytest.approx(sampled[1], abs=1e-6)
    stats = obj(history, target, platform, None, shown)[1]
    assert stats["shown_negatives"] == stats["positions"]


def test_head_auc_against_shown_items_uses_only_rows_that_have_one() -> None:
    model = tiny_model(dropout=0.0).eval()
    tensors = platforms()
    history, target, platform = batch()
    rows = platform == 0
    shown = torch.zeros_like(history)
    b = {"history": history[rows], "target": target[rows], "platform": platform[rows],
         "shown": shown[rows]}
    gen = torch.Generator().manual_seed(0)
    assert np.isnan(head_auc(model, tensors, 0, [b], gen, negatives="shown"))
    b["shown"][:, -1] = torch.tensor([5, 7, 8])
    with torch.no_grad():
        auc = head_auc(model, tensors, 0, [b], gen, negatives="shown")
        table = tensors[0].item_table(model)
        user = model.user_vector(b["history"], table, b["platform"])
        pos = model.ctr_logit(user, table[b["target"]])
        neg = model.ctr_logit(user, table[torch.tensor([5, 7, 8])])
    expected = float((pos[:, None] > neg[None, :]).float().mean())
    assert auc == pytest.approx(expected)


def test_synthetic_impressions_are_pages_shown_before_each_choice() -> None:
    plain = generate(3, 0.2, 5)
    world = generate(3, 0.2, 5, impressions=["shop_b"])
    cols = ["user_id", "item_id", "event_type", "timestamp", "session_id"]
    for name, (ev, items) in world.items():
        real = ev[ev["event_type"] != "impression"].reset_index(drop=True)
        assert real[cols].equals(plain[name][0][cols]), name  # the same world otherwise
        assert items.equals(plain[name][1])
    ev = world["shop_b"][0]
    shown = ev[ev["event_type"] == "impression"]
    assert len(shown) > 2 * (ev["event_type"] == "view").sum()
    assert (world["shop_a"][0]["event_type"] != "impression").all()
    # each impression comes right before a view at the same time, of another item
    nxt = ev.shift(-1)
    page_end = shown.index[(nxt.loc[shown.index, "event_type"] != "impression").to_numpy()]
    assert (ev.loc[page_end + 1, "event_type"] == "view").all()
    assert (ev.loc[page_end + 1, "timestamp"].to_numpy() ==
            ev.loc[page_end, "timestamp"].to_numpy()).all()
    assert (ev.loc[page_end + 1, "item_id"].to_numpy() !=
            ev.loc[page_end, "item_id"].to_numpy()).all()
