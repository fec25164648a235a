"""The Parquet lake: one directory per platform, written to a staging dir and swapped in.

A failed ingest leaves the previous version of the platform untouched (never a partial lake).
Events are hash-bucketed by pseudonymous user and sorted by (user, time, source order) inside a
bucket, so all of a user's events sit in one file: sequence building then needs no shuffle.

Each platform's ``report.json`` records the fingerprint of the pseudonym key that hashed it
(``pseudonym_key_fingerprint``); :func:`check_key` compares it with a key about to read or add
to the lake, so that a different key fails loudly instead of finding no user.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.config import ConfigError
from recsys.data.pseudonym import KEY_ENV, KEY_FILE_ENV, Pseudonymizer
from recsys.data.schema import EVENTS_SCHEMA, ITEMS_SCHEMA, check_schema, validate_platform_name
from recsys.data.staging import staged_dir

log = logging.getLogger(__name__)

ROWS_PER_BUCKET = 100_000
MAX_BUCKETS = 256


def platform_dir(lake: str | Path, platform: str) -> Path:
    return Path(lake) / f"platform={platform}"


def list_platforms(lake: str | Path) -> list[str]:
    root = Path(lake)
    if not root.exists():
        return []
    return sorted(p.name.split("=", 1)[1] for p in root.glob("platform=*") if p.is_dir())


def default_num_buckets(num_rows: int) -> int:
    return max(1, min(MAX_BUCKETS, math.ceil(num_rows / ROWS_PER_BUCKET)))


def user_bucket(user_ids: pa.Array | pa.ChunkedArray, num_buckets: int) -> pa.Array:
    """Bucket of each pseudonymous id: its first 8 hex digits mod ``num_buckets``."""
    prefix = pc.utf8_slice_codeunits(user_ids, 0, 8)
    # Hex -> int without a Python loop: parse via dictionary (few distinct users per call).
    enc = pc.dictionary_encode(prefix).combine_chunks() if isinstance(
        prefix, pa.ChunkedArray) else pc.dictionary_encode(prefix)
    values = pa.array([int(h, 16) % num_buckets for h in enc.dictionary.to_pylist()], pa.int32())
    return values.take(enc.indices)


def sort_events(events: pa.Table) -> pa.Table:
    return events.sort_by([("user_id", "ascending"), ("timestamp", "ascending"),
                           ("event_index", "ascending")])


@dataclass(frozen=True)
class PlatformWrite:
    platform: str
    path: Path
    num_buckets: int
    report: dict[str, Any]


def write_platform(
    lake: str | Path,
    platform: str,
    events: pa.Table,
    items: pa.Table,
    quarantine_events: pa.Table,
    quarantine_items: pa.Table,
    report: dict[str, Any],
    num_buckets: int | None = None,
) -> PlatformWrite:
    """Write one platform's partition into a staging dir, then swap it in with two renames."""
    check_schema(events.schema, EVENTS_SCHEMA, f"events of {platform}")
    nb = num_buckets or default_num_buckets(events.num_rows)
    with staged_platform(lake, platform) as staging:
        buckets = user_bucket(events["user_id"], nb)
        for b in range(nb):
            write_bucket(staging, b, events.filter(pc.equal(buckets, b)))
        report = write_platform_rest(staging, platform, items, quarantine_events,
                                     quarantine_items, report, nb)
    return PlatformWrite(platform, platform_dir(lake, platform), nb, report)


@contextmanager
def staged_platform(lake: str | Path, platform: str) -> Iterator[Path]:
    """A staging directory (with ``events/``, ``items/``, ``quarantine/``) that replaces the
    platform's directory on success; on error the previous version stays."""
    validate_platform_name(platform)
    with staged_dir(platform_dir(lake, platform)) as staging:
        for sub in ("events", "items", "quarantine"):
            (staging / sub).mkdir()
        yield staging


def write_bucket(staging: Path, bucket: int, events: pa.Table) -> None:
    """One bucket's events, sorted, into a :func:`staged_platform` directory."""
    pq.write_table(sort_events(events), staging / "events" / f"bucket-{bucket:04d}.parquet")


