"""One user across platforms: histories that merge a user's events on every platform by time.

A user is the same keyed pseudonym on every platform, so their events elsewhere say something
about what they want here. For a target platform P the rows and targets are those of
:func:`recsys.data.sequences.build_examples` (leave-one-out by time on P); only the histories
change: P's own items before the target, merged with the user's items on the other platforms,
oldest first, cut to the last ``max_seq_len``; ``history_platform`` names the platform of each
item (an index into *that* platform's catalog, so the model embeds it with that item table).

No leakage, by construction (``tests/unit/test_crossplatform.py`` checks every row):

* an item from another platform is in a history only if its timestamp is strictly earlier than
  the target's. In the merged order, at equal timestamps the target platform's own events come
  first, so inside a training window too every item before a label from P is strictly earlier
  than it (own items keep their leave-one-out order, ties broken by source order, as before);
* held-out events stay held out: a train row uses only the other platforms' *training* events
  (never their valid or test targets), a valid row also their valid targets, a test row every
  earlier event. Users too short for examples on a platform hold nothing out there.

Training windows are cut from the merged sequence and end at P's items (the target of a row is
always an item of P): every transition *into* an item of P is trained once, and the first item of
P becomes a target too when the user had events elsewhere before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.sequences import (
    BucketStats,
    SequenceConfig,
    UserSequences,
    examples_schema,
)

TRAIN, VALID, TEST = 0, 1, 2
"""Stage of an event on its own platform: a training event, the valid target, the test target."""
_STAGE = {"train": TRAIN, "valid": VALID, "test": TEST}


def _stages(n: int, min_len: int) -> np.ndarray:
    """Stage of each of a user's ``n`` events on one platform (leave-one-out by position)."""
    out = np.full(n, TRAIN, np.int8)
    if n >= min_len:
        out[-1], out[-2] = TEST, VALID
    return out


class _Elsewhere:
    """One user's events on the other platforms: item, time, platform code, stage; by time."""

    def __init__(self, user: str, target: str, seqs: Mapping[str, UserSequences],
                 index: Mapping[str, dict[str, int]], codes: Mapping[str, int],
                 min_len: int) -> None:
        parts = []
        for name, other in seqs.items():
            k = index[name].get(user) if name != target else None
            if k is None:
                continue
            s, e = int(other.starts[k]), int(other.ends[k])
            parts.append((other.items[s:e], other.times[s:e],
                          np.full(e - s, codes[name], np.int16), _stages(e - s, min_len)))
        if parts:
            items, times, code, stage = (np.concatenate(c) for c in zip(*parts))
            order = np.lexsort((code, times))  # by time; platform order breaks ties, stably
            self.items, self.times = items[order], times[order]
            self.code, self.stage = code[order], stage[order]
        else:
            self.items = np.zeros(0, np.int32)
            self.times = np.zeros(0, np.int64)
            self.code = np.zeros(0, np.int16)
            self.stage = np.zeros(0, np.int8)

    def before(self, time: int, max_stage: int) -> np.ndarray:
        """Positions of the events strictly earlier than ``time`` of at most ``max_stage``."""
        return np.flatnonzero((self.times < time) & (self.stage <= max_stage))


