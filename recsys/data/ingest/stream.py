"""Streaming ingest of a ``generic`` source in bounded memory (``IngestOptions.chunk_rows``).

The in-memory path (:func:`recsys.data.ingest.generic.read` then
:func:`~recsys.data.ingest.finalize.finalize`) holds every event at once. This one reads the
files ``chunk_rows`` rows at a time (:func:`~recsys.data.ingest.tables.iter_table`: Parquet row
batches, CSV and JSON-lines chunk readers) and applies to each chunk the same per-row parsing
(:func:`~recsys.data.ingest.generic.event_frame`) and checks
(:func:`~recsys.data.ingest.finalize.check_events`), quarantining rejected rows with the same
file, row, column and reason. Each chunk's events are pseudonymised, assigned to their user
bucket (:func:`~recsys.data.lake.user_bucket`) and appended to that bucket's spill file (an
Arrow IPC stream per bucket, LZ4-compressed, inside the staging directory); rejected rows go to
a spill file too. After the last chunk each bucket is read alone, sorted and written as
``events/bucket-NNNN.parquet``, so peak memory is one chunk or one bucket, whichever is larger
(a Parquet source is read a row group at a time, so a huge row group counts as a chunk), plus:

* the catalog, held in memory: O(items). Without an items file it is built from the events'
  title column in a first pass that reads only the item columns, keeping per item id its first
  row and its first row with a title (what the in-memory path picks from);
* the distinct item ids with events (for ``items_with_events``): O(items);
* a cache of pseudonyms across chunks (:class:`CachedPseudonymizer`), capped at
  :data:`PSEUDONYM_CACHE` ids (about 100 MB).

Measured (``bench/scale.py``, docs/scale.md), peak RSS still grew about 16 MB per million events
of the benchmark's log (the in-memory path: 444 MB), whatever the chunk size; part of it was
freed pages that Arrow's allocator (mimalloc) kept, which each chunk now hands back.

The lake is the one the in-memory path writes: same layout, schemas, report keys and ledger
invariant; users are disjoint across buckets, so ``users`` is the sum of per-bucket distinct
counts. The write is atomic (:func:`~recsys.data.lake.staged_platform`): a failed ingest
leaves the previous version. Differences, by construction:

* the number of buckets is chosen before any row is read (:func:`bucket_count`): the
  ``buckets`` option if given, else from the row count estimated from the files (exact
  Parquet metadata; CSV/JSON lines: file size over the mean line length of the first MiB), and
  :data:`~recsys.data.lake.MAX_BUCKETS` for compressed text files, whose size says little.
  The in-memory path counts rows out, so the two can differ when many rows are rejected;
* quarantined events are in source order (chunk by chunk), not grouped by reason;
* the epoch unit of numeric timestamps is the one the first chunk's median chose, and the
  report's ``quirks`` has a ``streaming`` entry;
* k-core (``min_user_events``/``min_item_events`` > 1) needs every event at once: refused
  (by :class:`~recsys.data.ingest.base.IngestOptions`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.ingest.base import IngestOptions, Ledger
from recsys.data.ingest.finalize import (
    check_balance,
    check_events,
    check_items,
    events_table,
    ingest_report,
    items_table,
)
from recsys.data.ingest.generic import (
    Plan,
    catalog_from_events,
    catalog_rows,
    event_frame,
    plan,
    read_catalog,
)
from recsys.data.ingest.parsing import id_text
from recsys.data.ingest.tables import estimate_rows, iter_table
from recsys.data.lake import (
    MAX_BUCKETS,
    PlatformWrite,
    default_num_buckets,
    platform_dir,
    staged_platform,
    user_bucket,
    write_bucket,
    write_platform_rest,
)
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENTS_SCHEMA

log = logging.getLogger(__name__)

PSEUDONYM_CACHE = 1 << 19


@dataclass
class StreamLedger(Ledger):
    """A ledger whose quirks add up over chunks: counts are summed, lists merged, anything else
    is the latest value."""

    def quirk(self, name: str, value: Any) -> None:
        old = self.quirks.get(name)
        if isinstance(old, int) and isinstance(value, int) and not isinstance(value, bool):
            value = old + value
        elif isinstance(old, list) and isinstance(value, list):
            value = old + [v for v in value if v not in old]
        self.quirks[name] = value


def bucket_count(opts: IngestOptions, files: list[Path]) -> tuple[int, str]:
    """User buckets of a streaming ingest, chosen before reading: (count, how it was chosen)."""
    if opts.buckets:
        return opts.buckets, "buckets option"
    estimates = [estimate_rows(f) for f in files]
    if any(e is None for e in estimates):
        return MAX_BUCKETS, "maximum (compressed text: row count unknown)"
    return default_num_buckets(sum(e or 0 for e in estimates)), "estimated row count"


def chunks(files: list[Path], columns: list[str], chunk_rows: int,
           ledger: Ledger) -> Iterator[tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """Source rows chunk by chunk, file after file: (frame, _file per row, _row per row), the
    file labels and row numbers the in-memory read gives."""
    for f in files:
        for df, first_row, encoding in iter_table(f, columns, chunk_rows):
            if encoding not in (None, "utf-8"):
                ledger.quirk(f"encoding:{f.name}", f"{encoding} (not valid UTF-8)")
            yield (df, np.full(len(df), str(f), dtype=object),
                   np.arange(first_row, first_row + len(df), dtype=np.int64))


def catalog_pass(p: Plan, chunk_rows: int, ledger: Ledger) -> pd.DataFrame:
    """The catalog from the events' item columns, reading only those (first pass): keeps the
    candidate rows of each item id (:func:`~recsys.data.ingest.generic.catalog_rows`), O(items)."""
    id_col = p.columns["item_id"]
    needed = sorted({id_col, *p.item_columns.values()})
    raw = pd.DataFrame(columns=needed)
    ids = pd.DataFrame({"item_id": pd.Series(dtype="string"), "_row": np.empty(0, np.int64)})
    for df, _, rows in chunks(p.files, needed, chunk_rows, ledger):
        item_ids, _ = id_text(df[id_col])
        raw = pd.concat([raw, df[needed]], ignore_index=True) if len(raw) else df[needed]
        part = pd.DataFrame({"item_id": item_ids.to_numpy(), "_row": rows})
        ids = pd.concat([ids, part], ignore_index=True) if len(ids) else part
        keep = catalog_rows(raw, ids, p.item_columns, titled_only=False)
        raw = raw.iloc[keep].reset_index(drop=True)
        ids = ids.iloc[keep].reset_index(drop=True)
    return catalog_from_events(raw, ids, p.item_columns, p.path, ledger)


class CachedPseudonymizer(Pseudonymizer):
    """``inner``'s pseudonyms, remembered across chunks (a user's events span many): at most
    ``limit`` per prefix, all forgotten when full, so memory stays bounded (~100 MB at 2^19)."""

    def __init__(self, inner: Pseudonymizer, limit: int = PSEUDONYM_CACHE) -> None:
        self.inner, self.limit, self.source = inner, limit, inner.source
        self.cache: dict[str, dict[str, str]] = {}

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def one(self, raw_id: str, *, prefix: str = "") -> str:
        return self.inner.one(raw_id, prefix=prefix)

    def many(self, raw_ids: Iterable[str | None], *, prefix: str = "") -> list[str | None]:
        values = list(raw_ids)
        cache = self.cache.setdefault(prefix, {})
        wanted = {v for v in values if v is not None}
        missing = wanted - cache.keys()
        if len(cache) + len(missing) > self.limit:
            cache.clear()
            missing = wanted
        for v in missing:
            cache[v] = self.inner.one(v, prefix=prefix)
        return [None if v is None else cache[v] for v in values]


class Spill:
    """Per-bucket spill files of pseudonymised events (Arrow IPC, LZ4: cheap to write and read
    back) and one of quarantined rows, plus what the report needs from the events (counted
    chunk by chunk)."""

    def __init__(self, root: Path, num_buckets: int) -> None:
        self.root, self.num_buckets = root, num_buckets
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.quarantine: pq.ParquetWriter | None = None
        self.event_types: Counter[str] = Counter()
        self.items: set[str] = set()
        self.first: Any = None
        self.last: Any = None

    def add(self, table: pa.Table) -> None:
        """Append a chunk of canonical events to their buckets' files."""
        if table.num_rows == 0:
            return
        for r in pc.value_counts(table["event_type"]).to_pylist():
            self.event_types[r["values"]] += r["counts"]
        self.items.update(pc.unique(table["item_id"]).to_pylist())
        lo, hi = pc.min_max(table["timestamp"]).values()
        self.first = lo.as_py() if self.first is None else min(self.first, lo.as_py())
        self.last = hi.as_py() if self.last is None else max(self.last, hi.as_py())
        buckets = user_bucket(table["user_id"], self.num_buckets)
        order = pc.sort_indices(buckets)
        table, bs = table.take(order), buckets.take(order).to_numpy()
        starts = np.concatenate([[0], np.flatnonzero(np.diff(bs)) + 1])
        for start, end in zip(starts, [*starts[1:], len(bs)]):
            b = int(bs[start])
            if b not in self.writers:
                self.writers[b] = pa.ipc.new_stream(
                    pa.OSFile(str(self.root / f"{b}.arrow"), "wb"), EVENTS_SCHEMA,
                    options=pa.ipc.IpcWriteOptions(compression="lz4"))
            self.writers[b].write_table(table.slice(start, end - start))

    def add_quarantine(self, ledger: Ledger) -> None:
        """Move the ledger's quarantined event rows to the spill file (the counts stay)."""
        for frame in ledger.events.frames:
            if self.quarantine is None:
                schema = pa.Table.from_pandas(frame, preserve_index=False).schema
                self.quarantine = pq.ParquetWriter(self.root / "quarantine.parquet", schema)
            self.quarantine.write_table(pa.Table.from_pandas(
                frame, schema=self.quarantine.schema, preserve_index=False))
        ledger.events.frames.clear()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        if self.quarantine is not None:
            self.quarantine.close()

    def write_buckets(self, staging: Path) -> int:
        """Sort each bucket alone into the lake; returns the distinct users (summed over
        buckets, whose users are disjoint)."""
        users = 0
        for b in range(self.num_buckets):
            path = self.root / f"{b}.arrow"
            if path.exists():
                with pa.OSFile(str(path), "rb") as source:
                    events = pa.ipc.open_stream(source).read_all()
            else:
                events = EVENTS_SCHEMA.empty_table()
            users += pc.count_distinct(events["user_id"]).as_py()
            write_bucket(staging, b, events)
            path.unlink(missing_ok=True)
        return users

    def write_quarantine(self, staging: Path, ledger: Ledger, drop: list[str]) -> None:
        """The quarantined events (without the ``drop`` columns), as the in-memory path writes
        them, batch by batch."""
        path = self.root / "quarantine.parquet"
        out = staging / "quarantine" / "events.parquet"
        if not path.exists():
            pq.write_table(ledger.quarantine_table("events"), out)
            return
        writer = None
        for batch in pq.ParquetFile(path).iter_batches():
            frame = batch.to_pandas().drop(columns=drop)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}),
                                                     **ledger.quarantine_metadata("events")})
                writer = pq.ParquetWriter(out, schema)
            writer.write_table(table.cast(writer.schema))
        if writer is not None:
            writer.close()

    def stats(self, users: int) -> dict[str, Any]:
        """The report's event summary (as :func:`~recsys.data.ingest.finalize.event_stats`)."""
        return {"users": users, "items_with_events": len(self.items),
                "first_event": None if self.first is None else str(self.first),
                "last_event": None if self.last is None else str(self.last),
                "event_types": dict(self.event_types)}


