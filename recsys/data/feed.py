"""Examples -> Ray Train workers: datasets for ``TorchTrainer(datasets=...)`` and the collate.

Ray Train hands each worker its shard with ``ray.train.get_dataset_shard(name)``: the train split
is a ``streaming_split`` (one split coordinator actor feeds all workers); the validation split is
not split by Ray (:data:`SPLIT_DATASETS`), every worker reads it whole from the object store and
keeps its part of the users (:func:`user_part`), which saves a coordinator process per run.
:func:`iter_batches` turns a shard into padded tensors.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recsys.data.examples import ExampleSet

Temperature = float | Literal["uniform"]

SPLIT_DATASETS = ("train",)
"""Datasets Ray Train splits across workers (``DataConfig(datasets_to_split=...)``)."""



def user_part(user_ids: Any, rank: int, world: int) -> np.ndarray:
    """Rows of this rank's users: crc32(user id) % world == rank. Order-independent, so every
    worker reading the same split whole gets a disjoint part and together they cover it."""
    if world <= 1:
        return np.ones(len(user_ids), bool)
    return np.fromiter((zlib.crc32(str(u).encode()) % world == rank for u in user_ids),
                       bool, count=len(user_ids))


def example_datasets(example_set: ExampleSet, splits: tuple[str, ...] = ("train", "valid"),
                     platforms: list[str] | None = None) -> dict[str, Any]:
    """One Ray Dataset per split, optionally restricted to some platforms."""
    import ray

    out = {}
    for split in splits:
        ds = ray.data.read_parquet(str(example_set.split_path(split)))
        if platforms is not None:
            ds = ds.map_batches(_keep_platforms, batch_format="pyarrow",
                                fn_kwargs={"platforms": list(platforms)})
        out[split] = ds
    return out


def _keep_platforms(table: pa.Table, platforms: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["platform"], pa.array(platforms, pa.string())))


def collate(batch: dict[str, np.ndarray], max_len: int,
            platform_ids: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Left-pad histories (0 = padding) so the newest item is always last.

    Returns ``history`` (B, T) int64 with T = min(max_len, longest history of the batch),
    ``target`` (B,) int64, ``length`` (B,) int64 and,
    given ``platform_ids``, ``platform`` (B,) int64 (the model's platform index) and, for a
    cross-platform example set, ``history_platform`` (B, T) int64: the model's platform index
    of each history item (the row's own on padding); where rows carry ``shown`` (logs with
    impressions), ``shown`` (B, T) int64: the shown-not-chosen item before each label
    (``history[:, 1:]`` then the target), 0 for none and on padding.
    """
    histories = batch["history"]
    n = len(histories)
    # Cut to the longest history of the batch: positions count from the newest item, so a
    # shorter window changes no state, and short-sequence data stops paying for max_len.
    max_len = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for i, h in enumerate(histories):
        h = np.asarray(h)[-max_len:]
        lengths[i] = len(h)
        if len(h):
            out[i, max_len - len(h):] = h
    result = {"history": torch.from_numpy(out)}
    if "shown" in batch:
        shown = np.zeros((n, max_len), dtype=np.int64)
        for i, neg in enumerate(batch["shown"]):
            if lengths[i]:
                shown[i, max_len - lengths[i]:] = np.asarray(neg)[-max_len:]
        result["shown"] = torch.from_numpy(shown)
    result |= {
        "target": torch.as_tensor(np.asarray(batch["target"], dtype=np.int64)),
        "length": torch.from_numpy(lengths),
    }
    if platform_ids is not None:
        pids = _platform_ids(batch["platform"], platform_ids)
        result["platform"] = torch.as_tensor(pids, dtype=torch.int64)
        if "history_platform" in batch:
            hp = np.repeat(pids[:, None], max_len, axis=1)  # (B, T) padding: the row's own
            for i, names in enumerate(batch["history_platform"]):
                if lengths[i]:
                    hp[i, max_len - lengths[i]:] = _platform_ids(
                        np.asarray(names)[-max_len:], platform_ids)
            result["history_platform"] = torch.from_numpy(hp)
    return result


def _platform_ids(names: Any, platform_ids: dict[str, int]) -> np.ndarray:
    """Model platform ids of platform names (each distinct name looked up once)."""
    uniq, inverse = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
    try:
        ids = np.array([platform_ids[u] for u in uniq.tolist()], dtype=np.int64)
    except KeyError as exc:
        raise KeyError(f"platform {exc.args[0]!r} is not one of the model's platforms "
                       f"{sorted(platform_ids)}") from None
    return ids[inverse.reshape(-1)] if len(uniq) else np.zeros(0, np.int64)


