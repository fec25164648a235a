"""The serving export: ``save_export`` -> ``load_export`` is lossless (weights, items, scores),
and the MLflow pyfunc built on it answers top-k requests from item ids, without Ray or MLflow
runs (``_load`` is what ``load_context`` calls)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertConfig, BertModel

from recsys.model.encoder import TextEncoder
from recsys.model.export import (
    FORMAT_VERSION,
    ExportedItems,
    ExportError,
    load_export,
    save_export,
)
from recsys.model.pyfunc import RecommenderPyfunc
from recsys.model.recommender import Recommender

H = D = 16
MAX_LEN = 6
SIZES = {"shop_a": 12, "shop_b": 9}
Served = tuple[RecommenderPyfunc, Recommender, dict[str, ExportedItems]]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(encoder: TextEncoder | None = None) -> Recommender:
    torch.manual_seed(0)
    model = Recommender(text_dim=H, dim=D, num_platforms=2, num_brands=5, num_categories=6,
                        max_len=MAX_LEN, num_layers=1, num_heads=2, dropout=0.1, num_experts=2,
                        text_encoder=encoder)
    with torch.no_grad():  # gates start uniform and platform gates at zero: move them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def item_id(platform: str, i: int) -> str:
    return f"{platform}-item-{i:03d}"


def exported_items(platform: str, pid: int) -> ExportedItems:
    rng = np.random.default_rng(pid)
    n = SIZES[platform]
    brands = rng.integers(0, 5, n + 1)
    cats = rng.integers(0, 6, (n + 1, 3))
    vecs = rng.normal(size=(n + 1, H)).astype(np.float32)
    brands[0], cats[0], vecs[0] = 0, 0, 0.0
    return ExportedItems(platform=platform, platform_id=pid,
                         item_ids=[item_id(platform, i) for i in range(1, n + 1)],
                         brand_ids=brands, category_ids=cats, text_vecs=vecs)


def write_catalog(path: Path, items: ExportedItems) -> Path:
    """A catalog parquet with the example set's columns (item_idx 1..N in row order)."""
    n = items.num_items
    pq.write_table(pa.table({
        "item_idx": pa.array(np.arange(1, n + 1, dtype=np.int32)),
        "item_id": items.item_ids,
        "title": [f"title {i}" for i in range(1, n + 1)],
        "brand": [f"brand {b}" for b in items.brand_ids[1:]],
        "category": pa.array([["home", f"c{i % 3}"] for i in range(1, n + 1)],
                             pa.list_(pa.string())),
        "price": pa.array(np.linspace(1.0, 9.0, n)),
        "text": [f"title {i}. brand." for i in range(1, n + 1)],
        "text_hash": [f"h{items.platform}{i}" for i in range(1, n + 1)],
    }), path)
    return path


def make_export(tmp_path: Path, model: Recommender | None = None
                ) -> tuple[Path, Recommender, dict[str, ExportedItems]]:
    model = model or tiny_model()
    items = {p: exported_items(p, i) for i, p in enumerate(SIZES)}
    (tmp_path / "src").mkdir(exist_ok=True)
    catalogs = {p: write_catalog(tmp_path / "src" / f"{p}.parquet", it) for p, it in items.items()}
    meta = {"platforms": list(SIZES), "platforms_with_items": list(SIZES), "mode": "pretrain"}
    path = save_export(tmp_path / "export", model, model.state_dict(), meta, items, catalogs)
    return path, model, items


def scores(model: Recommender, items: ExportedItems, history: torch.Tensor) -> torch.Tensor:
    """Full-catalog scores (B, N+1) of histories on one platform, the serving computation."""
    table = model.item_table(torch.as_tensor(items.text_vecs), torch.as_tensor(items.brand_ids),
                             torch.as_tensor(items.category_ids), items.platform_id)
    pid = torch.full((len(history),), items.platform_id)
    return model.score(history, pid, table)


# -- save / load ----------------------------------------------------------------------------------


def test_round_trip_is_lossless(tmp_path: Path) -> None:
    path, model, items = make_export(tmp_path)
    assert not (tmp_path / "export.tmp").exists()
    assert sorted(p.name for p in path.iterdir()) == ["catalog", "export.json", "items",
                                                      "model.safetensors"]
    exp = load_export(path)
    assert exp.platforms == list(SIZES) and exp.meta.mode == "pretrain"
    assert exp.meta.format_version == FORMAT_VERSION and not exp.meta.has_encoder
    assert exp.model.config == model.config and not exp.model.training
    before, after = model.state_dict(), exp.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    history = torch.tensor([[0, 0, 3, 1, 7], [2, 4, 6, 8, 9]])
    for name, it in items.items():
        got = exp.items[name]
        assert got.item_ids == it.item_ids and got.platform_id == it.platform_id
        for field in ("brand_ids", "category_ids", "text_vecs"):
            assert np.array_equal(getattr(got, field), getattr(it, field)), field
        with torch.no_grad():
            assert torch.equal(scores(exp.model, got, history), scores(model, it, history))
        assert pq.read_table(path / "catalog" / f"{name}.parquet")["item_id"].to_pylist() \
            == it.item_ids


