"""Driver-side preparation of what every worker needs about items, computed once per run.

Per platform: text vectors of the frozen encoder (from the cache: each distinct text encoded
once, ever), brand/category ids, token ids when the encoder is fine-tuned, and training
popularity (negative sampling, logQ correction, the cold-start subset). Shipped to workers
through the object store, so it works the same on one machine and on a cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.examples import ExampleSet, read_split
from recsys.model.encoder_cache import TextVectorCache, encode_device
from recsys.model.features import FeatureVocab, ItemFeatures, load_item_features, load_token_ids


@dataclass
class PlatformItems:
    """Everything about one platform's catalog a training step or an evaluation needs."""

    name: str
    platform_id: int
    brand_ids: np.ndarray  # (N+1,) int64, row 0 = padding
    category_ids: np.ndarray  # (N+1, C) int64
    text_vecs: np.ndarray | None  # (N+1, H) float32 frozen-encoder vectors, row 0 zeros
    token_ids: list[np.ndarray] | None  # N+1 token id arrays (fine-tuning), [0] empty
    popularity: np.ndarray  # (N+1,) float64 training counts (targets and histories)

    @property
    def num_items(self) -> int:
        return len(self.brand_ids) - 1


@dataclass
class ItemInputs:
    platforms: list[str]  # index = platform id of the model
    vocab: FeatureVocab
    items: dict[str, PlatformItems] = field(default_factory=dict)
    cache_stats: dict[str, int] = field(default_factory=dict)
    train_rows: dict[str, int] = field(default_factory=dict)
    """Training rows of each platform (after the user subsample)."""


def keep_user(user_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Seeded, order-independent user subsample: the same users at any scale or shard."""
    if fraction >= 1:
        return np.ones(len(user_ids), bool)
    cut = int(fraction * 2**32)
    out = np.empty(len(user_ids), bool)
    for i, u in enumerate(user_ids):
        h = hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=4).digest()
        out[i] = int.from_bytes(h, "little") < cut
    return out


def training_popularity(train: pa.Table, platform: str, num_items: int,
                        user_fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """Counts of each item in a platform's training rows (targets and histories); ``train`` is
    the whole train split, read once by the caller for all platforms. In a cross-platform
    example set only the history positions of this platform count (the others are indices into
    other catalogs, and their events are counted in their own platform's rows)."""
    train = train.filter(pc.equal(train["platform"], platform))
    if user_fraction < 1:
        train = train.filter(keep_user(train["user_id"].to_pylist(), user_fraction, seed))
    history = pc.list_flatten(train["history"]).to_numpy()
    if "history_platform" in train.column_names and len(history):
        own = pc.list_flatten(train["history_platform"]).to_numpy(zero_copy_only=False)
        history = history[own == platform]
    counts = np.zeros(num_items + 1, np.float64)
    for arr in (train["target"].to_numpy(), history):
        np.add.at(counts, arr, 1)
    return counts


def train_rows(train: pa.Table, platforms: list[str], user_fraction: float = 1.0,
               seed: int = 0) -> dict[str, int]:
    """Training rows per platform (after the seeded user subsample): what temperature sampling
    weighs (``recsys.data.feed.platform_shares``)."""
    out = {}
    for name in platforms:
        rows = train.filter(pc.equal(train["platform"], name))
        if user_fraction < 1:
            rows = rows.filter(keep_user(rows["user_id"].to_pylist(), user_fraction, seed))
        out[name] = rows.num_rows
    return out


def prepare_item_inputs(example_set: ExampleSet, platforms: list[str],
                        platform_ids: dict[str, int], *, encoder: str, max_tokens: int,
                        cache_dir: str | Path, with_vectors: bool = True,
                        with_tokens: bool = False, vocab: FeatureVocab | None = None,
                        user_fraction: float = 1.0, seed: int = 0) -> ItemInputs:
    """Build the per-platform item inputs; frozen vectors come from (and fill) the cache.

    ``platform_ids``: each platform's index in the model (a transfer model keeps the pretrain
    platforms' ids and appends new ones).
    """
    vocab, feats = load_item_features(example_set.path, platforms, vocab)
    tokens = load_token_ids(example_set.path)
    out = ItemInputs(platforms=list(platforms), vocab=vocab)
    train = read_split(example_set, "train")
    cache = (TextVectorCache(Path(cache_dir), encoder, max_tokens, device=encode_device())
             if with_vectors else None)
    for name in platforms:
        f: ItemFeatures = feats[name]
        vecs = cache.item_vectors(f, tokens) if cache is not None else None
        toks = None
        if with_tokens:
            toks = [np.zeros(0, np.int32)] + [tokens[h] for h in f.text_hash]
        out.items[name] = PlatformItems(
            name=name, platform_id=platform_ids[name], brand_ids=f.brand_ids,
            category_ids=f.category_ids,
            text_vecs=vecs, token_ids=toks,
            popularity=training_popularity(train, name, len(f.item_ids), user_fraction,
                                           seed),
        )
    if cache is not None:
        out.cache_stats = {"hits": cache.hits, "misses": cache.misses}
    out.train_rows = train_rows(train, list(platforms), user_fraction, seed)
    return out