def _merge(own_items: np.ndarray, own_times: np.ndarray, own_shown: np.ndarray, own_code: int,
           other: _Elsewhere, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Own items (already in order) and the ``pick``ed events elsewhere, merged by time; at equal
    times own items first. Returns (items, platform codes, shown-not-chosen item before each:
    ``own_shown`` for own items, 0 elsewhere, whose labels this platform does not train)."""
    items = np.concatenate([own_items, other.items[pick]])
    codes = np.concatenate([np.full(len(own_items), own_code, np.int16), other.code[pick]])
    times = np.concatenate([own_times, other.times[pick]])
    shown = np.concatenate([own_shown, np.zeros(len(pick), np.int32)])
    foreign = np.concatenate([np.zeros(len(own_items), np.int8), np.ones(len(pick), np.int8)])
    rank = np.arange(len(items))  # own order, then the (time-sorted) order elsewhere
    order = np.lexsort((rank, foreign, times))
    return items[order], codes[order], shown[order]


def build_cross_examples(seqs: Mapping[str, UserSequences], target: str, cfg: SequenceConfig,
                         platforms: Sequence[str], shown: bool = False
                         ) -> tuple[pa.Table, BucketStats]:
    """Examples of one bucket of ``target`` with cross-platform histories.

    ``seqs``: :func:`~recsys.data.sequences.user_sequences` of the target's bucket and of the
    same users' events on other platforms (a user's events must all be there); ``platforms``:
    every platform of the example set (the names ``history_platform`` may hold); ``shown``:
    the example set's logs hold impressions (rows carry ``shown``, as in ``build_examples``).
    """
    codes = {name: i for i, name in enumerate(platforms)}
    names = np.asarray(list(platforms), dtype=object)
    own = seqs[target]
    stats = own.stats
    index = {name: s.by_user() for name, s in seqs.items()}
    L, P = cfg.max_seq_len, codes[target]
    hist_items: list[np.ndarray] = []
    hist_codes: list[np.ndarray] = []
    hist_shown: list[np.ndarray] = []  # per label (history[1:] + [target])
    own_negs = own.shown if own.shown is not None else np.zeros(len(own.items), np.int32)
    targets: list[int] = []
    row_user: list[int] = []
    row_split: list[str] = []

    def emit(k: int, split: str, items: np.ndarray, code: np.ndarray, negs: np.ndarray,
             tgt: int) -> None:
        """``negs``: shown negatives of ``items[1:]`` and of the target."""
        hist_items.append(items[-L:] if L < len(items) else items)
        hist_codes.append(code[-L:] if L < len(code) else code)
        hist_shown.append(negs[-L:] if L < len(negs) else negs)
        targets.append(tgt)
        row_user.append(k)
        row_split.append(split)

    for k, (s, e) in enumerate(zip(own.starts.tolist(), own.ends.tolist())):
        if e - s < cfg.min_seq_len:
            stats.users_too_short += 1
            continue
        items, times, negs = own.items[s:e], own.times[s:e], own_negs[s:e]
        other = _Elsewhere(own.users[k], target, seqs, index, codes, cfg.min_seq_len)
        n = e - s
        for split, t in (("test", n - 1), ("valid", n - 2)):
            pick = other.before(int(times[t]), _STAGE[split])
            h, c, g = _merge(items[:t], times[:t], negs[:t], P, other, pick)
            emit(k, split, h, c, np.append(g[1:], negs[t]), int(items[t]))
        # train: the merged sequence up to P's last training event, cut into windows that end at
        # P's items and overlap by one position, stepping back by at most L.
        last = n - 3
        pick = other.before(int(times[last]), TRAIN)
        seq, code, g = _merge(items[:last + 1], times[:last + 1], negs[:last + 1], P, other,
                              pick)
        own_pos = np.flatnonzero(code == P)
        end = len(seq) - 1  # P's last training event
        while end >= 1:
            start = max(0, end - L)
            emit(k, "train", seq[start:end], code[start:end], g[start + 1:end + 1], int(seq[end]))
            if not cfg.train_windows:
                break
            earlier = own_pos[own_pos <= start]
            if not len(earlier):
                break
            end = int(earlier[-1])

    schema = examples_schema(True, shown)
    if not targets:
        return schema.empty_table(), stats
    lengths = np.fromiter((len(h) for h in hist_items), dtype=np.int32, count=len(hist_items))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat_items = np.concatenate(hist_items) if len(hist_items) else np.zeros(0, np.int32)
    flat_codes = np.concatenate(hist_codes).astype(np.int64)
    table = pa.Table.from_arrays(
        [
            pa.array(np.full(len(targets), target, dtype=object), pa.string()),
            pa.array(own.users[np.asarray(row_user)], pa.string()),
            pa.array(row_split, pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(flat_items, pa.int32())),
            pa.array(np.asarray(targets, np.int32), pa.int32()),
            pa.ListArray.from_arrays(offsets, pa.array(names[flat_codes], pa.string())),
            *([pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(hist_shown)
                                                          .astype(np.int32)))] if shown else []),
        ],
        schema=schema,
    )
    return table, stats


def history_elsewhere(table: pa.Table) -> np.ndarray:
    """(rows,) bool: the row's history holds an item of another platform than the row's own.
    All False for an example set without ``history_platform`` (own-platform histories)."""
    if "history_platform" not in table.column_names or table.num_rows == 0:
        return np.zeros(table.num_rows, bool)
    hp = table["history_platform"].combine_chunks()
    lengths = pc.list_value_length(hp).fill_null(0).to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(table.num_rows), lengths)
    own = table["platform"].to_numpy(zero_copy_only=False)[row_of]
    flat = pc.list_flatten(hp).to_numpy(zero_copy_only=False)
    out = np.zeros(table.num_rows, bool)
    out[row_of[flat != own]] = True
    return out


def merge_histories(target: str, histories: Mapping[str, tuple[Sequence[int], Sequence[int]]],
                    max_len: int) -> tuple[list[int], list[str]]:
    """Serving's merged history, built as training builds it: ``histories`` maps a platform to
    the user's (item indices into that platform's catalog, event times), oldest first; returns
    the last ``max_len`` (item index, platform) pairs of all platforms merged by time, the
    target platform's own items first at equal times, as two lists. At serve time every stored
    event is in the past, so nothing is held out."""
    parts = []
    for name, (items, times) in histories.items():
        foreign = 0 if name == target else 1
        parts += [(int(t), foreign, name, i, int(x)) for i, (x, t) in enumerate(zip(items, times))]
    merged = sorted(parts, key=lambda r: (r[0], r[1], r[2], r[3]))[-max_len:] if max_len else []
    return [r[4] for r in merged], [r[2] for r in merged]
