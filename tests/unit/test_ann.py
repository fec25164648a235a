"""The approximate index of large catalogs (issue 24): written at export above ``ann_threshold``
without pickle, refused when tampered with or stale, recall@10 >= 0.95 on clustered vectors, and
serving through it returns what exact scoring returns (exclusions and filters applied exactly)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.model.ann import build_index, default_params, load_index
from recsys.model.export import (
    ExportedItems,
    ExportError,
    load_ann,
    load_export,
    save_export,
    scoring_vectors,
)
from recsys.model.recommender import Recommender
from recsys.serving.predictor import Predictor
from recsys.serving.retrieval import search_items, top_items
from recsys.serving.schemas import Filters, RecommendRequest

H, D = 16, 16
SIZES = {"big": 3000, "small": 40}

pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_items(platform: str, pid: int) -> ExportedItems:
    n = SIZES[platform]
    rng = np.random.default_rng(pid)
    vecs = np.concatenate([np.zeros((1, H), np.float32), clustered(n, H, 30, pid)])
    brands, cats = rng.integers(0, 5, n + 1), rng.integers(0, 6, (n + 1, 2))
    brands[0], cats[0] = 0, 0
    return ExportedItems(platform=platform, platform_id=pid,
                         item_ids=[f"{platform}-{i}" for i in range(1, n + 1)],
                         brand_ids=brands, category_ids=cats, text_vecs=vecs)


def make_export(root: Path, threshold: int = 1000) -> tuple[Path, Recommender]:
    torch.manual_seed(0)
    model = Recommender(text_dim=H, dim=D, num_platforms=2, num_brands=5, num_categories=6,
                        max_len=6, num_layers=1, num_heads=2, dropout=0.1, num_experts=2,
                        repeat_bias=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.repeat.weight.fill_(0.3)  # seen items get a real bias: candidates must hold them
    items = {p: make_items(p, i) for i, p in enumerate(SIZES)}
    (root / "src").mkdir(parents=True, exist_ok=True)
    catalogs = {}
    for p, it in items.items():
        n = it.num_items
        catalogs[p] = root / "src" / f"{p}.parquet"
        pq.write_table(pa.table({
            "item_id": it.item_ids, "title": [f"t{i}" for i in range(n)],
            "brand": [f"b{b}" for b in it.brand_ids[1:]],
            "category": pa.array([["home", f"c{i % 3}"] for i in range(n)],
                                 pa.list_(pa.string()))}), catalogs[p])
    meta = {"platforms": list(SIZES), "platforms_with_items": list(SIZES), "mode": "pretrain"}
    path = save_export(root / "export", model, model.state_dict(), meta, items, catalogs,
                       ann_threshold=threshold)
    return path, model


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("ann"))[0]


def test_an_index_is_written_above_the_threshold_only_and_holds_no_pickle(export: Path) -> None:
    assert sorted(p.name for p in (export / "ann").iterdir()) == ["big.faiss", "big.json"]
    suffixes = {p.suffix for p in export.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".parquet", ".faiss"}, suffixes
    head = (export / "ann" / "big.faiss").read_bytes()[:4]
    assert head == b"IwFl" and not head.startswith(b"\x80")  # faiss IVF-Flat, not a pickle


def test_the_loaded_index_finds_what_exact_search_finds(export: Path) -> None:
    exported = load_export(export)
    vecs = scoring_vectors(exported.model, exported.items["big"]).numpy()  # (N+1, D)
    ann = load_ann(export, "big", SIZES["big"], D)
    assert ann is not None and load_ann(export, "small", SIZES["small"], D) is None
    queries = vecs[1:51]
    found = ann.search(queries, 10, nprobe=ann.meta.nlist)  # every cell: exact
    exact = np.argsort(-(queries @ vecs[1:].T), axis=1)[:, :10] + 1
    assert (found == exact).mean() > 0.99


def test_a_threshold_of_zero_builds_no_index(tmp_path: Path) -> None:
    path, _ = make_export(tmp_path, threshold=0)
    assert not (path / "ann").exists()


@pytest.mark.parametrize("attack", ["flipped_byte", "truncated", "stale_items", "stale_weights",
                                    "wrong_size"])
def test_a_tampered_or_stale_index_is_refused_naming_the_file(tmp_path: Path,
                                                                attack: str) -> None:
    path, model = make_export(tmp_path)
    index_file = path / "ann" / "big.faiss"
    n = SIZES["big"]
    if attack == "flipped_byte":
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index_file.write_bytes(bytes(data))
    elif attack == "truncated":
        index_file.write_bytes(index_file.read_bytes()[:1000])
    elif attack == "stale_items":  # the catalog was re-exported, the index was not
        items_file = path / "items" / "big.safetensors"
        items_file.write_bytes(items_file.read_bytes()[:-4] + b"\0\0\0\0")
    elif attack == "stale_weights":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    else:
        n -= 1
    with pytest.raises(ExportError, match=r"ann/big\.faiss|ann/big\.json"):
        load_ann(path, "big", n, D)


def test_recall_at_10_on_clustered_vectors_is_at_least_0_95() -> None:
    x = clustered(20_000, 32, 200, seed=1)
    rng = np.random.default_rng(2)
    q = x[rng.integers(0, len(x), 200)] + 0.2 * rng.standard_normal((200, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index, params = build_index(x)
    assert (params["nlist"], params["nprobe"]) == default_params(len(x))
    _, found = index.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall >= 0.95, recall


def test_a_foreign_index_file_fails_to_load_as_an_ann_error(export: Path) -> None:
    with pytest.raises(ValueError, match="built for 3000 items"):
        load_index(export, "big", 2999, D)


# -- serving ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(export: Path) -> Predictor:
    pred = Predictor.from_export(export, search=False)
    cat = pred.catalogs["big"]
    assert cat.ann is not None and pred.catalogs["small"].ann is None
    return pred


def test_serving_through_the_index_returns_the_exact_top_k(predictor: Predictor) -> None:
    cat = predictor.catalogs["big"]
    model = predictor.model
    rng = np.random.default_rng(3)
    agree = []
    for trial in range(20):
        user = torch.as_tensor(rng.standard_normal(D), dtype=torch.float32)
        seen = rng.integers(1, cat.num_items + 1, 4).tolist()
        excluded = sorted(set(rng.integers(1, cat.num_items + 1, 5).tolist()) | set(seen[:2]))
        allowed = np.sort(rng.choice(np.arange(1, cat.num_items + 1), 2500, replace=False)) \
            if trial % 2 else None
        args = (user, seen, cat.platform_id, 10, excluded, allowed)
        exact, exact_s = top_items(model, cat.table, None, *args)
        approx, approx_s = top_items(model, cat.table, cat.ann, *args)
        assert not set(approx) & set(excluded)
        assert allowed is None or set(approx) <= set(allowed.tolist())
        agree.append(len(set(exact) & set(approx)) / 10)
        if exact == approx:
            np.testing.assert_allclose(approx_s, exact_s, rtol=1e-5, atol=1e-6)
    assert np.mean(agree) >= 0.95, agree


def test_every_cell_probed_makes_the_index_path_exact(predictor: Predictor) -> None:
    cat = predictor.catalogs["big"]
    full = dataclasses.replace(cat.ann, meta=cat.ann.meta.model_copy(
        update={"nprobe": cat.ann.meta.nlist}))
    rng = np.random.default_rng(4)
    for _ in range(10):
        user = torch.as_tensor(rng.standard_normal(D), dtype=torch.float32)
        seen = rng.integers(1, cat.num_items + 1, 3).tolist()
        args = (user, seen, cat.platform_id, 10, seen[:1], None)
        assert top_items(predictor.model, cat.table, full, *args)[0] == \
            top_items(predictor.model, cat.table, None, *args)[0]
        query = torch.nn.functional.normalize(user, dim=-1)
        assert search_items(cat.scoring, full, query, 10)[0] == \
            search_items(cat.scoring, None, query, 10)[0]


def test_a_narrow_filter_falls_back_to_exact_scoring(predictor: Predictor) -> None:
    cat = predictor.catalogs["big"]
    user = torch.as_tensor(np.random.default_rng(5).standard_normal(D), dtype=torch.float32)
    allowed = np.arange(1, 31)  # 30 items, most of them far from the user: few candidates
    excluded = [1, 2, 3]
    args = (user, [], cat.platform_id, 20, excluded, allowed)
    approx = top_items(predictor.model, cat.table, cat.ann, *args)[0]
    assert approx == top_items(predictor.model, cat.table, None, *args)[0]
    assert len(approx) == 20


def test_recommend_end_to_end_uses_the_index(predictor: Predictor) -> None:
    request = RecommendRequest(platform="big", recent_items=["big-5", "big-77"], k=10)
    with_index = predictor.recommend(request)
    cat = predictor.catalogs["big"]
    predictor.catalogs["big"] = dataclasses.replace(cat, ann=None)
    try:
        exact = predictor.recommend(request)
    finally:
        predictor.catalogs["big"] = cat
    got = [i.item_id for i in with_index.items]
    want = [i.item_id for i in exact.items]
    assert len(set(got) & set(want)) >= 9 and len(got) == 10
    filtered = predictor.recommend(request.model_copy(update={"filters": Filters(brand="b1")}))
    assert {i.brand for i in filtered.items} == {"b1"}


def test_the_app_args_switch_the_index_off_and_the_int8_encoder_on(export: Path) -> None:
    from recsys.serving.args import AppArgs, load_predictor

    args = AppArgs(model_uri=str(export), lake=None, search=False, approximate_index=False,
                   int8_search=True)
    pred = load_predictor(args)
    assert pred.catalogs["big"].ann is None and pred.int8_search
    on = load_predictor(args.model_copy(update={"approximate_index": True}))
    assert on.catalogs["big"].ann is not None
