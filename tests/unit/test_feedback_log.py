"""The gateway's impression and feedback log (issue 23): the request path only queues (a full
queue drops and counts, never blocks), a thread writes pseudonymised Parquet files atomically.
Unit tier: the log without Ray (a recording stand-in for the Serve counters)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import FEEDBACK_SCHEMA, QUARANTINE_KEY_METADATA
from recsys.serving import feedback as fb
from recsys.serving.args import AppArgs
from recsys.serving.schemas import FeedbackRequest, Item, RecommendResponse

PSEUDO = Pseudonymizer(bytes.fromhex("00112233445566778899aabbccddeeff"))


class Recorded:
    """Stands in for a ray.serve.metrics.Counter: sums per tag set."""

    def __init__(self) -> None:
        self.counts: Counter[tuple] = Counter()

    def inc(self, n: int = 1, tags: dict[str, str] | None = None) -> None:
        self.counts[tuple(sorted((tags or {}).items()))] += n

    def total(self, **tags: str) -> int:
        return sum(n for k, n in self.counts.items() if set(tags.items()) <= set(k))


class Metrics:
    def __init__(self) -> None:
        self.logged, self.dropped, self.written = Recorded(), Recorded(), Recorded()


def answer(n: int = 3, platform: str = "shop_a", **kw: object) -> RecommendResponse:
    items = [Item(item_id=f"{platform}-{i:03d}", title=f"t{i}", score=1.0 - i / 10)
             for i in range(n)]
    return RecommendResponse(platform=platform, source="model", items=items,
                             model_version="3", **kw)


def make_log(root: Path, **kw: object) -> tuple[fb.FeedbackLog, Metrics]:
    metrics = Metrics()
    opts = {"queue_size": 100, "flush_every": 1000, "flush_interval_s": 60.0, **kw}
    return fb.FeedbackLog(root, PSEUDO, metrics=metrics, **opts), metrics  # type: ignore[arg-type]


def test_rows_are_pseudonymised_positioned_and_written_atomically_on_close(
        tmp_path: Path) -> None:
    log, metrics = make_log(tmp_path)
    out = answer(3, served_by="challenger")
    assert log.served("alice", out, "shop_a")
    assert log.served(None, answer(2), "shop_a")  # anonymous: no user, still an impression
    click = FeedbackRequest(platform="shop_a", request_id=out.request_id, user_id=" alice",
                            item_id="shop_a-001", event_type="click",
                            timestamp=datetime(2026, 1, 2, 3, 4, 5))
    assert log.feedback(click, "shop_a")
    log.close()
    (path,) = log.files
    assert path.parent == tmp_path / "shop_a" and path.name.startswith("served-")
    assert not list(tmp_path.rglob("*.tmp"))
    table = pq.read_table(path)
    assert table.schema.equals(FEEDBACK_SCHEMA, check_metadata=False)
    assert table.schema.metadata[QUARANTINE_KEY_METADATA] == PSEUDO.fingerprint.encode()
    rows = table.to_pylist()
    assert len(rows) == 6 and metrics.written.total() == 6 and metrics.logged.total() == 6
    shown = [r for r in rows if r["request_id"] == out.request_id and
             r["event_type"] == "impression"]
    assert [r["position"] for r in shown] == [1, 2, 3]
    assert [r["item_id"] for r in shown] == [i.item_id for i in out.items]
    assert {(r["served_by"], r["model_version"], r["source"]) for r in shown} == {
        ("challenger", "3", "model")}
    (clicked,) = [r for r in rows if r["event_type"] == "click"]
    assert clicked["user_id"] == PSEUDO.one("alice") == shown[0]["user_id"]  # normalised
    assert clicked["position"] is None and clicked["score"] is None
    assert clicked["timestamp"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # naive: UTC
    assert sum(r["user_id"] is None for r in rows) == 2
    assert b"alice" not in path.read_bytes()  # never the raw id on disk


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = threading.Event(), threading.Event()
    real_write = fb.FeedbackLog._write

    def slow_write(self: fb.FeedbackLog, platform: str, records: list) -> Path:
        writing.set()
        release.wait(10)
        return real_write(self, platform, records)

    monkeypatch.setattr(fb.FeedbackLog, "_write", slow_write)
    log, metrics = make_log(tmp_path, queue_size=2, flush_every=1)
    assert log.served("u1", answer(3), "shop_a")  # the writer takes it and blocks on disk
    assert writing.wait(5)
    started = time.perf_counter()
    assert log.served("u2", answer(3), "shop_a") and log.served("u3", answer(3), "shop_a")
    assert not log.served("u4", answer(3), "shop_a")  # full: dropped, not waited for
    assert not log.feedback(FeedbackRequest(platform="shop_a", request_id="0" * 32,
                                            item_id="x", event_type="cart"), "shop_a")
    assert time.perf_counter() - started < 0.5
    assert log.dropped == 4
    assert metrics.dropped.total(reason="queue_full", platform="shop_a") == 4
    release.set()
    log.close()
    assert sum(pq.read_metadata(f).num_rows for f in log.files) == 9 == log.written


def test_files_come_every_n_rows_or_t_seconds(tmp_path: Path) -> None:
    log, _ = make_log(tmp_path / "by-count", flush_every=4)
    for _ in range(2):
        log.served("u", answer(2), "shop_a")
    deadline = time.monotonic() + 10
    while not log.files and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(log.files) == 1  # 4 rows: written without waiting for the interval
    timed, _ = make_log(tmp_path / "by-time", flush_interval_s=0.1)
    timed.served("u", answer(1, platform="shop_b"), "shop_b")
    deadline = time.monotonic() + 10
    while not timed.files and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [f.parent.name for f in timed.files] == ["shop_b"]
    log.close()
    timed.close()


def test_a_failed_write_is_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log, metrics = make_log(blocker, flush_every=1)
    log.served("u", answer(2), "shop_a")
    deadline = time.monotonic() + 10
    while log.dropped < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metrics.dropped.total(reason="write_failed") == 2
    assert log._thread.is_alive()
    log.close()


def test_the_app_args_switch_it_on_and_refuse_unknown_keys(tmp_path: Path) -> None:
    from pydantic import ValidationError

    assert AppArgs().feedback.dir is None and fb.open_log(AppArgs()) is None
    with pytest.raises(ValidationError, match="flush_evry"):
        AppArgs.model_validate({"feedback": {"flush_evry": 3}})
    with pytest.raises(ValidationError, match="queue_size"):
        AppArgs.model_validate({"feedback": {"queue_size": 0}})
    with pytest.raises(ValidationError, match="request_id"):
        FeedbackRequest(platform="shop_a", request_id="not-an-id", item_id="x",
                        event_type="click")
    with pytest.raises(ValidationError, match="event_type"):
        FeedbackRequest(platform="shop_a", request_id="0" * 32, item_id="x",
                        event_type="impression")
