"""What the endpoint served and what users did with it, added to a platform of the lake (source
``feedback``).

``--path`` is the serving app's ``feedback.dir``; the adapter reads ``<path>/<platform>/*.parquet``
(``recsys.serving.feedback`` writes them: ``FEEDBACK_SCHEMA``, one ``impression`` row per item
shown, one ``click`` / ``cart`` / ``purchase`` row per POST /feedback) and adds them to what the
lake (``--out``) already holds for ``--platform``: the platform is re-written whole, as every
ingest does, with its lake events, its catalog and its earlier quarantine kept. Ingest the
platform's own logs first; re-ingesting them later replaces the partition, and running this
source again puts the feedback back (rows already in the lake are filtered as
``already_in_lake``, so running it twice adds nothing twice).

User ids in these files are pseudonyms of the serving key already: they are not hashed again,
so the files' key (the fingerprint in their metadata) must be the lake's, and the ingest refuses
a file of another key or of none. Every row goes through the common checks of
:func:`~recsys.data.ingest.finalize.finalize` (unknown items, timestamps, ...) after the
feedback's own, each quarantined with its file and row: ``platform_mismatch``,
``missing_request_id``, ``unknown_event_type`` (only impression, click, cart, purchase),
``invalid_position`` (an impression without a position >= 1) and ``not_a_pseudonym`` (a user id
that no key made: hashed in the quarantine like any raw id). Rows of anonymous requests (no
user) have no place in per-user histories: filtered as ``anonymous``.

The lake keeps the standard event columns. The request ids, positions, scores, model versions and
arms (``served_by``) stay in the feedback files, which the drift monitor reads
(:func:`read_feedback`): per-request impressions, and clicks joined on ``request_id``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.ingest.base import IngestError, IngestOptions, Ledger, RowRules, SourceFrames
from recsys.data.ingest.parsing import blank
from recsys.data.lake import check_key, list_platforms, platform_dir, read_platform
from recsys.data.pseudonym import PSEUDONYM_HEX_CHARS, Pseudonymizer
from recsys.data.schema import (
    FEEDBACK_EVENT_TYPES,
    FEEDBACK_SCHEMA,
    QUARANTINE_KEY_METADATA,
    QUARANTINE_PSEUDONYMISED_METADATA,
    check_schema,
)

_PSEUDONYM = re.compile(rf"^[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}$")
_FEEDBACK_COLUMNS = [f.name for f in FEEDBACK_SCHEMA]


def feedback_files(root: str | Path, platform: str) -> list[Path]:
    """The platform's log files in name order (the writer's temporary files are hidden and end
    in ``.tmp``: never read half-written)."""
    return sorted(p for p in (Path(root) / platform).glob("*.parquet")
                  if not p.name.startswith("."))


def read_feedback(root: str | Path, platform: str, fingerprint: str | None = None,
                  files: list[Path] | None = None) -> pa.Table:
    """Every row of the platform's log files, with ``_file`` (path) and ``_row`` (1-based)
    columns; each file checked against ``FEEDBACK_SCHEMA`` and, given a ``fingerprint``,
    written under that pseudonym key (:class:`IngestError` naming the file otherwise)."""
    tables = []
    for f in feedback_files(root, platform) if files is None else files:
        try:
            t = pq.read_table(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise IngestError(str(f), f"not a readable Parquet file: {exc}") from exc
        meta = t.schema.metadata or {}
        theirs = meta.get(QUARANTINE_KEY_METADATA, b"").decode() or None
        if fingerprint is not None and theirs != fingerprint:
            raise IngestError(str(f), f"written with pseudonym key fingerprint {theirs} but the "
                              f"lake's key is {fingerprint}: its user ids would not match the "
                              "lake's. Serve with the key that ingested the lake.")
        try:
            check_schema(t.schema, FEEDBACK_SCHEMA, str(f))
        except ValueError as exc:
            raise IngestError(str(f), str(exc)) from exc
        t = t.select(_FEEDBACK_COLUMNS).cast(FEEDBACK_SCHEMA)
        t = t.append_column("_file", pa.array([str(f)] * t.num_rows, pa.string()))
        tables.append(t.append_column("_row", pa.array(np.arange(1, t.num_rows + 1))))
    if not tables:
        empty = FEEDBACK_SCHEMA.append(pa.field("_file", pa.string()))
        return empty.append(pa.field("_row", pa.int64())).empty_table()
    return pa.concat_tables(tables)


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    """The platform's lake partition plus its feedback files (see the module docstring)."""
    root, platform = opts.source_path(), str(opts.platform)
    if opts.items_path is not None or opts.user_namespace or opts.columns:
        raise IngestError(str(root), "source feedback takes no --items-path, --map or "
                          "user_namespace: the catalog is the lake's and the user ids are "
                          "pseudonyms already")
    if platform not in list_platforms(opts.out):
        raise IngestError(str(opts.out), f"platform {platform!r} is not in the lake: ingest its "
                          "own logs first (feedback is added to them)")
    check_key(opts.out, pseudo, [platform], purpose="add feedback to")
    files = feedback_files(root, platform)
    if not files:
        raise IngestError(str(root / platform), "no feedback files (*.parquet)")

    ledger = Ledger(pseudo, pseudonyms=frozenset({"user_id", "session_id"}))
    base = read_platform(opts.out, platform)
    events = _lake_events(base.events, platform, opts.out)
    served = read_feedback(root, platform, pseudo.fingerprint, files).to_pandas()
    ledger.events.rows_in = len(events) + len(served)
    new = _checked(served, platform, events, ledger)
    new["event_index"] = np.arange(len(new), dtype=np.int64) + (
        int(events["event_index"].max()) + 1 if len(events) else 0)
    items = base.items.to_pandas().drop(columns=["platform"])
    items["_file"] = str(platform_dir(opts.out, platform) / "items")
    items["_row"] = np.arange(1, len(items) + 1)
    ledger.items.rows_in = len(items)
    _carry_quarantine(opts.out, platform, ledger, {str(f) for f in files})
    ledger.quirk("feedback", {"files": len(files), "rows": len(served),
                              "lake_events": len(events),
                              "lake_source": base.report.get("source")})
    return [SourceFrames(platform, pd.concat([events, new], ignore_index=True), items, ledger,
                         str(root / platform), pseudonymised=True)]


