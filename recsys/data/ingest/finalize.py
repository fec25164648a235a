"""Finalisation, the same for every source: validation, k-core, pseudonyms, canonical tables.

The runner calls :func:`finalize` on each adapter's :class:`~recsys.data.ingest.base.SourceFrames`
after the adapter has counted ``rows_in`` and recorded its own rejections in the ledger.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.ingest.base import IngestOptions, Ledger
from recsys.data.ingest.parsing import blank
from recsys.data.pseudonym import SESSION_PREFIX, Pseudonymizer, normalise_id
from recsys.data.schema import EVENT_TYPES, EVENTS_SCHEMA, ITEMS_SCHEMA, SCHEMA_VERSION


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


def finalize(
    platform: str,
    events: pd.DataFrame,
    items: pd.DataFrame,
    ledger: Ledger,
    *,
    source_file: str,
    min_user_events: int = 0,
    min_item_events: int = 0,
    pseudonymised: bool = False,
) -> tuple[pa.Table, pa.Table]:
    """Common validation, optional k-core, pseudonymisation; returns canonical (events, items).
    ``pseudonymised``: user and session ids are already pseudonyms of the ledger's key (source
    ``feedback``), so they are not hashed again.

    ``events`` and ``items`` have the columns :class:`~recsys.data.ingest.base.SourceFrames`
    describes. The caller has already counted ``rows_in`` and recorded its own rejections.
    """
    items = check_items(items, ledger, source_file)
    events = check_events(events, items["item_id"], ledger, source_file)

    # --- k-core: iterate until every user and item has enough events
    if min_user_events > 1 or min_item_events > 1:
        events, items = _k_core(events, items, ledger, min_user_events, min_item_events)

    ledger.events.rows_out = len(events)
    ledger.items.rows_out = len(items)
    check_balance(ledger)
    return (events_table(platform, events, None if pseudonymised else ledger.pseudonymizer),
            items_table(platform, items))


def check_items(items: pd.DataFrame, ledger: Ledger, source_file: str) -> pd.DataFrame:
    """The catalog rows that pass: an item id and a title, first row per id."""
    items = items.copy()
    for col in ("description", "brand", "category", "price"):
        if col not in items:
            items[col] = None
    items["item_id"] = items["item_id"].astype("string").str.strip()
    items = _take_bad(items, blank(items["item_id"]), ledger, "items", "missing_item_id",
                      "item_id", source_file)
    items = _take_bad(items, blank(items["title"]), ledger, "items", "missing_title", "title",
                      source_file)
    dup = items["item_id"].duplicated(keep="first")
    ledger.filter("items", int(dup.sum()), "duplicate_item_id")
    return items[~dup]


def check_events(events: pd.DataFrame, catalog_ids: pd.Series, ledger: Ledger,
                 source_file: str) -> pd.DataFrame:
    """The event rows that pass (required fields, known types, non-negative prices, items in the
    catalog ``catalog_ids``); the others are quarantined. Row by row, so a streaming ingest
    applies it chunk by chunk."""
    events = events.copy()
    for col in ("quantity", "price", "session_id"):
        if col not in events:
            events[col] = None
    events["item_id"] = events["item_id"].astype("string").str.strip()
    # The same normalisation as the hash (and as serving), before k-core and dedup count users.
    events["user_id"] = normalised_ids(events["user_id"])
    ucol = "user_id"
    events = _take_bad(events, blank(events["user_id"]), ledger, "events", "missing_user_id",
                       "user_id", source_file, ucol)
    events = _take_bad(events, blank(events["item_id"]), ledger, "events", "missing_item_id",
                       "item_id", source_file, ucol)
    events = _take_bad(events, events["timestamp"].isna(), ledger, "events", "invalid_timestamp",
                       "timestamp", source_file, ucol)
    events = _take_bad(events, ~events["event_type"].isin(EVENT_TYPES), ledger, "events",
                       "unknown_event_type", "event_type", source_file, ucol)
    price = pd.to_numeric(events["price"], errors="coerce")
    events = _take_bad(events, price < 0, ledger, "events", "negative_price", "price",
                       source_file, ucol)
    in_catalog = pc.is_in(pa.array(events["item_id"], pa.string()),
                          value_set=pa.array(catalog_ids, pa.string())).to_numpy(False)
    return _take_bad(events, pd.Series(~in_catalog, index=events.index), ledger, "events",
                     "item_not_in_catalog", "item_id", source_file, ucol)


def check_balance(ledger: Ledger) -> None:
    """Every row in is out, quarantined or filtered (else a bug: raise)."""
    for name, counts in (("events", ledger.events), ("items", ledger.items)):
        if not counts.balanced:
            raise AssertionError(f"ingest ledger for {name} does not balance: {counts.to_dict()}")


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


def events_table(platform: str, ev: pd.DataFrame, pseudo: Pseudonymizer | None) -> pa.Table:
    """``pseudo`` None: the ids are pseudonyms already."""
    ts = pd.to_datetime(ev["timestamp"], utc=True)
    users = pa.array(ev["user_id"].astype(str).to_numpy(), pa.string())
    cols = {
        "platform": pa.array(np.full(len(ev), platform, dtype=object), pa.string()),
        "user_id": users if pseudo is None else pseudo.array(users),
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


def normalised_ids(values: pd.Series) -> pd.Series:
    """:func:`~recsys.data.pseudonym.normalise_id` of every id, once per distinct value."""
    text = values.astype("string")
    codes, uniques = pd.factorize(text, use_na_sentinel=True)
    norm = np.array([normalise_id(str(v)) for v in uniques], dtype=object)
    out = np.where(codes >= 0, norm[np.maximum(codes, 0)] if len(norm) else None, None)
    return pd.Series(out, index=values.index, dtype="string")


def _pseudonymize_optional(values: pd.Series, pseudo: Pseudonymizer | None) -> pa.Array:
    text = pa.array(values.astype("string"), pa.string())
    if pseudo is None or text.null_count == len(text):
        return text
    return pseudo.array(text, prefix=SESSION_PREFIX)


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


def items_table(platform: str, it: pd.DataFrame) -> pa.Table:
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


def event_stats(events: pa.Table) -> dict[str, Any]:
    """The report's summary of the events written: users, items, time range, types."""
    ts = events["timestamp"]
    return {
        "users": pc.count_distinct(events["user_id"]).as_py(),
        "items_with_events": pc.count_distinct(events["item_id"]).as_py(),
        "first_event": str(pc.min(ts).as_py()) if events.num_rows else None,
        "last_event": str(pc.max(ts).as_py()) if events.num_rows else None,
        "event_types": {r["values"]: r["counts"] for r in
                        pc.value_counts(events["event_type"]).to_pylist()},
    }


def ingest_report(opts: IngestOptions, platform: str, ledger: Ledger, stats: dict[str, Any],
                  catalog_items: int, pseudo: Pseudonymizer, key_source: str,
                  seconds: float) -> dict[str, Any]:
    """``report.json`` of one platform; ``stats`` as :func:`event_stats` gives them."""
    return {
        "schema_version": SCHEMA_VERSION,
        "platform": platform,
        "source": opts.source,
        "recipe": opts.recipe,
        "path": str(opts.path) if opts.path else None,
        "created_at": datetime.now(UTC).isoformat(),
        "seconds": round(seconds, 3),
        "pseudonym_key_fingerprint": pseudo.fingerprint,
        "pseudonym_key_source": key_source,
        "events": ledger.events.to_dict(),
        "items": ledger.items.to_dict(),
        "users": stats["users"],
        "items_with_events": stats["items_with_events"],
        "catalog_items": catalog_items,
        "first_event": stats["first_event"],
        "last_event": stats["last_event"],
        "event_types": stats["event_types"],
        "quirks": ledger.quirks,
    }
