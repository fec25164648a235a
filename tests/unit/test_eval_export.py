"""``evaluate_export`` on a hand-written example set (docs/data_format.md, "Examples"): one row
per platform, every test user counted, metrics in range, an oracle scores perfectly, the
cold-start subset is the targets unseen in training, and batching does not change a number;
with cross-platform histories, users with and without history elsewhere reported apart."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.examples import (
    DataConfig,
    ExampleManifest,
    ExampleSet,
    PlatformCounts,
    TextCounts,
    load_example_set,
)
from recsys.data.sequences import CROSS_EXAMPLES_SCHEMA, EXAMPLES_SCHEMA, SequenceConfig
from recsys.evaluation.metrics import COLD_START
from recsys.evaluation.offline import ELSEWHERE, OWN_ONLY, evaluate_export
from recsys.model.export import Exported, ExportedItems, load_export, save_export
from recsys.model.recommender import Recommender

H = D = 16
MAX_LEN = 8
SIZES = {"shop_a": 30, "shop_b": 20}
# Test users per platform: (first item, history length). Each sequence walks the catalog
# (i, i+1, ...), wrapping after N, so the target is always "the item after the last one".
TEST_USERS = {"shop_a": [(1, 3), (5, 4), (27, 5), (12, 2), (20, 6)],
              "shop_b": [(2, 2), (9, 3), (18, 4)]}
# Training walks cover only part of each catalog, so some test targets are cold.
TRAIN_USERS = {"shop_a": [(1, 6), (14, 4)], "shop_b": [(1, 5)]}
METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")


pytestmark = pytest.mark.usefixtures("one_thread")


def walk(platform: str, start: int, length: int) -> list[int]:
    """``length`` + 1 consecutive item indices from ``start``, wrapping 1..N."""
    n = SIZES[platform]
    return [(start - 1 + j) % n + 1 for j in range(length + 1)]


def examples(split: str, users: dict[str, list[tuple[int, int]]]) -> pa.Table:
    rows = [{"platform": p, "user_id": f"{p}-u{u}", "split": split, "history": seq[:-1],
             "target": seq[-1]}
            for p, walks in users.items() for u, seq in enumerate(walk(p, *w) for w in walks)]
    return pa.Table.from_pylist(rows, schema=EXAMPLES_SCHEMA)


def write_example_set(root: Path) -> ExampleSet:
    """EX/{train,valid,test}/*.parquet, EX/catalog/<p>.parquet, EX/manifest.json."""
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True)
    table = examples("train", TRAIN_USERS)
    for p in SIZES:  # one file per platform, as the pipeline writes them
        pq.write_table(table.filter(pc.equal(table["platform"], p)),
                       root / "train" / f"{p}-0.parquet")
    pq.write_table(examples("valid", {"shop_a": [(3, 2)]}), root / "valid" / "a.parquet")
    pq.write_table(examples("test", TEST_USERS), root / "test" / "a.parquet")
    (root / "catalog").mkdir()
    for p, n in SIZES.items():
        pq.write_table(pa.table({
            "item_idx": pa.array(np.arange(1, n + 1, dtype=np.int32)),
            "item_id": [f"{p}-{i}" for i in range(1, n + 1)],
            "title": [f"item {i}" for i in range(1, n + 1)],
            "brand": ["acme"] * n,
            "category": pa.array([["home"]] * n, pa.list_(pa.string())),
            "price": pa.array(np.ones(n)),
            "text": [f"item {i}. acme." for i in range(1, n + 1)],
            "text_hash": [f"{p}{i}" for i in range(1, n + 1)],
        }), root / "catalog" / f"{p}.parquet")
    counts = {p: PlatformCounts(catalog_items=n, lake_users=len(TEST_USERS[p]), users_too_short=0,
                                test_rows=len(TEST_USERS[p])) for p, n in SIZES.items()}
    ExampleManifest(created_at=datetime.now(UTC), seconds=0.0, input_fingerprint="test",
                    config=DataConfig(), platforms=counts,
                    text=TextCounts(distinct_texts=sum(SIZES.values()),
                                    catalog_rows=sum(SIZES.values()))).write(root)
    return load_example_set(root)


def write_export(root: Path, catalogs: Path) -> Exported:
    torch.manual_seed(0)
    model = Recommender(text_dim=H, dim=D, num_platforms=2, num_brands=3, num_categories=3,
                        max_len=MAX_LEN, num_layers=1, num_heads=2, dropout=0.1, num_experts=2)
    items = {}
    for pid, (p, n) in enumerate(SIZES.items()):
        rng = np.random.default_rng(pid)
        vecs = rng.normal(size=(n + 1, H)).astype(np.float32)
        vecs[0] = 0.0
        brands = np.r_[0, np.ones(n, np.int64)]
        cats = np.zeros((n + 1, 3), np.int64)
        cats[1:, 0] = 1
        items[p] = ExportedItems(platform=p, platform_id=pid,
                                 item_ids=[f"{p}-{i}" for i in range(1, n + 1)],
                                 brand_ids=brands, category_ids=cats, text_vecs=vecs)
    meta = {"platforms": list(SIZES), "platforms_with_items": list(SIZES)}
    path = save_export(root, model, model.state_dict(), meta, items,
                       {p: catalogs / f"{p}.parquet" for p in SIZES})
    return load_export(path)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Exported, ExampleSet]:
    es = write_example_set(tmp_path / "examples")
    return write_export(tmp_path / "export", es.path / "catalog"), es


def cold_targets(platform: str) -> int:
    """Test targets that appear nowhere (history or target) in the platform's training rows."""
    seen = {i for w in TRAIN_USERS[platform] for i in walk(platform, *w)}
    return sum(walk(platform, *w)[-1] not in seen for w in TEST_USERS[platform])


def test_one_row_per_platform_with_every_test_user(setup: tuple[Exported, ExampleSet]) -> None:
    exported, es = setup
    report = evaluate_export(exported, es, split="test", run="tiny")
    assert report.run == "tiny" and report.split == "test"
    assert sorted(report.platforms) == sorted(SIZES)
    for p, res in report.platforms.items():
        assert res.users == len(TEST_USERS[p])
        for m in METRICS:
            assert 0.0 <= res.metrics[m] <= 1.0, (p, m)
        assert res.history_excluded is not None and res.history_excluded["count"] == res.users
        # Masking history items can only move the target up.
        assert res.history_excluded["mrr"] >= res.metrics["mrr"]
        assert res.auc is not None and 0.0 <= res.auc <= 1.0
        assert set(res.ci) == {"ndcg@10", "recall@10"}


def test_cold_start_counts_targets_unseen_in_training(setup: tuple[Exported, ExampleSet]) -> None:
    exported, es = setup
    report = evaluate_export(exported, es)
    for p, res in report.platforms.items():
        expected = cold_targets(p)
        assert 0 < expected < len(TEST_USERS[p]), "the data must have cold and warm targets"
        assert res.subsets[COLD_START]["count"] == expected


def test_an_oracle_scores_perfectly(setup: tuple[Exported, ExampleSet],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The user vector is the target's own item vector ("the item after the last one"): its
    cosine with the target is 1, the unique maximum, so every target ranks first."""
    exported, es = setup
    model = exported.model

    def oracle(history: torch.Tensor, table: torch.Tensor, platform: torch.Tensor,
               *cross_platform: object) -> torch.Tensor:
        n = table.shape[0] - 1
        return table[history[:, -1] % n + 1]

    monkeypatch.setattr(model, "user_vector", oracle)
    report = evaluate_export(exported, es)
    for res in report.platforms.values():
        assert res.metrics["recall@10"] == 1.0 and res.metrics["ndcg@10"] == 1.0
        assert res.metrics["mrr"] == 1.0
        assert res.history_excluded["ndcg@10"] == 1.0


def test_batching_and_platform_choice_change_nothing(setup: tuple[Exported, ExampleSet]) -> None:
    exported, es = setup
    whole = evaluate_export(exported, es, batch_size=512)
    batched = evaluate_export(exported, es, batch_size=2)
    only_b = evaluate_export(exported, es, platforms=["shop_b"], batch_size=3)
    assert list(only_b.platforms) == ["shop_b"]
    for p in SIZES:
        for m in METRICS:
            assert batched.platforms[p].metrics[m] == pytest.approx(whole.platforms[p].metrics[m])
        assert batched.platforms[p].subsets == whole.platforms[p].subsets
    assert only_b.platforms["shop_b"].metrics == pytest.approx(whole.platforms["shop_b"].metrics)


def test_a_split_without_rows_for_a_platform_is_left_out(
        setup: tuple[Exported, ExampleSet]) -> None:
    exported, es = setup
    report = evaluate_export(exported, es, split="valid")  # valid has shop_a rows only
    assert list(report.platforms) == ["shop_a"]
    res = report.platforms["shop_a"]
    assert res.users == 1
    # With one user the bootstrap interval collapses onto the value; nothing is NaN.
    assert not any(math.isnan(v) for v in res.ci["ndcg@10"])


# -- cross-platform histories ---------------------------------------------------------------------


def cross_example_set(root: Path, own: ExampleSet) -> ExampleSet:
    """``own`` with cross-platform histories: shop_a's first two test users also hold two
    shop_b items (as a cross-platform example set would), every other row its own items."""
    import shutil

    shutil.copytree(own.path, root)
    for split in ("train", "valid", "test"):
        for f in (root / split).glob("*.parquet"):
            rows = pq.read_table(f).to_pylist()
            for r in rows:
                r["history_platform"] = [r["platform"]] * len(r["history"])
                if split == "test" and r["user_id"] in ("shop_a-u0", "shop_a-u1"):
                    r["history"] = [3, 4] + r["history"]
                    r["history_platform"] = ["shop_b", "shop_b"] + r["history_platform"]
            pq.write_table(pa.Table.from_pylist(rows, schema=CROSS_EXAMPLES_SCHEMA), f)
    manifest = own.manifest.model_copy(update={"config": DataConfig(
        sequences=SequenceConfig(cross_platform=True))})
    manifest.write(root)
    return load_example_set(root)


def test_users_with_and_without_history_elsewhere_are_reported_apart(
        setup: tuple[Exported, ExampleSet], tmp_path: Path) -> None:
    exported, es = setup
    cross = cross_example_set(tmp_path / "cross", es)
    ranks: dict[str, np.ndarray] = {}
    users: dict[str, np.ndarray] = {}
    report = evaluate_export(exported, cross, ranks_out=ranks, users_out=users)
    a = report.platforms["shop_a"]
    assert a.subsets[ELSEWHERE]["count"] == 2
    assert a.subsets[OWN_ONLY]["count"] == len(TEST_USERS["shop_a"]) - 2
    assert report.platforms["shop_b"].subsets[ELSEWHERE]["count"] == 0
    assert sorted(users["shop_a"]) == [f"shop_a-u{i}" for i in range(5)]
    # the own-history model's users split the same way, by user id
    own = evaluate_export(exported, es, elsewhere_from=cross)
    assert own.platforms["shop_a"].subsets[ELSEWHERE]["count"] == 2
    assert ELSEWHERE not in evaluate_export(exported, es).platforms["shop_a"].subsets
    # the rows without items from elsewhere rank exactly as in the own-history set
    own_ranks: dict[str, np.ndarray] = {}
    evaluate_export(exported, es, ranks_out=own_ranks)
    assert np.array_equal(ranks["shop_b"], own_ranks["shop_b"])
    assert np.array_equal(ranks["shop_a"][2:], own_ranks["shop_a"][2:])
