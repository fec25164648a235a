"""The canonical multi-platform log format: the one place that defines it.

Every adapter writes these schemas, every reader checks against them. See docs/data_format.md.

Lake layout (one directory per platform, swapped in atomically by the writer)::

    LAKE/platform=<name>/events/bucket-<BBBB>.parquet   events, hash-bucketed by user, sorted
    LAKE/platform=<name>/items/items.parquet            the platform's catalog
    LAKE/platform=<name>/quarantine/{events,items}.parquet  rejected rows + reason, ids hashed
    LAKE/platform=<name>/report.json                    ingest report (counts, quirks, and the
                                                        fingerprint of the pseudonym key)
"""

from __future__ import annotations

import re

import pyarrow as pa

SCHEMA_VERSION = 1

# Event types, in funnel order. Extending the platform with a new behaviour is one line here;
# anything else an adapter emits is quarantined with reason ``unknown_event_type``.
EVENT_TYPES: tuple[str, ...] = ("impression", "view", "click", "cart", "purchase", "review",
                                "rating")
IMPRESSION = "impression"
"""An item shown to the user (a page of results, a carousel), not an interaction: never in a
history or a target. One shown before an interaction and not chosen is the CTR head's negative
there (``recsys.data.sequences``)."""

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("platform", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),  # keyed-hash pseudonym, never the raw id
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("quantity", pa.float64(), nullable=True),
        pa.field("price", pa.float64(), nullable=True),
        pa.field("session_id", pa.string(), nullable=True),
        # Position of the row in its source: breaks timestamp ties deterministically and lets a
        # report point back at the source row.
        pa.field("event_index", pa.int64(), nullable=False),
    ],
    metadata={"recsys.schema": "events", "recsys.schema_version": str(SCHEMA_VERSION)},
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("platform", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=True),
        pa.field("brand", pa.string(), nullable=True),
        pa.field("category", pa.list_(pa.string()), nullable=True),  # path, root first
        pa.field("price", pa.float64(), nullable=True),
    ],
    metadata={"recsys.schema": "items", "recsys.schema_version": str(SCHEMA_VERSION)},
)

# Quarantine files keep every rejected row with where it came from and why. Source values are
# kept as strings so that nothing is lost to a failed cast; identifier columns (user, session,
# invoice, customer, e-mail, ...) are pseudonymised there with the lake's key, and the file's
# schema metadata names them (column -> "user" | "session" | "id", JSON) and the key fingerprint.
QUARANTINE_META_COLUMNS: tuple[str, ...] = ("_file", "_row", "_column", "_reason")
QUARANTINE_PSEUDONYMISED_METADATA = b"recsys.pseudonymised_columns"
QUARANTINE_KEY_METADATA = b"recsys.pseudonym_key_fingerprint"

REQUIRED_EVENT_COLUMNS = tuple(f.name for f in EVENTS_SCHEMA if not f.nullable)
REQUIRED_ITEM_COLUMNS = tuple(f.name for f in ITEMS_SCHEMA if not f.nullable)

_PLATFORM_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def validate_platform_name(name: str) -> str:
    """Platform names become directory names and metric labels, so keep them tame."""
    if not _PLATFORM_RE.match(name):
        raise ValueError(
            f"platform name {name!r} is invalid: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise naming the file and the first differing column when a table is not canonical."""
    problems = []
    expected_names = [f.name for f in expected]
    actual_names = [f.name for f in actual]
    missing = [n for n in expected_names if n not in actual_names]
    extra = [n for n in actual_names if n not in expected_names]
    if missing:
        problems.append(f"missing column(s) {missing}")
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    for field in expected:
        if field.name in actual_names:
            got = actual.field(field.name).type
            if got != field.type:
                problems.append(f"column {field.name!r} has type {got}, expected {field.type}")
    if problems:
        raise ValueError(f"{where}: not a canonical {expected.metadata[b'recsys.schema'].decode()} "
                         f"table: " + "; ".join(problems))


# What the serving endpoint logs (``recsys.serving.feedback``): one row per item shown
# (``impression``, with its 1-based ``position`` and ``score``) and one per click / cart /
# purchase posted to ``/feedback`` (no position), under ``<feedback dir>/<platform>/``. User ids
# are already pseudonyms of the key whose fingerprint the file's metadata records
# (``QUARANTINE_KEY_METADATA``); ingest source ``feedback`` refuses another key.
FEEDBACK_EVENT_TYPES: tuple[str, ...] = ("impression", "click", "cart", "purchase")
FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("platform", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=True),  # pseudonym; null: anonymous request
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("position", pa.int32(), nullable=True),  # 1 = shown first; null: feedback
        pa.field("score", pa.float64(), nullable=True),
        pa.field("request_id", pa.string(), nullable=False),  # joins feedback to impressions
        pa.field("model_version", pa.string(), nullable=True),
        pa.field("served_by", pa.string(), nullable=True),  # champion / challenger
        pa.field("source", pa.string(), nullable=True),  # model / popular (impressions)
    ],
    metadata={"recsys.schema": "feedback", "recsys.schema_version": str(SCHEMA_VERSION)},
)