def test_saving_again_replaces_the_export(tmp_path: Path) -> None:
    path, _, _ = make_export(tmp_path)
    (path / "stale.txt").write_text("from an earlier export")
    make_export(tmp_path)
    assert not (path / "stale.txt").exists()
    assert json.loads((path / "export.json").read_text())["platforms"] == list(SIZES)


def test_a_fine_tuned_encoder_travels_with_the_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = TextEncoder(BertModel(BertConfig(hidden_size=H, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=24,
                                           vocab_size=50, max_position_embeddings=16)))
    path, model, _ = make_export(tmp_path, tiny_model(encoder=enc.eval()))
    assert (path / "encoder").is_dir()
    exp = load_export(path)
    assert exp.meta.has_encoder and exp.model.text_encoder is not None
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(exp.model.encode_items_text(ids, (ids != 0).long()),
                                   model.encode_items_text(ids, (ids != 0).long()))


def test_loading_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="export.json"):
        load_export(tmp_path)
    with pytest.raises(FileNotFoundError, match="export.json"):
        RecommenderPyfunc()._load(str(tmp_path))
    path, _, _ = make_export(tmp_path)
    meta = json.loads((path / "export.json").read_text())
    (path / "export.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_export(path)


def test_an_export_holds_no_pickle(tmp_path: Path) -> None:
    """A model file must not run code when it is loaded (issue 20): every file of an export is
    safetensors, JSON or Parquet."""
    path, _, _ = make_export(tmp_path)
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".parquet"}, suffixes


@pytest.mark.parametrize("attack", ["pickled_ids", "truncated_weights", "truncated_items",
                                    "rows_mismatch", "pickled_encoder"])