def _lake_events(table: pa.Table, platform: str, lake: Path) -> pd.DataFrame:
    events = table.to_pandas().drop(columns=["platform"])
    events["_file"] = str(platform_dir(lake, platform) / "events")
    events["_row"] = events["event_index"]
    return events


def _checked(served: pd.DataFrame, platform: str, lake_events: pd.DataFrame,
             ledger: Ledger) -> pd.DataFrame:
    """The feedback rows that pass the feedback's own rules, in the lake's event columns."""
    users = served["user_id"].astype("string")
    raw = ~users.isna() & ~users.fillna("").str.fullmatch(_PSEUDONYM)
    if raw.any():  # not a pseudonym: hashed like any raw id before it reaches the quarantine
        served.loc[raw, "user_id"] = pseudo_many(ledger.pseudonymizer, users[raw])
    rules = RowRules(ledger, served, user_column="user_id")
    rules.quarantine((served["platform"] != platform).to_numpy(), "platform_mismatch",
                     "platform")
    rules.quarantine(blank(served["request_id"]).to_numpy(), "missing_request_id", "request_id")
    rules.quarantine((~served["event_type"].isin(FEEDBACK_EVENT_TYPES)).to_numpy(),
                     "unknown_event_type", "event_type")
    position = pd.to_numeric(served["position"], errors="coerce")
    rules.quarantine(((served["event_type"] == "impression") & ~(position >= 1)).to_numpy(),
                     "invalid_position", "position")
    rules.quarantine(raw.to_numpy(), "not_a_pseudonym", "user_id")
    rules.filter(users.isna().to_numpy() | blank(users).to_numpy(), "anonymous")
    key = ["user_id", "item_id", "event_type", "timestamp"]
    rules.filter_duplicates(served[[*key, "request_id"]])
    seen = pd.MultiIndex.from_frame(lake_events[key])
    rules.filter(pd.MultiIndex.from_frame(served[key]).isin(seen), "already_in_lake")
    kept = served[rules.alive]
    out = pd.DataFrame({c: kept[c] for c in ("user_id", "item_id", "event_type", "timestamp",
                                             "_file", "_row")})
    for col in ("quantity", "price", "session_id"):
        out[col] = None
    return out.reset_index(drop=True)


def pseudo_many(pseudo: Pseudonymizer, values: pd.Series) -> list[str | None]:
    return pseudo.many(None if pd.isna(v) else str(v) for v in values)


def _carry_quarantine(lake: Path, platform: str, ledger: Ledger, files: set[str]) -> None:
    """The partition's earlier quarantine stays (not counted again in this run's report), but
    for rows of the feedback files read now: they are checked again."""
    carried = {}
    for table, counts in (("events", ledger.events), ("items", ledger.items)):
        path = platform_dir(lake, platform) / "quarantine" / f"{table}.parquet"
        if not path.is_file():
            continue
        old = pq.read_table(path)
        kinds = json.loads((old.schema.metadata or {}).get(
            QUARANTINE_PSEUDONYMISED_METADATA, b"{}"))
        frame = old.to_pandas()
        if "_file" in frame:
            frame = frame[~frame["_file"].isin(files)]
        if len(frame):
            counts.frames.append(frame.reset_index(drop=True))
            counts.pseudonymised.update(kinds)
        carried[table] = len(frame)
    ledger.quirk("earlier_quarantine_kept", carried)


__all__ = ["feedback_files", "read", "read_feedback"]
