"""What every ingest adapter shares: the ledger of rows, common validation, finalisation.

An adapter parses its source into two pandas frames with canonical column names (raw user ids),
recording in the :class:`Ledger` every row it rejects (quarantine, with a reason) or removes by a
rule (filter, e.g. cancellations). :func:`finalize` then applies the checks every source needs,
the optional k-core rule, pseudonymises user ids and returns canonical Arrow tables. The ledger
makes the invariant ``rows_in == rows_out + quarantined + filtered`` checkable for every run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENT_TYPES, EVENTS_SCHEMA, ITEMS_SCHEMA, QUARANTINE_META_COLUMNS


class IngestError(ValueError):
    """A source that cannot be read at all: names the file, and the row and column if known."""

    def __init__(self, file: str, message: str, row: int | None = None, column: str | None = None):
        where = file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.row, self.column = file, row, column


@dataclass
class RowCounts:
    """In/out bookkeeping of one table (events or items)."""

    rows_in: int = 0
    rows_out: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    frames: list[pd.DataFrame] = field(default_factory=list, repr=False)

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + sum(self.quarantined.values()) + sum(
            self.filtered.values()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": sum(self.quarantined.values()),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "rows_filtered": sum(self.filtered.values()),
            "filtered_by_rule": dict(sorted(self.filtered.items())),
            "invariant_holds": self.balanced,
        }


@dataclass
class Ledger:
    """Counts and quarantined rows of one ingest run, plus the quirks the adapter noticed."""

    pseudonymizer: Pseudonymizer
    events: RowCounts = field(default_factory=RowCounts)
    items: RowCounts = field(default_factory=RowCounts)
    quirks: dict[str, Any] = field(default_factory=dict)

    def quarantine(
        self,
        table: str,
        rows: pd.DataFrame,
        reason: str,
        *,
        column: str | None,
        file: str,
        row_numbers: pd.Series | np.ndarray | None = None,
        user_column: str | None = None,
    ) -> None:
        """Keep rejected rows, as strings, with file/row/column/reason. Raw user ids are hashed."""
        if len(rows) == 0:
            return
        counts = self.events if table == "events" else self.items
        counts.quarantined[reason] += len(rows)
        out = rows.copy()
        if row_numbers is None:
            row_numbers = out["_row"] if "_row" in out else out.index.to_numpy() + 1
        for col in list(out.columns):
            if col.startswith("_"):
                out = out.drop(columns=col)
            elif col == user_column:
                raw = out[col].astype("string")
                hashed = self.pseudonymizer.many(None if pd.isna(v) else str(v) for v in raw)
                out[col] = pd.array(hashed, dtype="string")
            else:
                out[col] = _as_text(out[col])
        out.insert(0, "_reason", reason)
        out.insert(0, "_column", column)
        out.insert(0, "_row", np.asarray(row_numbers, dtype=np.int64))
        out.insert(0, "_file", file)
        counts.frames.append(out.reset_index(drop=True))

    def filter(self, table: str, count: int, rule: str) -> None:
        """Rows removed on purpose by a named rule (dedup, k-core, cancellations, ...)."""
        if count:
            (self.events if table == "events" else self.items).filtered[rule] += int(count)

    def quirk(self, name: str, value: Any) -> None:
        self.quirks[name] = value

    def quarantine_table(self, table: str) -> pa.Table:
        frames = (self.events if table == "events" else self.items).frames
        if not frames:
            return pa.table({c: pa.array([], pa.string()) for c in QUARANTINE_META_COLUMNS})
        df = pd.concat(frames, ignore_index=True)
        return pa.Table.from_pandas(df, preserve_index=False)


def _as_text(values: pd.Series) -> pd.Series:
    """Source values as strings, vectorised unless the column holds lists."""
    if values.dtype == object:
        sample = values.dropna()
        if len(sample) and isinstance(sample.iloc[0], (list, tuple, np.ndarray)):
            return values.map(_to_text).astype("string")
    return values.astype("string")


def _to_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if value is pd.NaT:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return " > ".join(str(v) for v in value)
    return str(value)


def _take_bad(
    df: pd.DataFrame, bad: pd.Series, ledger: Ledger, table: str, reason: str, column: str,
    file_of: pd.Series | str, user_column: str | None = None,
) -> pd.DataFrame:
    """Quarantine ``df[bad]`` (grouped by source file) and return ``df[~bad]``."""
    if not bad.any():
        return df
    rejected = df[bad]
    files = rejected["_file"] if "_file" in rejected else pd.Series(file_of, index=rejected.index)
    for fname, part in rejected.groupby(files, sort=False):
        ledger.quarantine(table, part, reason, column=column, file=str(fname),
                          user_column=user_column)
    return df[~bad]


def _blank(s: pd.Series) -> pd.Series:
    return s.isna() | (s.astype("string").str.strip().fillna("") == "")


def finalize(
    platform: str,
    events: pd.DataFrame,
    items: pd.DataFrame,
    ledger: Ledger,
    *,
    source_file: str,
    min_user_events: int = 0,
    min_item_events: int = 0,
) -> tuple[pa.Table, pa.Table]:
    """Common validation, optional k-core, pseudonymisation; returns canonical (events, items).

    ``events`` columns: user_id (raw), item_id, event_type, timestamp, event_index, optional
    quantity/price/session_id, and ``_file``/``_row`` for provenance. ``items`` columns: item_id,
    title, optional description/brand/category/price, ``_file``/``_row``. The caller has already
    counted ``rows_in`` and recorded its own rejections in ``ledger``.
    """
    items = items.copy()
    events = events.copy()
    for col in ("description", "brand", "category", "price"):
        if col not in items:
            items[col] = None
    for col in ("quantity", "price", "session_id"):
        if col not in events:
            events[col] = None

    # --- items: required fields, one row per item id
    items["item_id"] = items["item_id"].astype("string").str.strip()
    items = _take_bad(items, _blank(items["item_id"]), ledger, "items", "missing_item_id",
                      "item_id", source_file)
    items = _take_bad(items, _blank(items["title"]), ledger, "items", "missing_title", "title",
                      source_file)
    dup = items["item_id"].duplicated(keep="first")
    ledger.filter("items", int(dup.sum()), "duplicate_item_id")
    items = items[~dup]

    # --- events: required fields, known types, referential integrity with the catalog
    events["item_id"] = events["item_id"].astype("string").str.strip()
    events["user_id"] = events["user_id"].astype("string").str.strip()
    ucol = "user_id"
    events = _take_bad(events, _blank(events["user_id"]), ledger, "events", "missing_user_id",
                       "user_id", source_file, ucol)
    events = _take_bad(events, _blank(events["item_id"]), ledger, "events", "missing_item_id",
                       "item_id", source_file, ucol)
    events = _take_bad(events, events["timestamp"].isna(), ledger, "events", "invalid_timestamp",
                       "timestamp", source_file, ucol)
    events = _take_bad(events, ~events["event_type"].isin(EVENT_TYPES), ledger, "events",
                       "unknown_event_type", "event_type", source_file, ucol)
    price = pd.to_numeric(events["price"], errors="coerce")
    events = _take_bad(events, price < 0, ledger, "events", "negative_price", "price",
                       source_file, ucol)
    events = _take_bad(events, ~events["item_id"].isin(items["item_id"]), ledger, "events",
                       "item_not_in_catalog", "item_id", source_file, ucol)

    # --- k-core: iterate until every user and item has enough events
    if min_user_events > 1 or min_item_events > 1:
        events, items = _k_core(events, items, ledger, min_user_events, min_item_events)

    ledger.events.rows_out = len(events)
    ledger.items.rows_out = len(items)
    for name, counts in (("events", ledger.events), ("items", ledger.items)):
        if not counts.balanced:
            raise AssertionError(f"ingest ledger for {name} does not balance: {counts.to_dict()}")

    return _events_table(platform, events, ledger.pseudonymizer), _items_table(platform, items)


def _k_core(events: pd.DataFrame, items: pd.DataFrame, ledger: Ledger, k_user: int,
            k_item: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rounds = 0
    while True:
        ucount = events.groupby("user_id", sort=False)["item_id"].transform("size")
        icount = events.groupby("item_id", sort=False)["user_id"].transform("size")
        keep = (ucount >= k_user) & (icount >= k_item)
        if keep.all():
            break
        ledger.filter("events", int((~keep).sum()), "k_core")
        events = events[keep]
        rounds += 1
    # Catalog items left with fewer than k_item events are part of the same rule (an item k-core
    # only: with a user-only k-core, items without events stay in the catalog).
    counts = events["item_id"].value_counts()
    keep_items = items["item_id"].map(counts).fillna(0) >= k_item
    ledger.filter("items", int((~keep_items).sum()), "k_core")
    ledger.quirk("k_core", {"min_user_events": k_user, "min_item_events": k_item,
                            "rounds": rounds})
    return events, items[keep_items]


def _events_table(platform: str, ev: pd.DataFrame, pseudo: Pseudonymizer) -> pa.Table:
    ts = pd.to_datetime(ev["timestamp"], utc=True)
    cols = {
        "platform": pa.array(np.full(len(ev), platform, dtype=object), pa.string()),
        "user_id": pseudo.array(pa.array(ev["user_id"].astype(str).to_numpy(), pa.string())),
        "item_id": pa.array(ev["item_id"].astype(str).to_numpy(), pa.string()),
        "event_type": pa.array(ev["event_type"].astype(str).to_numpy(), pa.string()),
        "timestamp": pa.array(ts.dt.as_unit("us"), pa.timestamp("us", tz="UTC")),
        "quantity": pa.array(pd.to_numeric(ev["quantity"], errors="coerce"), pa.float64()),
        "price": pa.array(pd.to_numeric(ev["price"], errors="coerce"), pa.float64()),
        # Session ids can embed who a person is (an invoice, a cookie): hashed like user ids.
        "session_id": _pseudonymize_optional(ev["session_id"], pseudo),
        "event_index": pa.array(ev["event_index"].astype(np.int64).to_numpy(), pa.int64()),
    }
    return pa.Table.from_pydict(cols, schema=EVENTS_SCHEMA)


def _pseudonymize_optional(values: pd.Series, pseudo: Pseudonymizer) -> pa.Array:
    text = pa.array(values.astype("string"), pa.string())
    if text.null_count == len(text):
        return text
    salted = pa.compute.binary_join_element_wise(pa.scalar("session:"), text, "")
    return pseudo.array(salted)


def _clean_category(value: Any) -> list[str] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(">", ",").split(",")]
    else:
        parts = [str(p).strip() for p in value]
    parts = [p for p in parts if p]
    return parts or None


def _opt_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _items_table(platform: str, it: pd.DataFrame) -> pa.Table:
    cols = {
        "platform": pa.array(np.full(len(it), platform, dtype=object), pa.string()),
        "item_id": pa.array(it["item_id"].astype(str).to_numpy(), pa.string()),
        "title": pa.array(it["title"].astype(str).str.strip().to_numpy(), pa.string()),
        "description": pa.array([_opt_text(v) for v in it["description"]], pa.string()),
        "brand": pa.array([_opt_text(v) for v in it["brand"]], pa.string()),
        "category": pa.array([_clean_category(v) for v in it["category"]],
                             pa.list_(pa.string())),
        "price": pa.array(pd.to_numeric(it["price"], errors="coerce"), pa.float64()),
    }
    return pa.Table.from_pydict(cols, schema=ITEMS_SCHEMA)