def test_a_tampered_export_is_refused_naming_the_file(tmp_path: Path, attack: str) -> None:
    """What a poisoned or broken registry version may hold: each is an ExportError naming the
    file, and nothing is unpickled on the way."""
    path, _, items = make_export(tmp_path)
    name = next(iter(items))
    if attack == "pickled_ids":  # an old-style .npz with an object array in place of the JSON
        np.savez(path / "items" / f"{name}.npz",
                 item_ids=np.asarray(items[name].item_ids, dtype=object))
        (path / "items" / f"{name}.json").unlink()
        target = f"{name}.json"
    elif attack in ("truncated_weights", "truncated_items"):
        f = (path / "model.safetensors" if attack == "truncated_weights"
             else path / "items" / f"{name}.safetensors")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        target = f.name
    elif attack == "rows_mismatch":
        ids = path / "items" / f"{name}.json"
        raw = json.loads(ids.read_text())
        ids.write_text(json.dumps({**raw, "item_ids": raw["item_ids"][:-1]}))
        target = f"{name}.safetensors"
    else:  # a fine-tuned encoder given as a pickle (pytorch_model.bin) instead of safetensors
        meta = json.loads((path / "export.json").read_text())
        (path / "export.json").write_text(json.dumps({**meta, "has_encoder": True}))
        (path / "encoder").mkdir()
        (path / "encoder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        torch.save({"evil": _Unsafe()}, path / "encoder" / "pytorch_model.bin")
        target = "encoder"
    with pytest.raises(ExportError, match=re.escape(target)):
        load_export(path)


def test_ddp_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    """The DDP checkpoint (model + optimizer state) is read with ``weights_only=True``."""
    from recsys.training.engine import consolidated_state_dict

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "ddp.pt")
    got = consolidated_state_dict(tmp_path)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    torch.save({"model": model.state_dict(), "evil": _Unsafe()}, tmp_path / "ddp.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        consolidated_state_dict(tmp_path)


class _Unsafe:
    """Any class outside torch's allow-list: ``weights_only`` refuses to build it."""


# -- the pyfunc -----------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Served:
    path, model, items = make_export(tmp_path)
    pyfunc = RecommenderPyfunc()
    pyfunc._load(str(path))
    return pyfunc, model, items


def test_predict_returns_the_top_k_of_the_platform(served: Served) -> None:
    pyfunc, model, items = served
    a, b = items["shop_a"], items["shop_b"]
    history = [a.item_ids[2], "never-seen-id", a.item_ids[0], a.item_ids[6]]  # oldest first
    df = pd.DataFrame({"platform": ["shop_a", "shop_b", "shop_a"],
                       "history": [history, [b.item_ids[4]], []],
                       "k": [5, 3, 4]})
    out = pyfunc.predict(None, df)
    assert len(out) == 3 and list(out.columns) == ["items", "scores"]
    for row, (platform, k) in enumerate([("shop_a", 5), ("shop_b", 3), ("shop_a", 4)]):
        got, s = out["items"][row], out["scores"][row]
        assert len(got) == len(set(got)) == len(s) == k
        assert set(got) <= set(items[platform].item_ids)
        assert s == sorted(s, reverse=True)
    # The same ranking as the model, the unknown id ignored: indices 3, 1, 7 on platform 0.
    with torch.no_grad():
        expected = scores(model, a, torch.tensor([[3, 1, 7]]))[0]
    top = torch.topk(expected, 5)
    assert out["items"][0] == [a.item_ids[i - 1] for i in top.indices.tolist()]
    np.testing.assert_allclose(out["scores"][0], top.values.numpy(), rtol=1e-5, atol=1e-6)
    without_unknown = pyfunc.predict(None, pd.DataFrame(
        {"platform": ["shop_a"], "history": [[h for h in history if h != "never-seen-id"]],
         "k": [5]}))
    assert without_unknown["items"][0] == out["items"][0]


def test_predict_rows_keep_their_order_and_k_defaults_to_ten(served: Served) -> None:
    pyfunc, _, items = served
    a, b = items["shop_a"].item_ids, items["shop_b"].item_ids
    rows = [("shop_b", [b[1], b[2]]), ("shop_a", [a[3]]), ("shop_b", [b[7]]), ("shop_a", [a[9]])]
    df = pd.DataFrame({"platform": [p for p, _ in rows], "history": [h for _, h in rows]},
                      index=[10, 3, 7, 1])  # a caller's index must not matter
    out = pyfunc.predict(None, df)
    for i, (platform, history) in enumerate(rows):
        alone = pyfunc.predict(None, pd.DataFrame({"platform": [platform],
                                                   "history": [history]}))
        assert out["items"][i] == alone["items"][0]
        assert len(out["items"][i]) == min(10, SIZES[platform])  # shop_b has only 9 items


def test_predict_keeps_the_most_recent_max_len_items(served: Served) -> None:
    pyfunc, _, items = served
    ids = items["shop_a"].item_ids
    long = [ids[i % 12] for i in range(3 * MAX_LEN)]
    out = pyfunc.predict(None, pd.DataFrame({"platform": ["shop_a", "shop_a"],
                                             "history": [long, long[-MAX_LEN:]], "k": [5, 5]}))
    assert out["items"][0] == out["items"][1]


def test_predict_names_an_unknown_platform(served: Served) -> None:
    pyfunc, _, _ = served
    with pytest.raises(KeyError, match="shop_zz"):
        pyfunc.predict(None, pd.DataFrame({"platform": ["shop_zz"], "history": [[]]}))


def test_predict_scores_a_merged_history_across_platforms(served: Served) -> None:
    """Issue 21: a user's history on other platforms (``history_platform``) is embedded with
    each item's own platform table, as serving and cross-platform training do."""
    pyfunc, model, items = served
    a, b = items["shop_a"], items["shop_b"]
    history = [b.item_ids[1], a.item_ids[2], b.item_ids[4], "gone", a.item_ids[0]]
    where = ["shop_b", "shop_a", "shop_b", "shop_b", "shop_a"]
    out = pyfunc.predict(None, pd.DataFrame({"platform": ["shop_a"], "history": [history],
                                             "history_platform": [where], "k": [5]}))
    with torch.no_grad():
        tables = {it.platform_id: pyfunc.tables[q] for q, it in items.items()}
        hp = torch.tensor([[b.platform_id, a.platform_id, b.platform_id, a.platform_id]])
        expected = model.score(torch.tensor([[2, 3, 5, 1]]), torch.tensor([a.platform_id]),
                               tables[a.platform_id], history_platforms=hp,
                               item_tables=tables)[0]
    top = torch.topk(expected, 5)
    assert out["items"][0] == [a.item_ids[i - 1] for i in top.indices.tolist()]
    own_only = pyfunc.predict(None, pd.DataFrame({"platform": ["shop_a"],
                                                  "history": [[a.item_ids[2], a.item_ids[0]]],
                                                  "k": [5]}))
    assert out["scores"][0] != pytest.approx(own_only["scores"][0])
    with pytest.raises(ValueError, match="history_platform has 1 entries for 5"):
        pyfunc.predict(None, pd.DataFrame({"platform": ["shop_a"], "history": [history],
                                           "history_platform": [["shop_a"]]}))
