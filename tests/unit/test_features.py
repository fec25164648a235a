"""Item features (vocabulary, catalog loading, token batches) and the text-vector cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertConfig, BertModel

from recsys.data.catalog import BUNDLED_ENCODER, build_catalog, text_hash
from recsys.model.encoder_cache import TextVectorCache, encoder_fingerprint
from recsys.model.features import (
    FeatureVocab,
    category_prefixes,
    load_item_features,
    load_token_ids,
    token_batch,
)


def items(rows: list[tuple[str, str, str | None, list[str] | None]]) -> pa.Table:
    """Lake-style items table: (item_id, title, brand, category path)."""
    return pa.table({
        "item_id": [r[0] for r in rows],
        "title": [r[1] for r in rows],
        "brand": pa.array([r[2] for r in rows], pa.string()),
        "category": pa.array([r[3] for r in rows], pa.list_(pa.string())),
        "price": pa.array([1.0] * len(rows), pa.float64()),
    })


SHOP_A = items([
    ("a2", "Kettlebell", "Kinetic", ["sports", "fitness", "weights", "kettlebells"]),
    ("a1", "Dutch oven", "Saltwell", ["kitchen", "cookware"]),
    ("a3", "Novel", None, None),
])
SHOP_B = items([
    ("b1", "Kettlebell", "KINETIC ", ["Sports", "fitness"]),
    ("b2", "Lipstick", "Rouge", ["beauty", "makeup"]),
])


def example_set(tmp_path: Path) -> Path:
    """catalog/<platform>.parquet as the pipeline writes it."""
    (tmp_path / "catalog").mkdir()
    for name, table in (("shop_a", SHOP_A), ("shop_b", SHOP_B)):
        pq.write_table(build_catalog(table, ["title", "brand", "category"]),
                       tmp_path / "catalog" / f"{name}.parquet")
    return tmp_path


# -- vocabulary -----------------------------------------------------------------------------------


def test_category_prefixes() -> None:
    assert category_prefixes(["a", "B", "c", "d"], 3) == ["a", "a > b", "a > b > c"]
    assert category_prefixes(["a", " ", "c"], 3) == ["a", "a > c"]
    assert category_prefixes(None, 3) == []


def test_vocab_ids_are_deterministic_and_unknown_is_zero() -> None:
    v1 = FeatureVocab.build([SHOP_A, SHOP_B])
    v2 = FeatureVocab.build([SHOP_B.take([1, 0]), SHOP_A.take([2, 1, 0])])
    assert v1 == v2
    assert v1.brands == {"kinetic": 1, "rouge": 2, "saltwell": 3}  # case/space-folded, sorted
    assert v1.brand_id("Kinetic") == v1.brand_id("KINETIC ") == 1
    assert v1.brand_id("Nope") == v1.brand_id(None) == 0
    assert v1.num_brands == 4
    ids = v1.category_ids(["sports", "fitness", "weights", "kettlebells"])
    assert ids == [v1.categories[k] for k in
                   ("sports", "sports > fitness", "sports > fitness > weights")]
    assert v1.category_ids(["kitchen", "bakeware"]) == [v1.categories["kitchen"], 0, 0]
    assert v1.category_ids(None) == [0, 0, 0]
    assert FeatureVocab.from_dict(json.loads(json.dumps(v1.to_dict()))) == v1


def test_vocab_extend_adds_only_new_values_and_frozen_refuses() -> None:
    base = FeatureVocab.build([SHOP_A])
    ext = base.extend([SHOP_B])
    assert {k: ext.brands[k] for k in base.brands} == base.brands
    assert {k: ext.categories[k] for k in base.categories} == base.categories
    assert set(ext.brands) - set(base.brands) == {"rouge"}
    assert ext.brands["rouge"] == base.num_brands  # appended after the old ids
    assert base.brand_id("Rouge") == 0  # extend returns a new vocabulary
    assert ext.extend([SHOP_B]) == ext
    with pytest.raises(ValueError, match="frozen"):
        base.freeze().extend([SHOP_B])


def test_load_item_features(tmp_path: Path) -> None:
    path = example_set(tmp_path)
    vocab, feats = load_item_features(path, ["shop_a", "shop_b"])
    a = feats["shop_a"]
    assert a.item_ids == ["a1", "a2", "a3"]  # item index i + 1, sorted by item id
    assert a.brand_ids.tolist() == [0, vocab.brand_id("saltwell"), vocab.brand_id("kinetic"), 0]
    assert a.category_ids.shape == (4, 3) and a.category_ids.dtype == np.int64
    assert a.category_ids[0].tolist() == [0, 0, 0] and a.category_ids[3].tolist() == [0, 0, 0]
    assert a.category_ids[2].tolist() == vocab.category_ids(["sports", "fitness", "weights"])
    assert len(a.text_hash) == a.num_items == 3
    brands, cats = a.tensors()
    assert brands.dtype == cats.dtype == torch.long

    # Transfer: an unfrozen vocabulary grows, a frozen one maps the unseen to 0.
    base, _ = load_item_features(path, ["shop_a"])
    grown, _ = load_item_features(path, ["shop_b"], base)
    assert "rouge" in grown.brands and grown.brands["kinetic"] == base.brands["kinetic"]
    same, fb = load_item_features(path, ["shop_b"], base.freeze())
    assert same == base.freeze()
    assert fb["shop_b"].brand_ids.tolist() == [0, base.brand_id("kinetic"), 0]
    with pytest.raises(FileNotFoundError, match="shop_x"):
        load_item_features(path, ["shop_x"])


def test_token_batch_right_pads() -> None:
    ids, mask = token_batch([np.array([101, 7, 102], np.int32), np.array([101, 102])])
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long
    empty_ids, _ = token_batch([])
    assert empty_ids.shape == (0, 0)


# -- text vector cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random tiny BERT saved as a model directory (no download)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "tiny-bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, vocab_size=100)).save_pretrained(path)
    return str(path)


def test_cache_encodes_each_text_once(tmp_path: Path, tiny_encoder: str) -> None:
    toks = [np.array([1, 5, 2]), np.array([1, 6, 7, 8, 2]), np.array([1, 9, 2])]
    cache = TextVectorCache(tmp_path, tiny_encoder, max_tokens=8, batch_size=2)
    first = cache.vectors(["h1", "h2", "h3", "h1"], [*toks, toks[0]])
    assert first.shape == (4, 32) and first.dtype == np.float32
    assert (cache.hits, cache.misses) == (0, 3)
    np.testing.assert_array_equal(first[0], first[3])

    again = cache.vectors(["h3", "h1"], [toks[2], toks[0]])
    assert (cache.hits, cache.misses) == (2, 3)  # nothing computed
    np.testing.assert_array_equal(again, first[[2, 0]])

    reopened = TextVectorCache(tmp_path, tiny_encoder, max_tokens=8)
    np.testing.assert_array_equal(reopened.vectors(["h2"], [toks[1]]), first[[1]])
    assert reopened.misses == 0 and len(reopened) == 3
    files = list((tmp_path / cache.fingerprint).glob("vectors-*.parquet"))
    assert len(files) == 1

    # Sorting by length for batching must not mix up rows: equal to encoding one by one.
    from recsys.model.recommender import load_text_encoder

    enc = load_text_encoder(tiny_encoder).eval()
    with torch.inference_mode():
        ids, mask = token_batch([toks[1]])
        np.testing.assert_allclose(enc(ids, mask).numpy()[0], first[1], rtol=1e-5, atol=1e-6)


def test_cache_fingerprint_changes_with_max_tokens(tmp_path: Path, tiny_encoder: str) -> None:
    assert encoder_fingerprint(tiny_encoder, 8) == encoder_fingerprint(tiny_encoder, 8)
    assert encoder_fingerprint(tiny_encoder, 8) != encoder_fingerprint(tiny_encoder, 16)
    cache = TextVectorCache(tmp_path, tiny_encoder, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        cache.vectors(["h"], [np.arange(1, 7)])


def test_bundled_minilm_vectors_from_text_and_from_tokens(tmp_path: Path) -> None:
    """The real encoder on 3 texts: 384-dim, similar products closer than unrelated ones, and
    example-set token ids give the same vectors as tokenising here."""
    from recsys.data.catalog import tokenize_batch

    texts = ["Kinetic cast iron kettlebell 12 kg. sports > fitness.",
             "Pro grade kettlebell for strength training. sports > fitness.",
             "Bestselling biography of a jazz musician. books > nonfiction."]
    hashes = text_hash(texts)
    cache = TextVectorCache(tmp_path, BUNDLED_ENCODER, max_tokens=64)
    vecs = cache.vectors(hashes, texts)
    assert vecs.shape == (3, 384)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.1

    tokens = tokenize_batch(pa.table({"text_hash": hashes, "text": texts}), BUNDLED_ENCODER, 64)
    token_ids = [np.asarray(t) for t in tokens["token_ids"].to_pylist()]
    other = TextVectorCache(tmp_path / "other", BUNDLED_ENCODER, max_tokens=64,
                            text_encoder=cache._text_encoder)
    np.testing.assert_allclose(other.vectors(hashes, token_ids), vecs, rtol=1e-4, atol=1e-5)


def test_item_vectors_and_token_ids_of_an_example_set(tmp_path: Path, tiny_encoder: str) -> None:
    path = example_set(tmp_path)
    _, feats = load_item_features(path, ["shop_a"])
    a = feats["shop_a"]
    rng = np.random.default_rng(0)
    tokens = {h: rng.integers(1, 100, size=4).astype(np.int32) for h in a.text_hash}
    pq.write_table(pa.table({"text_hash": list(tokens),
                             "token_ids": pa.array([t.tolist() for t in tokens.values()],
                                                   pa.list_(pa.int32()))}),
                   path / "tokens.parquet")
    loaded = load_token_ids(path)
    assert all(np.array_equal(loaded[h], tokens[h]) for h in tokens)
    cache = TextVectorCache(tmp_path / "cache", tiny_encoder, max_tokens=8)
    vecs = cache.item_vectors(a, loaded)
    assert vecs.shape == (a.num_items + 1, 32)
    assert not vecs[0].any() and vecs[1:].any()
    assert load_token_ids(tmp_path / "missing") == {}
