"""The offline two-stage evaluation (``recsys.evaluation.rerank``): what serving's
``rerank_top_n`` would do, on the tiny export and example set of ``test_eval_export``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.examples import ExampleSet, load_example_set
from recsys.data.feed import collate
from recsys.evaluation.metrics import auc
from recsys.evaluation.offline import platform_tensors
from recsys.evaluation.rerank import ndcg_at, rerank_ranks, rerank_table
from recsys.model.export import Exported
from tests.unit.test_eval_export import setup  # noqa: F401  (the fixture)


def with_shown(es: ExampleSet, root: Path) -> ExampleSet:
    """``es`` as a set from logs with impressions: each label's shown item is the next index."""
    import shutil

    shutil.copytree(es.path, root)
    for f in root.glob("*/*.parquet"):
        if f.parent.name == "catalog":
            continue
        t = pq.read_table(f)
        shown = [[(x % 5) + 1 for x in h[1:] + [y]]
                 for h, y in zip(t["history"].to_pylist(), t["target"].to_pylist())]
        pq.write_table(t.append_column("shown", pa.array(shown, pa.list_(pa.int32()))), f)
    es.manifest.model_copy(update={"shown": True}).write(root)
    return load_example_set(root)


@torch.inference_mode()
def test_top_one_changes_nothing_and_ranks_stay_consistent(
        setup: tuple[Exported, ExampleSet]) -> None:  # noqa: F811
    exported, es = setup
    one = rerank_table(exported, es, ["shop_a"], top_n=1)[0]
    assert one["gain"] == 0.0 and one["ndcg@10_rerank"] == one["ndcg@10_retrieval"]
    assert one["shown_rows"] == 0 and one["ctr_auc_shown"] is None
    tensors = platform_tensors(exported, {p: np.ones(it.num_items + 1)
                                          for p, it in exported.items.items()},
                               list(exported.items))
    from recsys.data.examples import read_split
    test = read_split(es, "test")
    rows = test.filter(pa.compute.equal(test["platform"], "shop_a"))
    ids = {p: it.platform_id for p, it in exported.items.items()}
    b = collate({c: rows[c].to_numpy(zero_copy_only=False)
                 for c in ("history", "target", "platform")}, 8, ids)
    ranks = rerank_ranks(exported, tensors, [b], "shop_a", top_n=3)
    inside = ranks["retrieval"] <= 3
    assert (ranks["rerank"][~inside] == ranks["retrieval"][~inside]).all()
    assert (ranks["rerank"][inside] <= 3).all()
    assert ndcg_at(np.array([1, 3, 11])).tolist() == pytest.approx([1.0, 0.5, 0.0])


@torch.inference_mode()
def test_shown_items_give_both_stages_an_auc(setup: tuple[Exported, ExampleSet],  # noqa: F811
                                             tmp_path: Path) -> None:
    exported, es = setup
    shown = with_shown(es, tmp_path / "shown")
    row = rerank_table(exported, shown, ["shop_a"], top_n=5)[0]
    test = pq.read_table(shown.path / "test" / "a.parquet").to_pylist()
    mine = [r for r in test if r["platform"] == "shop_a"]
    assert row["shown_rows"] == len(mine) > 0
    assert 0.0 <= row["ctr_auc_shown"] <= 1.0
    # the retrieval's AUC on the (target, shown) pairs, from its own scores
    ids = {p: it.platform_id for p, it in exported.items.items()}
    b = collate({k: [r[k] for r in mine] for k in ("history", "target", "platform")}, 8, ids)
    s = exported.model.eval().score(b["history"], b["platform"], exported.item_table("shop_a"))
    pos = s[torch.arange(len(s)), b["target"]].numpy()
    neg = s[torch.arange(len(s)), torch.tensor([r["shown"][-1] for r in mine])].numpy()
    expected = auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    assert row["retrieval_auc_shown"] == pytest.approx(expected)
