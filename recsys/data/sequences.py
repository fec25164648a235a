"""Events -> per-user chronological item sequences -> leave-one-out examples. Pure functions.

Works on one bucket of one platform at a time (all of a user's events are in one bucket, see
``recsys.data.lake``), so Ray Data can run buckets in parallel with no shuffle. Cost is linear in
events: one sort, one vectorised catalog lookup, one pass over users.

Example rows (one schema for every split)::

    platform, user_id, split ("train" | "valid" | "test"), history: list<int32>, target: int32
    [, history_platform: list<string>]   (``cross_platform``: the platform of each history item)
    [, shown: list<int32>]   (logs with impressions: per label, an item shown and not chosen)

Item indices are 1..N in the order of the platform's sorted catalog; 0 is padding. For a user
with chronological items s[0..n-1] (n >= min_seq_len): test = (s[:-1], s[-1]), valid =
(s[:-2], s[-2]), train = windows over s[:-2] (histories cut to the last ``max_seq_len`` items).
A training row (history, target) is a sequence: a model may train on every position of
``history + [target]`` with next-item targets (SASRec); long train sequences are cut into
windows that overlap by one item so that every transition is trained exactly once.

With ``cross_platform`` a history also holds the user's events on the other platforms (same
pseudonym), merged by time: see :mod:`recsys.data.crossplatform`.

Impression events (``schema.IMPRESSION``) are exposures, not interactions. When an example set's
logs hold any, its rows carry ``shown``, aligned with the labels ``history[1:] + [target]``:
for each label, the latest item shown to the user after their previous interaction and up to
the label's time that is not the label itself (0: nothing shown; the trainer samples one).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import model_validator

from recsys.config import StrictModel
from recsys.data.schema import EVENT_TYPES, IMPRESSION

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


SHOWN_FIELD = pa.field("shown", pa.list_(pa.int32()), nullable=False)
"""Example sets whose logs hold impressions: ``shown[j]`` is the shown-not-chosen item before
label ``j`` (``history[j + 1]``, the target for the last), 0 for none; as long as ``history``."""


def examples_schema(cross_platform: bool, shown: bool = False) -> pa.Schema:
    """The schema of an example set's split files."""
    schema = CROSS_EXAMPLES_SCHEMA if cross_platform else EXAMPLES_SCHEMA
    return schema.append(SHOWN_FIELD) if shown else schema


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
            if IMPRESSION in self.event_types:
                raise ValueError(f"sequences.event_types: {IMPRESSION!r} is an exposure, not an "
                                 "interaction (it never enters histories; with impressions in "
                                 "the logs, rows carry them as CTR negatives)")
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
    impressions: int = 0
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
    shown: np.ndarray | None = None  # (E,) int32 shown-not-chosen item before each; None: no log

    def by_user(self) -> dict[str, int]:
        """User id -> run number."""
        return {u: k for k, u in enumerate(self.users.tolist())}


def user_sequences(events: pa.Table, catalog: pa.Array, cfg: SequenceConfig) -> UserSequences:
    """Filter, sort and index one bucket's events (the shared first half of every builder).
    ``catalog`` is :func:`item_index` of the platform."""
    stats = BucketStats(events_in=events.num_rows)
    exposed = None
    if events.num_rows:
        is_shown = pc.equal(events["event_type"], IMPRESSION)
        stats.impressions = pc.sum(is_shown).as_py() or 0
        if stats.impressions:
            exposed, events = events.filter(is_shown), events.filter(pc.invert(is_shown))
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
    shown = None if exposed is None else shown_negatives(exposed, catalog, users.dictionary,
                                                         items, times, ucodes)
    return UserSequences(items, times, starts, ends, run_users, stats, shown)


def shown_negatives(exposed: pa.Table, catalog: pa.Array, user_names: pa.Array,
                    items: np.ndarray, times: np.ndarray, ucodes: np.ndarray) -> np.ndarray:
    """(E,) int32: for each interaction (``items``/``times``/``ucodes``, sorted by user and
    time), the latest impression of the same user after their previous interaction and at or
    before this one whose item is not this one; 0 if none. One sort and two binary searches."""
    out = np.zeros(len(items), np.int32)
    idx = pc.index_in(exposed["item_id"], value_set=catalog)
    user = pc.index_in(exposed["user_id"], value_set=user_names)
    keep = pc.and_(pc.is_valid(idx), pc.is_valid(user))
    if not len(items) or not pc.sum(keep).as_py():
        return out

    def col(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return a.filter(keep).to_numpy(zero_copy_only=False)

    s_item, s_user = col(idx).astype(np.int32) + 1, col(user).astype(np.int64)
    s_time = col(exposed["timestamp"].cast(pa.int64()))
    order = np.lexsort((col(exposed["event_index"]), s_time, s_user))
    s_item, s_user, s_time = s_item[order], s_user[order], s_time[order]
    # (user, time) -> one sortable int: times as ranks on a shared grid (0 = before all)
    grid = np.unique(np.concatenate([s_time, times]))
    width = len(grid) + 1
    s_key = s_user * width + np.searchsorted(grid, s_time) + 1
    u = ucodes.astype(np.int64)
    first = np.ones(len(items), bool)
    first[1:] = u[1:] != u[:-1]
    prev = np.where(first, 0, np.searchsorted(grid, np.roll(times, 1)) + 1)
    hi = np.searchsorted(s_key, u * width + np.searchsorted(grid, times) + 1, side="right")
    lo = np.searchsorted(s_key, u * width + prev, side="right")
    j = hi - 1
    while True:  # step back over impressions of the label itself (a page may repeat an item)
        same = (j >= lo) & (s_item[np.maximum(j, 0)] == items)
        if not same.any():
            break
        j = np.where(same, j - 1, j)
    ok = j >= lo
    out[ok] = s_item[j[ok]]
    return out


def build_examples(
    events: pa.Table, catalog: pa.Array, cfg: SequenceConfig, platform: str,
    shown: bool = False,
) -> tuple[pa.Table, BucketStats]:
    """Examples of one platform bucket. ``catalog`` is :func:`item_index` of the platform;
    ``shown``: the example set's logs hold impressions (rows carry ``shown``)."""
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

    schema = examples_schema(False, shown)
    if not take:
        return schema.empty_table(), stats
    lengths = np.fromiter((len(t) for t in take), dtype=np.int32, count=len(take))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    positions = np.concatenate(take)
    columns = [
        pa.array(np.full(len(take), platform, dtype=object), pa.string()),
        pa.array(seqs.users[np.asarray(row_user)], pa.string()),
        pa.array(row_split, pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(items[positions], pa.int32())),
        pa.array(items[np.asarray(targets)], pa.int32()),
    ]
    if shown:  # histories are contiguous runs, so the labels are at positions + 1
        neg = np.zeros(len(items), np.int32) if seqs.shown is None else seqs.shown
        columns.append(pa.ListArray.from_arrays(offsets, pa.array(neg[positions + 1])))
    return pa.Table.from_arrays(columns, schema=schema), stats
