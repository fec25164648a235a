"""Events -> per-user chronological item sequences -> leave-one-out examples. Pure functions.

Works on one bucket of one platform at a time (all of a user's events are in one bucket, see
``recsys.data.lake``), so Ray Data can run buckets in parallel with no shuffle. Cost is linear in
events: one sort, one vectorised catalog lookup, one pass over users.

Example rows (one schema for every split)::

    platform, user_id, split ("train" | "valid" | "test"), history: list<int32>, target: int32
    [, history_platform: list<string>]   (``cross_platform``: the platform of each history item)

Item indices are 1..N in the order of the platform's sorted catalog; 0 is padding. For a user
with chronological items s[0..n-1] (n >= min_seq_len): test = (s[:-1], s[-1]), valid =
(s[:-2], s[-2]), train = windows over s[:-2] (histories cut to the last ``max_seq_len`` items).
A training row (history, target) is a sequence: a model may train on every position of
``history + [target]`` with next-item targets (SASRec); long train sequences are cut into
windows that overlap by one item so that every transition is trained exactly once.

With ``cross_platform`` a history also holds the user's events on the other platforms (same
pseudonym), merged by time: see :mod:`recsys.data.crossplatform`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import model_validator

from recsys.config import StrictModel
from recsys.data.schema import EVENT_TYPES

EXAMPLES_SCHEMA = pa.schema([
    pa.field("platform", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("history", pa.list_(pa.int32()), nullable=False),
    pa.field("target", pa.int32(), nullable=False),
])

CROSS_EXAMPLES_SCHEMA = EXAMPLES_SCHEMA.append(
    pa.field("history_platform", pa.list_(pa.string()), nullable=False))
"""``cross_platform`` example sets: ``history_platform[i]`` is the platform of ``history[i]``
(an item index into *that* platform's catalog)."""

SPLITS = ("train", "valid", "test")


def examples_schema(cross_platform: bool) -> pa.Schema:
    """The schema of an example set's split files."""
    return CROSS_EXAMPLES_SCHEMA if cross_platform else EXAMPLES_SCHEMA


class SequenceConfig(StrictModel):
    """How events become training examples."""

    max_seq_len: int = 50
    """Most recent items kept in a history."""
    min_seq_len: int = 3
    """Users with fewer interactions cannot be split leave-one-out and are counted, not used."""
    event_types: list[str] | None = None
    """Event types that count as an interaction (None: all)."""
    collapse_repeats: bool = False
    """Merge consecutive events on the same item (a view->click->cart->purchase funnel)."""
    train_windows: bool = True
    """Cut long train sequences into windows so every transition is trained (else last only)."""
    cross_platform: bool = False
    """Histories also hold the user's events on the other platforms of the example set (same
    pseudonym), strictly earlier than the target, merged by time, each marked with its platform
    (``history_platform``). Targets and rows are the same as without it. Decided when the
    example set is built: training and evaluation follow the example set's manifest."""

    @model_validator(mode="after")
    def _check(self) -> SequenceConfig:
        if self.event_types is not None:
            unknown = sorted(set(self.event_types) - set(EVENT_TYPES))
            if unknown:
                raise ValueError(f"sequences.event_types: unknown {unknown}; known {EVENT_TYPES}")
        if self.min_seq_len < 3:
            raise ValueError("sequences.min_seq_len must be >= 3 (train, valid and test item)")
        if self.max_seq_len < 1:
            raise ValueError("sequences.max_seq_len must be >= 1")
        return self


@dataclass
class BucketStats:
    events_in: int = 0
    events_used: int = 0
    events_other_type: int = 0
    repeats_collapsed: int = 0
    events_unknown_item: int = 0
    users: int = 0
    users_too_short: int = 0

    def as_counter(self) -> Counter[str]:
        return Counter(self.__dict__)


def item_index(catalog_item_ids: pa.Array) -> pa.Array:
    """The catalog's item ids in index order (position i -> item index i + 1)."""
    return pc.unique(catalog_item_ids).sort()


@dataclass
class UserSequences:
    """One platform bucket's interactions as per-user chronological runs: user ``k`` is
    ``items[starts[k]:ends[k]]`` (item indices 1..N, oldest first) at ``times`` (UTC us)."""

    items: np.ndarray  # (E,) int32
    times: np.ndarray  # (E,) int64
    starts: np.ndarray  # (U,) int64
    ends: np.ndarray  # (U,) int64
    users: np.ndarray  # (U,) object: user id of each run
    stats: BucketStats

    def by_user(self) -> dict[str, int]:
        """User id -> run number."""
        return {u: k for k, u in enumerate(self.users.tolist())}


def user_sequences(events: pa.Table, catalog: pa.Array, cfg: SequenceConfig) -> UserSequences:
    """Filter, sort and index one bucket's events (the shared first half of every builder).
    ``catalog`` is :func:`item_index` of the platform."""
    stats = BucketStats(events_in=events.num_rows)
    if cfg.event_types is not None:
        keep = pc.is_in(events["event_type"], pa.array(cfg.event_types))
        stats.events_other_type = events.num_rows - pc.sum(keep).as_py() if events.num_rows else 0
        events = events.filter(keep)
    events = events.sort_by([("user_id", "ascending"), ("timestamp", "ascending"),
                             ("event_index", "ascending")])
    idx = pc.index_in(events["item_id"], value_set=catalog)
    known = pc.is_valid(idx)
    stats.events_unknown_item = events.num_rows - pc.sum(known).as_py() if events.num_rows else 0
    if stats.events_unknown_item:
        events, idx = events.filter(known), idx.filter(known)

    items = (idx.to_numpy(zero_copy_only=False).astype(np.int32) + 1) if len(idx) else \
        np.zeros(0, np.int32)
    times = events["timestamp"].cast(pa.int64()).to_numpy(zero_copy_only=False) if len(idx) \
        else np.zeros(0, np.int64)
    users = events["user_id"].combine_chunks().dictionary_encode()
    ucodes = users.indices.to_numpy(zero_copy_only=False)
    if cfg.collapse_repeats and len(items):
        same = np.zeros(len(items), bool)
        same[1:] = (items[1:] == items[:-1]) & (ucodes[1:] == ucodes[:-1])
        stats.repeats_collapsed = int(same.sum())
        items, times, ucodes = items[~same], times[~same], ucodes[~same]
    stats.events_used = len(items)

    # Users are contiguous after the sort: starts/ends of each run.
    if len(ucodes):
        change = np.flatnonzero(np.diff(ucodes)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(ucodes)]])
    else:
        starts = ends = np.zeros(0, np.int64)
    stats.users = len(starts)
    names = users.dictionary.to_numpy(zero_copy_only=False)
    run_users = names[ucodes[starts]] if len(starts) else np.zeros(0, object)
    return UserSequences(items, times, starts, ends, run_users, stats)