def write_platform_rest(staging: Path, platform: str, items: pa.Table,
                        quarantine_events: pa.Table | None, quarantine_items: pa.Table,
                        report: dict[str, Any], num_buckets: int) -> dict[str, Any]:
    """Catalog, quarantine (``quarantine_events`` None: already written) and report of a
    :func:`staged_platform` directory; returns the report written."""
    check_schema(items.schema, ITEMS_SCHEMA, f"items of {platform}")
    pq.write_table(items.sort_by("item_id"), staging / "items" / "items.parquet")
    if quarantine_events is not None:
        pq.write_table(quarantine_events, staging / "quarantine" / "events.parquet")
    pq.write_table(quarantine_items, staging / "quarantine" / "items.parquet")
    report = {**report, "num_buckets": num_buckets}
    (staging / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def event_files(lake: str | Path, platform: str) -> list[Path]:
    files = sorted((platform_dir(lake, platform) / "events").glob("bucket-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no event files for platform {platform!r} under {lake}")
    return files


def read_items(lake: str | Path, platform: str) -> pa.Table:
    path = platform_dir(lake, platform) / "items" / "items.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no catalog for platform {platform!r}: {path} is missing")
    table = pq.read_table(path)
    check_schema(table.schema, ITEMS_SCHEMA, str(path))
    return table


def read_events(lake: str | Path, platform: str) -> pa.Table:
    """All events of a platform in one table (for small data, tests and the baseline)."""
    tables = []
    for f in event_files(lake, platform):
        t = pq.read_table(f)
        check_schema(t.schema, EVENTS_SCHEMA, str(f))
        tables.append(t)
    return pa.concat_tables(tables)


def read_report(lake: str | Path, platform: str) -> dict[str, Any]:
    return json.loads((platform_dir(lake, platform) / "report.json").read_text())


class PlatformTables(NamedTuple):
    """One platform of the lake read whole: its ingest report, events and catalog."""

    report: dict[str, Any]
    events: pa.Table
    items: pa.Table


def read_platform(lake: str | Path, platform: str) -> PlatformTables:
    """Report, all events and the catalog of a platform (small data: tests, tools)."""
    return PlatformTables(read_report(lake, platform), read_events(lake, platform),
                          read_items(lake, platform))


# -- the pseudonym key of a lake ------------------------------------------------------------------


class KeyMismatchError(ConfigError):
    """The lake was pseudonymised with another key than the one in hand (a configuration
    error: the CLI prints it without a traceback)."""


@dataclass(frozen=True)
class LakeKey:
    """What a platform's report says about the key that pseudonymised it."""

    platform: str
    fingerprint: str | None  # None: an old lake (or no report) that did not record it
    source: str | None


def lake_keys(lake: str | Path, platforms: Iterable[str] | None = None) -> list[LakeKey]:
    """The recorded key fingerprint of each platform (default: every platform of the lake)."""
    names = list(platforms) if platforms is not None else list_platforms(lake)
    out = []
    for name in names:
        path = platform_dir(lake, name) / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        out.append(LakeKey(name, report.get("pseudonym_key_fingerprint"),
                           report.get("pseudonym_key_source")))
    return out


def check_key(lake: str | Path, pseudonymizer: Pseudonymizer,
              platforms: Iterable[str] | None = None, *, purpose: str) -> list[LakeKey]:
    """Raise :class:`KeyMismatchError` if a platform of ``lake`` (default: all) was
    pseudonymised with another key than ``pseudonymizer``'s; warn for platforms that recorded
    no fingerprint. ``purpose`` ("serve", "ingest into") goes into the message. Returns what
    the lake recorded."""
    keys = lake_keys(lake, platforms)
    mine = pseudonymizer.fingerprint
    unknown = [k.platform for k in keys if k.fingerprint is None]
    if unknown:
        log.warning("lake %s: platform(s) %s recorded no pseudonym key fingerprint (ingested "
                    "before fingerprints were kept); cannot check that key %s (from %s) is "
                    "the one that pseudonymised them: re-ingest them to record it", lake,
                    unknown, mine, pseudonymizer.described_source)
    wrong = [k for k in keys if k.fingerprint is not None and k.fingerprint != mine]
    if wrong:
        theirs = "; ".join(f"{k.platform}: fingerprint {k.fingerprint} (key from "
                           f"{k.source or 'an unrecorded source'} at ingest)" for k in wrong)
        raise KeyMismatchError(
            f"cannot {purpose} lake {lake} with pseudonym key fingerprint {mine} (key from "
            f"{pseudonymizer.described_source}): it was pseudonymised with another key, so no "
            f"user would be found (or users would not link across platforms). Lake: {theirs}. "
            f"Use the key that ingested the lake (${KEY_ENV} as hex, or ${KEY_FILE_ENV} / "
            "the key file), or re-ingest every platform with this key into a new lake.")
    return keys
