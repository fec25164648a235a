"""Ingest source ``feedback`` (issue 23): the serving log's files are added to a platform of the
lake through the common checks, bad rows quarantined with file, row and reason, user ids kept as
the pseudonyms they already are, files of another key refused. Unit tier: no Ray."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.feedback import read_feedback
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENTS_SCHEMA, FEEDBACK_SCHEMA, ITEMS_SCHEMA, QUARANTINE_KEY_METADATA
from recsys.serving.feedback import FeedbackLog
from recsys.serving.schemas import FeedbackRequest, Item, RecommendResponse

PSEUDO = Pseudonymizer(bytes.fromhex("00112233445566778899aabbccddeeff"))
T0 = datetime(2026, 1, 1, tzinfo=UTC)
ITEMS = [f"i{n}" for n in range(1, 6)]


def make_lake(root: Path) -> Path:
    """Platform ``shop``: five items, alice viewed i1 then i2."""
    events = pa.Table.from_pylist([
        {"platform": "shop", "user_id": PSEUDO.one("alice"), "item_id": item,
         "event_type": "view", "timestamp": T0 + timedelta(minutes=n), "quantity": None,
         "price": None, "session_id": None, "event_index": n}
        for n, item in enumerate(["i1", "i2"])], schema=EVENTS_SCHEMA)
    items = pa.Table.from_pylist([{"platform": "shop", "item_id": i, "title": f"title {i}",
                                   "description": None, "brand": None, "category": ["a", "b"],
                                   "price": None} for i in ITEMS], schema=ITEMS_SCHEMA)
    empty = pa.table({"_reason": pa.array([], pa.string())})
    lake.write_platform(root, "shop", events, items, empty, empty,
                        {"source": "generic", "pseudonym_key_fingerprint": PSEUDO.fingerprint})
    return root


def served_log(root: Path, pseudo: Pseudonymizer = PSEUDO) -> str:
    """What a gateway logs: alice is shown i3, i4, i5 and clicks i4; an anonymous request."""
    log = FeedbackLog(root, pseudo, queue_size=10, flush_every=100, flush_interval_s=60)
    items = [Item(item_id=i, title=i, score=0.5) for i in ("i3", "i4", "i5")]
    out = RecommendResponse(platform="shop", source="model", items=items, model_version="2")
    log.served("alice", out, "shop")
    log.served(None, out.model_copy(update={"request_id": "f" * 32}), "shop")
    log.feedback(FeedbackRequest(platform="shop", request_id=out.request_id, user_id="alice",
                                 item_id="i4", event_type="click"), "shop")
    log.close()
    return out.request_id


def bad_file(root: Path) -> Path:
    """One bad row per rule, in FEEDBACK_SCHEMA with the lake's key."""
    good = {"platform": "shop", "user_id": PSEUDO.one("bob"), "item_id": "i1",
            "event_type": "click", "timestamp": T0, "position": None, "score": None,
            "request_id": "a" * 32, "model_version": "2", "served_by": "champion",
            "source": None}
    rows = [{**good, "item_id": "i999"},                            # 1 item_not_in_catalog
            {**good, "event_type": "like"},                         # 2 unknown_event_type
            {**good, "request_id": ""},                             # 3 missing_request_id
            {**good, "event_type": "impression"},                   # 4 invalid_position
            {**good, "user_id": "carol@example.com"},               # 5 not_a_pseudonym
            {**good, "platform": "shop_x"},                         # 6 platform_mismatch
            good, good]                                             # 7 kept, 8 duplicate
    table = pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           QUARANTINE_KEY_METADATA: PSEUDO.fingerprint.encode()})
    path = root / "shop" / "manual-0001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def opts(lake_dir: Path, log_dir: Path) -> IngestOptions:
    return IngestOptions(source="feedback", out=lake_dir, path=log_dir, platform="shop")


def test_feedback_is_added_to_the_platform_through_the_common_checks(tmp_path: Path) -> None:
    lake_dir, log_dir = make_lake(tmp_path / "lake"), tmp_path / "log"
    request = served_log(log_dir)
    bad = bad_file(log_dir)
    (written,) = ingest(opts(lake_dir, log_dir), PSEUDO)
    ev = written.report["events"]
    assert ev["invariant_holds"] and ev["rows_in"] == 2 + 7 + 8
    assert ev["quarantined_by_reason"] == {
        "invalid_position": 1, "item_not_in_catalog": 1, "missing_request_id": 1,
        "not_a_pseudonym": 1, "platform_mismatch": 1, "unknown_event_type": 1}
    assert ev["filtered_by_rule"] == {"anonymous": 3, "duplicate": 1}
    events = lake.read_events(lake_dir, "shop").to_pylist()
    alice, bob = PSEUDO.one("alice"), PSEUDO.one("bob")
    assert sorted((e["item_id"], e["event_type"]) for e in events if e["user_id"] == alice) == [
        ("i1", "view"), ("i2", "view"), ("i3", "impression"), ("i4", "click"),
        ("i4", "impression"), ("i5", "impression")]   # not hashed a second time
    assert [(e["item_id"], e["event_type"]) for e in events if e["user_id"] == bob] == [
        ("i1", "click")]
    assert len({e["event_index"] for e in events}) == len(events) == 7
    quarantine = pq.read_table(lake.platform_dir(lake_dir, "shop") / "quarantine" /
                               "events.parquet")
    rows = {r["_reason"]: r for r in quarantine.to_pylist()}
    assert rows["item_not_in_catalog"]["_file"] == str(bad)
    assert rows["item_not_in_catalog"]["_row"] == 1 and rows["platform_mismatch"]["_row"] == 6
    assert rows["not_a_pseudonym"]["user_id"] == PSEUDO.one("carol@example.com")
    assert b"carol" not in quarantine.to_string().encode()
    assert lake.read_items(lake_dir, "shop").num_rows == 5
    # The monitor's view: per-request rows with arm and version, clicks joined on request_id.
    log = read_feedback(log_dir, "shop", PSEUDO.fingerprint).to_pylist()
    assert {r["event_type"] for r in log if r["request_id"] == request} == {"impression",
                                                                            "click"}

    # Again: nothing is added twice, the quarantine is not doubled.
    (again,) = ingest(opts(lake_dir, log_dir), PSEUDO)
    assert again.report["events"]["filtered_by_rule"]["already_in_lake"] == 5
    assert lake.read_events(lake_dir, "shop").num_rows == 7
    assert pq.read_metadata(lake.platform_dir(lake_dir, "shop") / "quarantine" /
                            "events.parquet").num_rows == 6


def test_files_of_another_key_and_unknown_platforms_are_refused(tmp_path: Path) -> None:
    lake_dir, log_dir = make_lake(tmp_path / "lake"), tmp_path / "log"
    other = Pseudonymizer(b"another key, 16+ bytes long")
    served_log(log_dir, other)
    with pytest.raises(IngestError, match=f"fingerprint {other.fingerprint}.*"
                                          f"{PSEUDO.fingerprint}"):
        ingest(opts(lake_dir, log_dir), PSEUDO)
    with pytest.raises(IngestError, match="not in the lake"):
        ingest(IngestOptions(source="feedback", out=lake_dir, path=log_dir,
                             platform="shop_q"), PSEUDO)
    with pytest.raises(IngestError, match="no feedback files"):
        ingest(opts(lake_dir, tmp_path / "empty"), PSEUDO)
    assert lake.read_events(lake_dir, "shop").num_rows == 2  # untouched
