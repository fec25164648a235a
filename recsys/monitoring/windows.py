"""The two windows a check compares, read from the lake and the feedback log.

Lake: a platform's interactions (every event type but ``impression``), in time order, cut at the
reference cutoff (the newest event the champion's example set saw, or the config's
``window.reference_until``); without a cutoff the newest ``current_events`` interactions (at
most half of them) are judged against everything before them. Feedback: the newest
``current_impressions`` served impressions of a platform against the ones before (scores and
online CTR).

Feedback rows (``recsys.serving.feedback``): one per shown item or user action, with at least
``platform``, ``item_id``, ``score``, ``timestamp``, ``event_type`` (impression | click | cart |
purchase) and ``request_id``; a ``platform=<name>`` directory stands in for a missing column.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.lake import read_events
from recsys.data.schema import IMPRESSION

FEEDBACK_COLUMNS = ("platform", "item_id", "score", "timestamp", "event_type", "request_id")


@dataclass(frozen=True)
class Windows:
    """A platform's interactions, split into the reference and the current window."""

    reference: pa.Table
    current: pa.Table
    cutoff: datetime | None
    cutoff_source: str
    """``config`` (window.reference_until), ``champion`` (its export's data_until), or
    ``newest_events`` (no cutoff known: the newest events against the rest)."""
    new_events: int
    """Interactions after the cutoff (the current window holds at most current_events)."""


def interactions(lake: str | Path, platform: str) -> pa.Table:
    """A platform's events without impressions, oldest first (ties: source order)."""
    events = read_events(lake, platform)
    events = events.filter(pc.not_equal(events["event_type"], IMPRESSION))
    return events.sort_by([("timestamp", "ascending"), ("event_index", "ascending")])


def split_windows(events: pa.Table, cutoff: datetime | None, cutoff_source: str,
                  current_events: int) -> Windows:
    """Reference = events up to ``cutoff``; current = the newest ``current_events`` after it.
    ``events`` must be in time order (:func:`interactions`)."""
    n = events.num_rows
    if cutoff is None:  # the newest events, at most half: the reference is never the smaller
        k = min(current_events, n // 2)
        return Windows(events.slice(0, n - k), events.slice(n - k), None, "newest_events", k)
    ts = events["timestamp"].to_numpy(zero_copy_only=False)
    first_new = int(np.searchsorted(ts, np.datetime64(_naive_utc(cutoff), "us"), side="right"))
    new = n - first_new
    k = min(current_events, new)
    return Windows(events.slice(0, first_new), events.slice(n - k), cutoff, cutoff_source, new)


def _naive_utc(t: datetime) -> datetime:
    """``t`` as a naive UTC datetime (numpy compares those with the lake's UTC timestamps)."""
    from datetime import UTC

    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


@dataclass(frozen=True)
class FeedbackWindows:
    """A platform's served impressions (and the clicks on them), reference and current."""

    reference: pa.Table
    current: pa.Table
    clicks: pa.Table


def read_feedback(feedback_dir: str | Path) -> pa.Table:
    """Every feedback Parquet file below ``feedback_dir`` (the columns the monitor reads)."""
    tables = []
    for path in sorted(Path(feedback_dir).rglob("*.parquet")):
        table = pq.read_table(path)
        if "platform" not in table.column_names:
            part = next((p.split("=", 1)[1] for p in path.parts if p.startswith("platform=")),
                        None)
            if part is None:
                raise ValueError(f"{path}: feedback without a platform column or "
                                 "platform=<name> directory")
            table = table.append_column("platform", pa.array([part] * table.num_rows))
        missing = [c for c in FEEDBACK_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: not a feedback file, missing column(s) {missing}")
        table = table.select(list(FEEDBACK_COLUMNS))
        tables.append(table.cast(pa.schema([
            ("platform", pa.string()), ("item_id", pa.string()), ("score", pa.float64()),
            ("timestamp", pa.timestamp("us", tz="UTC")), ("event_type", pa.string()),
            ("request_id", pa.string())])))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in FEEDBACK_COLUMNS})
    return pa.concat_tables(tables)


def feedback_windows(feedback: pa.Table, platform: str, current_impressions: int
                     ) -> FeedbackWindows:
    """The newest ``current_impressions`` impressions of ``platform`` and the ones before."""
    rows = feedback.filter(pc.equal(feedback["platform"], platform))
    shown = rows.filter(pc.equal(rows["event_type"], IMPRESSION))
    if shown.num_rows:
        shown = shown.sort_by([("timestamp", "ascending")])
    n = shown.num_rows
    k = min(current_impressions, n)
    clicks = rows.filter(pc.equal(rows["event_type"], "click"))
    return FeedbackWindows(shown.slice(0, n - k), shown.slice(n - k), clicks)
