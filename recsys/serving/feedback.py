"""The impression and feedback log of a gateway replica: what was shown, and what users did.

Every answer of /recommend becomes one ``impression`` row per item shown, and every POST
/feedback one ``click`` / ``cart`` / ``purchase`` row, in ``recsys.data.schema.FEEDBACK_SCHEMA``.
The request path only puts one record on a bounded in-memory queue (``put_nowait``: a full queue
drops the record and counts its rows in ``recsys_feedback_dropped``, it never waits); a daemon
thread pseudonymises the user ids with the serving key, batches the rows and writes

    <feedback.dir>/<platform>/served-<UTC time>-<host>-<pid>-<seq>.parquet

atomically (a hidden temporary file, then a rename) every ``flush_every`` rows or
``flush_interval_s`` seconds, and at shutdown. No raw user id reaches the disk: the file's
metadata records the key's fingerprint, and ingest source ``feedback``
(``recsys.data.ingest.feedback``) refuses files of another key than the lake's.

The serving side cannot check a request id across replicas cheaply: a click names the answer's
``request_id`` and ingest / the drift monitor join on it.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import FEEDBACK_SCHEMA, QUARANTINE_KEY_METADATA
from recsys.serving.args import AppArgs, local_path, serving_pseudonymizer
from recsys.serving.metrics import FeedbackMetrics
from recsys.serving.schemas import FeedbackRequest, RecommendResponse

log = logging.getLogger("recsys.serve.feedback")

FILE_PREFIX = "served-"


@dataclass(frozen=True, slots=True)
class Record:
    """One answer (its items) or one posted event, as the request path queues it: cheap to
    make, the raw user id only in memory."""

    platform: str
    label: str  # the platform's metric label (bounded: ``PlatformLabels``)
    user_id: str | None  # raw: the writer pseudonymises it
    event_type: str
    timestamp: float  # seconds since the epoch, UTC
    request_id: str
    item_ids: tuple[str, ...]
    scores: tuple[float, ...] | None = None  # impressions: one per item, in shown order
    model_version: str | None = None
    served_by: str | None = None
    source: str | None = None

    @property
    def rows(self) -> int:
        return len(self.item_ids)


_STOP = object()


class FeedbackLog:
    """A bounded queue and its writer thread. ``served`` / ``feedback`` are the request path
    (they return whether the record was queued); ``close`` writes what is left."""

    def __init__(self, root: str | Path, pseudonymizer: Pseudonymizer, *, queue_size: int,
                 flush_every: int, flush_interval_s: float,
                 metrics: FeedbackMetrics | None = None,
                 name: str | None = None) -> None:
        self.root = Path(root)
        self.pseudonymizer = pseudonymizer
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self.metrics = metrics  # None: not counted (tests without Ray)
        self.name = name or f"{_safe(socket.gethostname())}-{os.getpid()}"
        self.dropped = 0  # rows, this replica's lifetime (the counter is the durable figure)
        self.written = 0
        self.files: list[Path] = []
        self._queue: queue.Queue[Record | object] = queue.Queue(maxsize=queue_size)
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    # -- the request path -------------------------------------------------------------------------

    def served(self, user_id: str | None, out: RecommendResponse, label: str) -> bool:
        """Queue the impressions of one answer (nothing for an empty one)."""
        if not out.items:
            return True
        return self._put(Record(
            out.platform, label, user_id, "impression", time.time(), out.request_id,
            tuple(i.item_id for i in out.items), tuple(i.score for i in out.items),
            out.model_version, out.served_by, out.source))

    def feedback(self, body: FeedbackRequest, label: str) -> bool:
        ts = body.timestamp
        when = time.time() if ts is None else (
            ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)).timestamp()
        return self._put(Record(body.platform, label, body.user_id, body.event_type, when,
                                body.request_id, (body.item_id,)))

    def _put(self, record: Record) -> bool:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += record.rows
            self._count("dropped", record.rows, platform=record.label, reason="queue_full")
            return False
        self._count("logged", record.rows, platform=record.label, event_type=record.event_type)
        return True

    def _count(self, counter: str, n: int, **tags: str) -> None:
        if self.metrics is not None and n:
            getattr(self.metrics, counter).inc(n, tags=tags)

    # -- the writer thread ------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued and stop the writer (waits at most ``timeout_s``)."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("feedback log: the writer did not drain the queue in %.0f s", timeout_s)
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        pending: list[Record] = []
        rows, deadline = 0, time.monotonic() + self.flush_interval_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                self._flush(pending)
                return
            if isinstance(item, Record):
                pending.append(item)
                rows += item.rows
            if rows >= self.flush_every or time.monotonic() >= deadline:
                self._flush(pending)
                pending, rows = [], 0
                deadline = time.monotonic() + self.flush_interval_s

    def _flush(self, records: list[Record]) -> None:
        """One file per platform; a failed write is logged and its rows counted as dropped
        (the thread goes on: the next batch may well succeed)."""
        by_platform: dict[str, list[Record]] = {}
        for r in records:
            by_platform.setdefault(r.platform, []).append(r)
        for platform, recs in by_platform.items():
            n = sum(r.rows for r in recs)
            try:
                self.files.append(self._write(platform, recs))
            except Exception:
                log.exception("feedback log: could not write %d rows of %s under %s", n,
                              platform, self.root)
                self.dropped += n
                self._count("dropped", n, platform=recs[0].label, reason="write_failed")
                continue
            self.written += n
            self._count("written", n, platform=recs[0].label)

    def _write(self, platform: str, records: list[Record]) -> Path:
        table = to_table(records, self.pseudonymizer.many)
        meta = {**(table.schema.metadata or {}),
                QUARANTINE_KEY_METADATA: self.pseudonymizer.fingerprint.encode()}
        table = table.replace_schema_metadata(meta)
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        out = self.root / platform / f"{FILE_PREFIX}{stamp}-{self.name}-{self._seq:06d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")  # ingest reads *.parquet only: never a half file
        pq.write_table(table, tmp)
        os.replace(tmp, out)
        return out


def to_table(records: list[Record],
             pseudonymise: Callable[[list[str | None]], list[str | None]]) -> pa.Table:
    """The rows of ``records`` in ``FEEDBACK_SCHEMA``, user ids through ``pseudonymise``."""
    cols: dict[str, list] = {f.name: [] for f in FEEDBACK_SCHEMA}
    users: list[str | None] = []
    for r in records:
        n = r.rows
        impression = r.scores is not None
        users += [r.user_id] * n
        cols["platform"] += [r.platform] * n
        cols["item_id"] += r.item_ids
        cols["event_type"] += [r.event_type] * n
        cols["timestamp"] += [round(r.timestamp * 1_000_000)] * n
        cols["position"] += list(range(1, n + 1)) if impression else [None] * n
        cols["score"] += r.scores if impression else [None] * n
        cols["request_id"] += [r.request_id] * n
        cols["model_version"] += [r.model_version] * n
        cols["served_by"] += [r.served_by] * n
        cols["source"] += [r.source] * n
    cols["user_id"] = pseudonymise(users)
    return pa.Table.from_pydict(cols, schema=FEEDBACK_SCHEMA)


def open_log(args: AppArgs) -> FeedbackLog | None:
    """The log an app's ``feedback`` args ask for, counted in Serve metrics; None when off.
    Fails (no pseudonym key) rather than log raw user ids."""
    cfg = args.feedback
    if cfg.dir is None:
        return None
    return FeedbackLog(local_path(cfg.dir), serving_pseudonymizer(), queue_size=cfg.queue_size,
                       flush_every=cfg.flush_every, flush_interval_s=cfg.flush_interval_s,
                       metrics=FeedbackMetrics())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40] or "host"