def build_examples(
    events: pa.Table, catalog: pa.Array, cfg: SequenceConfig, platform: str
) -> tuple[pa.Table, BucketStats]:
    """Examples of one platform bucket. ``catalog`` is :func:`item_index` of the platform."""
    seqs = user_sequences(events, catalog, cfg)
    stats, items = seqs.stats, seqs.items
    L = cfg.max_seq_len
    take: list[np.ndarray] = []          # indices into `items` of each history
    targets: list[int] = []
    row_user: list[int] = []
    row_split: list[str] = []
    for k, (s, e) in enumerate(zip(seqs.starts.tolist(), seqs.ends.tolist())):
        if e - s < cfg.min_seq_len:
            stats.users_too_short += 1
            continue
        for split, t in (("test", e - 1), ("valid", e - 2)):
            take.append(np.arange(max(s, t - L), t))
            targets.append(t)
            row_user.append(k)
            row_split.append(split)
        # train: windows of <= L+1 items ending at e-3, stepping back by L (overlap of one item)
        end = e - 3  # position of the last train target
        while end - s >= 1:
            start = max(s, end - L)
            take.append(np.arange(start, end))
            targets.append(end)
            row_user.append(k)
            row_split.append("train")
            if not cfg.train_windows:
                break
            end = start

    if not take:
        return EXAMPLES_SCHEMA.empty_table(), stats
    lengths = np.fromiter((len(t) for t in take), dtype=np.int32, count=len(take))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = items[np.concatenate(take)]
    table = pa.Table.from_arrays(
        [
            pa.array(np.full(len(take), platform, dtype=object), pa.string()),
            pa.array(seqs.users[np.asarray(row_user)], pa.string()),
            pa.array(row_split, pa.string()),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
            pa.array(items[np.asarray(targets)], pa.int32()),
        ],
        schema=EXAMPLES_SCHEMA,
    )
    return table, stats