def iter_batches(shard: Any, batch_size: int, max_len: int, *, shuffle_buffer: int = 0,
                 seed: int | None = None, platform_ids: dict[str, int] | None = None,
                 device: torch.device | None = None, part: tuple[int, int] | None = None,
                 length_buckets: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches from a worker's shard, with an optional seeded local shuffle; ``part`` =
    (rank, world): only this rank's users of a dataset every worker reads whole.

    ``length_buckets`` > 1: read that many batches' worth of rows at a time, order them by
    history length, cut them into batches and yield those in a seeded random order. A batch is
    padded to its longest history, so a random batch of short-history users (Scientific: 6
    items on average, up to 50) is mostly padding, and the user tower's cost is per padded
    position; batches of similar lengths cut it several-fold. Two shards of equal size still
    give the same number of batches (each full read gives exactly ``length_buckets``), which
    DDP needs.
    """
    kwargs: dict[str, Any] = {}
    if shuffle_buffer:
        kwargs.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)
    rng = np.random.default_rng(seed)
    read = batch_size * max(1, length_buckets)
    for rows in shard.iter_batches(batch_size=read, batch_format="numpy", **kwargs):
        if part is not None and part[1] > 1:
            keep = user_part(rows["user_id"], *part)
            if not keep.any():
                continue
            rows = {k: v[keep] for k, v in rows.items()}
        for idx in length_batches(rows["history"], batch_size, length_buckets, rng):
            out = collate(rows if idx is None else {k: v[idx] for k, v in rows.items()},
                          max_len, platform_ids)
            yield out if device is None else {k: v.to(device) for k, v in out.items()}


def length_batches(histories: Any, batch_size: int, buckets: int,
                    rng: np.random.Generator) -> list[np.ndarray | None]:
    """Row indices of each batch of one read (None: the whole read is one batch)."""
    n = len(histories)
    if buckets <= 1 or n <= batch_size:
        return [None] if buckets <= 1 else [np.arange(n)]
    lengths = np.fromiter((len(h) for h in histories), np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng.shuffle(batches)  # long and short batches interleaved, not a curriculum
    return batches


# -- temperature sampling of platforms ---------------------------------------------------------


def platform_shares(rows: Mapping[str, int], temperature: Temperature) -> dict[str, float]:
    """Share of each platform in a pooled epoch: ``n_p ** (1 / T)`` normalised, where ``n_p``
    is the platform's training rows. T = 1: proportional to size (plain pooling); larger T
    flattens it; ``"uniform"`` (T -> infinity): every platform alike. A platform without rows
    gets none."""
    if temperature != "uniform" and (not isinstance(temperature, (int, float))
                                     or temperature < 1):
        raise ValueError(f"temperature must be >= 1 or 'uniform', got {temperature!r}")
    weight = {p: (0.0 if n <= 0 else 1.0 if temperature == "uniform"
                  else float(n) ** (1.0 / float(temperature))) for p, n in rows.items()}
    total = sum(weight.values())
    if total <= 0:
        raise ValueError(f"no training rows to sample from: {dict(rows)}")
    return {p: w / total for p, w in weight.items()}


def platform_rates(rows: Mapping[str, int], temperature: Temperature) -> dict[str, float]:
    """Expected copies of each training row of platform p in an epoch, ``q_p * N / n_p``: the
    epoch keeps its size N (all rows) and platform p fills share ``q_p`` of it
    (:func:`platform_shares`); < 1 subsamples a large platform, > 1 repeats a small one."""
    shares = platform_shares(rows, temperature)
    total = sum(rows.values())
    return {p: (shares[p] * total / n if n > 0 else 0.0) for p, n in rows.items()}


def sample_platforms(table: pa.Table, rates: Mapping[str, float], seed: int) -> pa.Table:
    """Ray Data batch function: each row of platform p taken ``floor(r_p)`` times and once more
    with probability ``frac(r_p)`` (``rates``: :func:`platform_rates`). The draw is a seeded
    hash of the row (platform, user, split, target, history length), so it is the same at any
    batch size, block split or worker count."""
    if table.num_rows == 0:
        return table
    platforms = table["platform"].to_pylist()
    keys = zip(platforms, table["user_id"].to_pylist(), table["split"].to_pylist(),
               table["target"].to_pylist(),
               pc.list_value_length(table["history"]).to_pylist())
    copies = np.empty(table.num_rows, np.int64)
    for i, key in enumerate(keys):
        rate = rates.get(key[0], 1.0)
        h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2**64
        copies[i] = int(rate) + (u < rate - int(rate))
    return table.take(pa.array(np.repeat(np.arange(table.num_rows), copies)))
