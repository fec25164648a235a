"""A tiny but real served world: a model export and a lake with known users, built in a second.

For the serving tests and the docs: every file is written by the real code paths
(``save_export``, ``write_platform``), only the model is untrained (seeded random weights) and the
item texts are encoded by whatever small encoder the caller passes (tests use a tiny random BERT),
so nothing here needs Ray, a GPU or a training run. Shape of the world:

* ``shop_a`` (12 items) and ``shop_b`` (9 items), both in the model; shop_b's items are exported
  without brand/category ids, so a search for an item's exact text finds it with cosine 1;
* raw users ``alice`` (history and purchases on shop_a), ``bob`` (only shop_b),
  ``dave`` (both) and ``erin`` (only ``shop_z``, a lake platform the model does not know).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.catalog import load_tokenizer
from recsys.data.lake import write_platform
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENTS_SCHEMA, ITEMS_SCHEMA
from recsys.model.export import ExportedItems, save_export
from recsys.model.features import FeatureVocab
from recsys.model.recommender import Recommender, load_text_encoder

PLATFORMS = {"shop_a": 12, "shop_b": 9}
THIRD_PLATFORM = {"shop_c": 7}  # ``build_toy_world(..., third_platform=True)``: three shops
MAX_LEN = 6
ADJECTIVES = ["red", "steel", "wooden", "silk", "smart", "tiny", "golden", "soft", "fast"]
NOUNS = ["shirt", "knife", "chair", "scarf", "watch", "lamp", "ring", "pillow", "kettle",
         "phone", "table", "mug"]
BRANDS = ["acme", "globex", "initech"]
CATEGORIES = [["home", "kitchen"], ["home", "decor"], ["fashion", "accessories"]]

# Raw user id -> {platform: [(item number, event type), ...]} in time order.
USERS: dict[str, dict[str, list[tuple[int, str]]]] = {
    "alice": {"shop_a": [(1, "view"), (1, "click"), (1, "purchase"), (4, "view"),
                         (7, "view"), (7, "cart"), (7, "purchase"), (2, "view")]},
    "bob": {"shop_b": [(3, "view"), (5, "view"), (5, "purchase"), (8, "view")]},
    "dave": {"shop_a": [(9, "view"), (10, "purchase")], "shop_b": [(1, "view")]},
    "erin": {"shop_z": [(1, "view"), (2, "view")]},
}
# Extra anonymous traffic that makes popularity unambiguous: item 3 of each shop is the most
# popular, then item 6.
CROWD = {"shop_a": [3] * 6 + [6] * 4, "shop_b": [3] * 6 + [6] * 4, "shop_c": [3] * 6 + [6] * 4,
         "shop_z": [1]}


@dataclass
class ToyWorld:
    export: Path
    lake: Path
    pseudonymizer: Pseudonymizer

    @staticmethod
    def item_id(platform: str, n: int) -> str:
        return f"{platform}-{n:03d}"


def item_title(platform: str, n: int) -> str:
    offset = 0 if platform == "shop_a" else 4
    return f"{ADJECTIVES[(n + offset) % len(ADJECTIVES)]} {NOUNS[n % len(NOUNS)]} {n}"


def _catalog_rows(platform: str, n_items: int) -> list[dict]:
    rows = []
    for n in range(1, n_items + 1):
        rows.append({"platform": platform, "item_id": ToyWorld.item_id(platform, n),
                     "title": item_title(platform, n), "description": None,
                     "brand": BRANDS[n % len(BRANDS)],
                     "category": CATEGORIES[n % len(CATEGORIES)], "price": float(n)})
    return rows


@torch.inference_mode()
def _encode(texts: list[str], encoder: str, max_tokens: int) -> np.ndarray:
    tok = load_tokenizer(encoder)
    enc = load_text_encoder(encoder).eval()
    batch = tok(texts, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    return enc(batch["input_ids"], batch["attention_mask"]).float().numpy()


def build_toy_world(root: str | Path, encoder: str, pseudonymizer: Pseudonymizer,
                    seed: int = 0, max_tokens: int = 32,
                    third_platform: bool = False) -> ToyWorld:
    """Write ``root/export`` (model seeded by ``seed``) and ``root/lake``; returns their paths.
    ``third_platform``: the model and the lake have ``shop_c`` too (7 items, crowd traffic
    only), for serving one model per platform."""
    root = Path(root)
    platforms = {**PLATFORMS, **(THIRD_PLATFORM if third_platform else {})}
    catalogs = {p: _catalog_rows(p, n) for p, n in platforms.items()}
    vocab = FeatureVocab.build([pa.Table.from_pylist(rows) for rows in catalogs.values()])
    text_dim = None
    items: dict[str, ExportedItems] = {}
    catalog_files: dict[str, Path] = {}
    (root / "src").mkdir(parents=True, exist_ok=True)
    for pid, (platform, rows) in enumerate(catalogs.items()):
        texts = [r["title"] for r in rows]  # the query a search for the item would send
        vecs = _encode(texts, encoder, max_tokens)
        text_dim = vecs.shape[1]
        n = len(rows)
        brands = np.zeros(n + 1, np.int64)
        cats = np.zeros((n + 1, vocab.max_depth), np.int64)
        if platform == "shop_a":  # shop_b keeps 0 (unknown): its item vectors are pure text
            brands[1:] = [vocab.brand_id(r["brand"]) for r in rows]
            cats[1:] = [vocab.category_ids(r["category"]) for r in rows]
        items[platform] = ExportedItems(
            platform=platform, platform_id=pid, item_ids=[r["item_id"] for r in rows],
            brand_ids=brands, category_ids=cats,
            text_vecs=np.concatenate([np.zeros((1, text_dim), np.float32), vecs]))
        catalog_files[platform] = root / "src" / f"{platform}.parquet"
        pq.write_table(pa.table({
            "item_idx": pa.array(np.arange(1, n + 1, dtype=np.int32)),
            "item_id": [r["item_id"] for r in rows], "title": texts,
            "brand": [r["brand"] for r in rows],
            "category": pa.array([r["category"] for r in rows], pa.list_(pa.string())),
            "price": [r["price"] for r in rows], "text": texts,
            "text_hash": [f"{platform}{i}" for i in range(n)]}), catalog_files[platform])
    torch.manual_seed(seed)
    model = Recommender(text_dim=int(text_dim), dim=16, num_platforms=len(platforms),
                        num_brands=vocab.num_brands, num_categories=vocab.num_categories,
                        max_len=MAX_LEN, num_layers=1, num_heads=2, dropout=0.1, num_experts=2)
    with torch.no_grad():  # untrained gates are uniform and platform tables zero: move them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"platforms": list(platforms), "platforms_with_items": list(platforms),
            "vocab": vocab.to_dict(), "encoder": encoder, "max_tokens": max_tokens,
            "mode": "toy", "seed": seed}
    export = save_export(root / "export", model.eval(), model.state_dict(), meta, items,
                         catalog_files)
    return ToyWorld(export=export, lake=_write_lake(root / "lake", pseudonymizer, platforms),
                    pseudonymizer=pseudonymizer)


def _write_lake(lake: Path, pseudonymizer: Pseudonymizer, platforms: dict[str, int]) -> Path:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    events: dict[str, list[dict]] = {}
    step = 0
    for raw, per_platform in USERS.items():
        for platform, seq in per_platform.items():
            for n, kind in seq:
                step += 1
                events.setdefault(platform, []).append(
                    {"platform": platform, "user_id": pseudonymizer.one(raw),
                     "item_id": ToyWorld.item_id(platform, n), "event_type": kind,
                     "timestamp": t0 + timedelta(minutes=step), "quantity": None,
                     "price": None, "session_id": None, "event_index": step})
    for platform, ns in CROWD.items():
        if platform not in platforms and platform != "shop_z":
            continue
        for j, n in enumerate(ns):
            step += 1
            events.setdefault(platform, []).append(
                {"platform": platform, "user_id": pseudonymizer.one(f"crowd-{j}"),
                 "item_id": ToyWorld.item_id(platform, n), "event_type": "view",
                 "timestamp": t0 + timedelta(minutes=step), "quantity": None, "price": None,
                 "session_id": None, "event_index": step})
    sizes = {**platforms, "shop_z": 3}
    for platform, rows in events.items():
        items = pa.Table.from_pylist(_catalog_rows(platform, sizes[platform]),
                                     schema=ITEMS_SCHEMA)
        empty_q = pa.table({"_reason": pa.array([], pa.string())})
        write_platform(lake, platform, pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA), items,
                       empty_q, empty_q, {"source": "toy", "pseudonym_key_fingerprint":
                                         pseudonymizer.fingerprint}, num_buckets=1)
    return lake
