"""RecBole/UniSRec atomic files: ``X.{train,valid,test}.inter``, ``X.text``, ``X.item2index``,
``X.user2index`` (e.g. the Amazon 2018 "Scientific" split of UniSRec/VQ-Rec).

The ``.inter`` files hold item *indices* and no timestamps. The full chronological sequence of a
user is rebuilt from them: the training rows are one per prefix (history truncated to 50), so
their targets give positions 1..n-3, the first row's history gives position 0, and the valid and
test targets give the last two. Timestamps are synthesised from the position (one second apart),
which the report lists as a quirk; the leave-one-out split of the lake then reproduces the given
valid/test targets exactly.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.ingest.base import IngestError, IngestOptions, Ledger, SourceFrames
from recsys.data.pseudonym import Pseudonymizer

EPOCH = pd.Timestamp("2000-01-01", tz="UTC")


def _find(directory: Path, suffix: str) -> Path:
    hits = sorted(directory.glob(f"*{suffix}"))
    if len(hits) != 1:
        raise IngestError(str(directory), f"expected exactly one *{suffix} file, found "
                          f"{[h.name for h in hits]}")
    return hits[0]


def _read_tsv(path: Path, expected: list[str]) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise IngestError(str(path), "empty file")
    header = [h.split(":")[0] for h in rows[0]]
    if header[: len(expected)] != expected:
        raise IngestError(str(path), f"header {rows[0]} does not start with {expected}", row=1)
    for i, r in enumerate(rows[1:], start=2):
        if len(r) < len(expected):
            raise IngestError(str(path), f"expected {len(expected)} tab-separated fields, "
                              f"got {len(r)}", row=i)
    return rows[1:]


def _index_map(path: Path) -> dict[str, str]:
    """``X.item2index``/``X.user2index``: raw id <TAB> index -> {index: raw id}."""
    out: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise IngestError(str(path), "expected 'raw_id<TAB>index'", row=i)
            out[parts[1]] = parts[0]
    return out


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    directory = opts.source_path()
    if not directory.is_dir():
        raise IngestError(str(directory), "unisrec source must be the directory of atomic files")
    ledger = Ledger(pseudo)
    train_p, valid_p, test_p = (_find(directory, f".{s}.inter") for s in ("train", "valid", "test"))
    text_p, item_idx_p = _find(directory, ".text"), _find(directory, ".item2index")
    user_idx_p = _find(directory, ".user2index")
    index_to_item, index_to_user = _index_map(item_idx_p), _index_map(user_idx_p)

    train = _read_tsv(train_p, ["user_id", "item_id_list", "item_id"])
    valid = _read_tsv(valid_p, ["user_id", "item_id_list", "item_id"])
    test = _read_tsv(test_p, ["user_id", "item_id_list", "item_id"])

    # Rebuild each user's full sequence (positions 0..n-1), as item indices.
    first_hist: dict[str, list[str]] = {}
    train_targets: dict[str, list[str]] = {}
    for user, hist, target in train:  # one row per prefix; longest prefix first per user
        train_targets.setdefault(user, []).append(target)
        h = hist.split()
        if user not in first_hist or len(h) < len(first_hist[user]):
            first_hist[user] = h
    valid_t = {u: t for u, _, t in valid}
    seqs: dict[str, list[str]] = {}
    for row_no, (user, hist, target) in enumerate(test, start=2):
        if user not in valid_t:
            raise IngestError(str(test_p), f"user {user} has a test row but no valid row",
                              row=row_no)
        if user in train_targets:
            seq = first_hist[user][:1] + train_targets[user][::-1]
        else:  # too short for a training row: history of the valid row is the whole prefix
            seq = next(h.split() for u, h, _ in valid if u == user)
        seq = seq + [valid_t[user], target]
        tail = hist.split()
        if seq[-1 - len(tail):-1] != tail:
            raise IngestError(str(test_p), f"user {user}: test history disagrees with the "
                              "sequence rebuilt from the train/valid files", row=row_no)
        seqs[user] = seq
    ledger.quirk("timestamps_synthesised", "source has no time; positions one second apart")
    ledger.quirk("sequence_rebuilt_from", "train prefixes + valid/test targets")

    users, items, pos = [], [], []
    for user, seq in seqs.items():
        users.extend([user] * len(seq))
        items.extend(seq)
        pos.extend(range(len(seq)))
    n = len(users)
    raw_user = [index_to_user.get(u) for u in users]
    item_ids = [index_to_item.get(i) for i in items]
    events = pd.DataFrame({
        "user_id": raw_user,
        "item_id": item_ids,
        "event_type": "review",
        "timestamp": EPOCH + pd.to_timedelta(np.asarray(pos, dtype=np.int64), unit="s"),
        "event_index": np.arange(n, dtype=np.int64),
        "_file": str(test_p),
        "_row": np.arange(1, n + 1),
        "source_user_index": users,
        "source_item_index": items,
    })
    ledger.events.rows_in = n
    # Indices that the *2index files do not know cannot be mapped: quarantine, do not guess.
    bad_user = events["user_id"].isna()
    if bad_user.any():
        ledger.quarantine("events", events[bad_user], "unknown_user_index", column="user_id",
                          file=str(user_idx_p))
        events = events[~bad_user]
    bad_item = events["item_id"].isna()
    if bad_item.any():
        ledger.quarantine("events", events[bad_item], "unknown_item_index", column="item_id",
                          file=str(item_idx_p), user_column="user_id")
        events = events[~bad_item]
    events = events.drop(columns=["source_user_index", "source_item_index"])

    text_rows = _read_tsv(text_p, ["item_id", "text"])
    items_df = pd.DataFrame({
        "item_id": [r[0] for r in text_rows],
        # UniSRec text is "title. category. brand." in one field: it cannot be split reliably.
        "title": [r[1].strip() for r in text_rows],
        "_file": str(text_p),
        "_row": np.arange(2, len(text_rows) + 2),
    })
    ledger.items.rows_in = len(items_df)
    ledger.quirk("item_text", "title holds UniSRec's combined 'title. category. brand.' text")
    platform = opts.platform or directory.name.lower()
    return [SourceFrames(platform, events, items_df, ledger, str(test_p))]