def ingest_stream(opts: IngestOptions, pseudo: Pseudonymizer, key_source: str) -> PlatformWrite:
    """Ingest a generic source chunk by chunk into the lake (see the module docstring)."""
    if opts.chunk_rows is None or opts.source != "generic":
        raise ValueError("streaming ingest needs source 'generic' and chunk_rows")
    started = time.perf_counter()
    p = plan(opts)
    ledger = StreamLedger(pseudo)
    cached = CachedPseudonymizer(pseudo)
    source = str(p.path)
    if opts.items_path is not None:
        items = read_catalog(Path(opts.items_path), opts.item_columns, ledger)
    else:
        items = catalog_pass(p, opts.chunk_rows, ledger)
    items = check_items(items, ledger, source)
    ledger.items.rows_out = len(items)
    catalog_ids = items["item_id"]
    nb, how = bucket_count(opts, p.files)

    with staged_platform(opts.out, p.platform) as staging:
        spill = Spill(staging / ".spill", nb)
        spill.root.mkdir()
        n_chunks = 0
        try:
            for df, files, rows in chunks(p.files, sorted(set(p.columns.values())),
                                          opts.chunk_rows, ledger):
                events = event_frame(df, p.columns, opts, ledger, files, rows,
                                     ledger.events.rows_in, keep_source_timestamp=True,
                                     epoch_unit=ledger.quirks.get("timestamp_epoch_unit"))
                ledger.events.rows_in += len(df)
                del df
                events = check_events(events, catalog_ids, ledger, source)
                ledger.events.rows_out += len(events)
                spill.add(events_table(p.platform, events, cached))
                spill.add_quarantine(ledger)
                n_chunks += 1
                # mimalloc (Arrow's default pool) keeps freed pages; without this the process
                # grows with the chunks read, not with one chunk.
                pa.default_memory_pool().release_unused()
        finally:
            spill.close()
        check_balance(ledger)
        users = spill.write_buckets(staging)
        # The in-memory path keeps the source text of timestamps only when one is unparseable.
        spill.write_quarantine(staging, ledger, [] if "unparseable_timestamps" in ledger.quirks
                               else ["source_timestamp"])
        shutil.rmtree(spill.root)
        ledger.quirk("column_mapping", {"events": p.columns,
                                        "items": opts.item_columns or "defaults"})
        ledger.quirk("streaming", {"chunk_rows": opts.chunk_rows, "chunks": n_chunks,
                                   "buckets_from": how})
        report = ingest_report(opts, p.platform, ledger, spill.stats(users), len(items), pseudo,
                               key_source, time.perf_counter() - started)
        report = write_platform_rest(staging, p.platform, items_table(p.platform, items), None,
                                     ledger.quarantine_table("items"), report, nb)
    ev = report["events"]
    log.info("ingested %s/%s in %d chunks: %d rows in -> %d out, %d quarantined, %d filtered",
             opts.source, p.platform, n_chunks, ev["rows_in"], ev["rows_out"],
             ev["rows_quarantined"], ev["rows_filtered"])
    return PlatformWrite(p.platform, platform_dir(opts.out, p.platform), nb, report)


__all__ = ["Spill", "StreamLedger", "bucket_count", "catalog_pass", "chunks", "ingest_stream"]
