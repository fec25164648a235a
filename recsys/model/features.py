"""Item side features of an example set: brand and category ids, text hashes, token batches.

One vocabulary for all platforms (a brand sold on two shops is one id), so brand and category
embeddings transfer with the text. Ids are deterministic: values sorted on first build, new values
appended in sorted order by ``extend``, so a vocabulary saved with a model keeps meaning the same
rows. Id 0 is "unknown / none" everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

CATEGORY_SEP = " > "
CATALOG_COLUMNS = ["item_idx", "item_id", "brand", "category", "text", "text_hash"]


def normalise(value: str | None) -> str:
    """Key of a brand or category level: case and whitespace do not split a brand in two."""
    return " ".join(value.split()).casefold() if value else ""


def category_prefixes(path: list[str] | None, depth: int) -> list[str]:
    """["a", "b", "c"] -> ["a", "a > b", "a > b > c"]: the first ``depth`` levels (empty ones
    dropped), so items share coarse categories even where their leaves differ."""
    levels = [n for n in (normalise(v) for v in (path or [])) if n][:depth]
    return [CATEGORY_SEP.join(levels[: i + 1]) for i in range(len(levels))]


@dataclass
class FeatureVocab:
    """Brand and category-prefix ids shared by every platform; 0 = unknown / none.

    ``frozen``: the model's tables cannot grow (serving, or evaluating without fine-tuning), so
    ``extend`` is refused and unseen values map to 0.
    """

    brands: dict[str, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    max_depth: int = 3
    frozen: bool = False

    @property
    def num_brands(self) -> int:
        """Rows of the brand table (id 0 included)."""
        return max(self.brands.values(), default=0) + 1

    @property
    def num_categories(self) -> int:
        return max(self.categories.values(), default=0) + 1

    @classmethod
    def build(cls, catalogs: Iterable[pa.Table], max_depth: int = 3) -> FeatureVocab:
        return cls(max_depth=max_depth).extend(catalogs)

    def extend(self, catalogs: Iterable[pa.Table]) -> FeatureVocab:
        """A new vocabulary with the unseen brands/categories of ``catalogs`` appended (sorted);
        existing ids are unchanged. Used when transferring to a new platform."""
        if self.frozen:
            raise ValueError("FeatureVocab is frozen: unseen values map to 0 and cannot be added "
                             "(use an unfrozen copy, then Recommender.resize_features)")
        brands, categories = set(), set()
        for cat in catalogs:
            brands.update(normalise(b) for b in cat["brand"].to_pylist())
            for path in cat["category"].to_pylist():
                categories.update(category_prefixes(path, self.max_depth))
        return replace(self, brands=_append(self.brands, brands),
                       categories=_append(self.categories, categories))

    def freeze(self) -> FeatureVocab:
        return replace(self, frozen=True)

    def brand_id(self, brand: str | None) -> int:
        return self.brands.get(normalise(brand), 0)

    def category_ids(self, path: list[str] | None) -> list[int]:
        """Ids of the path's prefixes, zero-padded to ``max_depth`` (unknown prefixes -> 0)."""
        ids = [self.categories.get(p, 0) for p in category_prefixes(path, self.max_depth)]
        return ids + [0] * (self.max_depth - len(ids))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; saved beside a model checkpoint."""
        return {"brands": self.brands, "categories": self.categories,
                "max_depth": self.max_depth, "frozen": self.frozen}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureVocab:
        return cls(brands={str(k): int(v) for k, v in d["brands"].items()},
                   categories={str(k): int(v) for k, v in d["categories"].items()},
                   max_depth=int(d["max_depth"]), frozen=bool(d["frozen"]))


def _append(ids: dict[str, int], values: set[str]) -> dict[str, int]:
    new = sorted(values - set(ids) - {""})
    start = max(ids.values(), default=0) + 1
    return {**ids, **{v: start + i for i, v in enumerate(new)}}


@dataclass
class ItemFeatures:
    """Features of one platform's catalog, indexed by item index (row 0 = padding)."""

    platform: str
    item_ids: list[str]          # item_ids[i] is item index i + 1
    text_hash: list[str]         # as item_ids
    text: list[str]              # as item_ids; used when the example set has no token ids
    brand_ids: np.ndarray        # (N+1,) int64
    category_ids: np.ndarray     # (N+1, C) int64

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(brand_ids (N+1,), category_ids (N+1, C)) as long tensors, for ``item_table``."""
        return (torch.from_numpy(self.brand_ids).to(device),
                torch.from_numpy(self.category_ids).to(device))


def item_features(platform: str, catalog: pa.Table, vocab: FeatureVocab) -> ItemFeatures:
    """Features of one catalog table (``EXAMPLES/catalog/<platform>.parquet``)."""
    idx = catalog["item_idx"].to_numpy()
    if not np.array_equal(idx, np.arange(1, len(idx) + 1)):
        raise ValueError(f"catalog of {platform!r}: item_idx is not 1..N in row order "
                         "(rebuild the example set with `recsys pipeline`)")
    n = catalog.num_rows
    brand_ids = np.zeros(n + 1, np.int64)
    brand_ids[1:] = [vocab.brand_id(b) for b in catalog["brand"].to_pylist()]
    category_ids = np.zeros((n + 1, vocab.max_depth), np.int64)
    if n:
        category_ids[1:] = [vocab.category_ids(p) for p in catalog["category"].to_pylist()]
    return ItemFeatures(
        platform=platform,
        item_ids=catalog["item_id"].to_pylist(),
        text_hash=catalog["text_hash"].to_pylist(),
        text=catalog["text"].to_pylist(),
        brand_ids=brand_ids,
        category_ids=category_ids,
    )


def load_item_features(
    example_dir: str | Path, platforms: list[str], vocab: FeatureVocab | None = None
) -> tuple[FeatureVocab, dict[str, ItemFeatures]]:
    """Read ``catalog/<platform>.parquet`` of an example set.

    ``vocab`` None: built from these catalogs (pretraining). Unfrozen: extended with their unseen
    values (transfer; then ``Recommender.resize_features``). Frozen: used as is, unseen -> 0.
    """
    catalogs = {}
    for p in platforms:
        path = Path(example_dir) / "catalog" / f"{p}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {p!r} in the example set "
                                    f"{example_dir}? (see its manifest.json)")
        catalogs[p] = pq.read_table(path, columns=CATALOG_COLUMNS)
    if vocab is None:
        vocab = FeatureVocab.build(catalogs.values())
    elif not vocab.frozen:
        vocab = vocab.extend(catalogs.values())
    return vocab, {p: item_features(p, c, vocab) for p, c in catalogs.items()}


def load_token_ids(example_dir: str | Path) -> dict[str, np.ndarray]:
    """``tokens.parquet`` of an example set: text_hash -> token ids (int32), or {} if absent
    (an example set built with ``tokenize: false``)."""
    path = Path(example_dir) / "tokens.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    ids = table["token_ids"].combine_chunks()
    values = ids.values.to_numpy()
    offsets = ids.offsets.to_numpy()
    return {h: values[offsets[i]:offsets[i + 1]]
            for i, h in enumerate(table["text_hash"].to_pylist())}


def token_batch(token_ids: list[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences to the longest: (input_ids (N, T), attention_mask (N, T))."""
    T = max((len(t) for t in token_ids), default=0)
    input_ids = torch.full((len(token_ids), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), T), dtype=torch.long)
    for i, t in enumerate(token_ids):
        input_ids[i, : len(t)] = torch.as_tensor(np.asarray(t, dtype=np.int64))
        attention_mask[i, : len(t)] = 1
    return input_ids, attention_mask
