import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestOptions, Ledger
from recsys.data.ingest.finalize import finalize
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import ID_PREFIX, SESSION_PREFIX, Pseudonymizer
from recsys.data.schema import (
    EVENTS_SCHEMA,
    QUARANTINE_KEY_METADATA,
    QUARANTINE_PSEUDONYMISED_METADATA,
    check_schema,
    validate_platform_name,
)


def tables(n_users: int = 30) -> tuple[pa.Table, pa.Table, Ledger]:
    ledger = Ledger(Pseudonymizer(b"x" * 32))
    ev = pd.DataFrame({
        "user_id": [f"user{i % n_users}" for i in range(n_users * 4)],
        "item_id": [f"i{i % 7}" for i in range(n_users * 4)],
        "event_type": "view",
        "timestamp": pd.Timestamp("2025-01-01", tz="UTC")
        + pd.to_timedelta(range(n_users * 4), unit="s"),
        "event_index": range(n_users * 4),
        "_file": "mem", "_row": range(1, n_users * 4 + 1),
    })
    it = pd.DataFrame({"item_id": [f"i{k}" for k in range(7)],
                       "title": [f"thing {k}" for k in range(7)],
                       "_file": "mem", "_row": range(1, 8)})
    ledger.events.rows_in, ledger.items.rows_in = len(ev), len(it)
    e, i = finalize("shop", ev, it, ledger, source_file="mem")
    return e, i, ledger


def test_buckets_keep_users_whole_and_sorted(tmp_path: Path) -> None:
    e, i, led = tables()
    w = lake.write_platform(tmp_path, "shop", e, i, led.quarantine_table("events"),
                            led.quarantine_table("items"), {"x": 1}, num_buckets=4)
    files = lake.event_files(tmp_path, "shop")
    assert len(files) == 4 and w.report["num_buckets"] == 4
    seen: dict[str, str] = {}
    for f in files:
        t = pq.read_table(f)
        assert t.equals(lake.sort_events(t))
        for u in set(t["user_id"].to_pylist()):
            assert seen.setdefault(u, f.name) == f.name
    assert lake.read_events(tmp_path, "shop").num_rows == e.num_rows
    assert lake.list_platforms(tmp_path) == ["shop"]


def test_failed_write_leaves_previous_version(tmp_path: Path) -> None:
    e, i, led = tables()
    lake.write_platform(tmp_path, "shop", e, i, led.quarantine_table("events"),
                        led.quarantine_table("items"), {"version": 1})
    bad_items = i.drop_columns(["title"])
    with pytest.raises(ValueError, match="missing column"):
        lake.write_platform(tmp_path, "shop", e, bad_items, led.quarantine_table("events"),
                            led.quarantine_table("items"), {"version": 2})
    assert lake.read_report(tmp_path, "shop")["version"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_check_schema_names_columns() -> None:
    bad = pa.schema([f for f in EVENTS_SCHEMA if f.name != "timestamp"]
                    + [pa.field("extra", pa.int8())])
    with pytest.raises(ValueError, match=r"f\.parquet.*missing column\(s\) \['timestamp'\].*extra"):
        check_schema(bad, EVENTS_SCHEMA, "f.parquet")


def test_platform_names() -> None:
    assert validate_platform_name("shop_a") == "shop_a"
    for bad in ["", "Shop", "a/b", "../x", "x" * 65]:
        with pytest.raises(ValueError):
            validate_platform_name(bad)


# -- the pseudonym key a lake was written with ---------------------------------------------------


def _synthetic(out: Path, key: bytes, platform: str, source: str = "$TEST_KEY") -> None:
    ingest(IngestOptions(source="synthetic", out=out, scale=0.05, seed=1, num_platforms=1,
                         platform=platform), Pseudonymizer(key, source))


def test_quarantine_names_its_pseudonymised_columns_and_key() -> None:
    _, _, led = tables()
    bad = pd.DataFrame({"user_id": ["u1"], "session_id": ["s1"], "InvoiceNo": ["536365"],
                        "Description": ["MUG"], "_file": "mem", "_row": [3]})
    led.quarantine("events", bad, "some_reason", column="Description", file="mem")
    q = led.quarantine_table("events")
    meta = q.schema.metadata
    assert json.loads(meta[QUARANTINE_PSEUDONYMISED_METADATA]) == {
        "InvoiceNo": "id", "session_id": "session", "user_id": "user"}
    assert meta[QUARANTINE_KEY_METADATA].decode() == led.pseudonymizer.fingerprint
    row = q.to_pylist()[0]
    assert row["user_id"] == led.pseudonymizer.one("u1")
    assert row["session_id"] == led.pseudonymizer.one("s1", prefix=SESSION_PREFIX)
    assert row["InvoiceNo"] == led.pseudonymizer.one("536365", prefix=ID_PREFIX["id"])
    assert (row["Description"], row["_row"], row["_reason"]) == ("MUG", 3, "some_reason")
    empty = Ledger(Pseudonymizer(b"x" * 32)).quarantine_table("items")
    assert json.loads(empty.schema.metadata[QUARANTINE_PSEUDONYMISED_METADATA]) == {}


def test_lake_records_the_key_fingerprint(tmp_path: Path) -> None:
    _synthetic(tmp_path, b"a" * 32, "shop_a")
    (k,) = lake.lake_keys(tmp_path)
    assert k == lake.LakeKey("shop_a", Pseudonymizer(b"a" * 32).fingerprint, "$TEST_KEY")
    assert (b"a" * 32).hex() not in lake.platform_dir(tmp_path, "shop_a").joinpath(
        "report.json").read_text()
    lake.check_key(tmp_path, Pseudonymizer(b"a" * 32), purpose="serve")  # same key: fine


def test_other_key_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    _synthetic(tmp_path, b"a" * 32, "shop_a")
    other = Pseudonymizer(b"b" * 32, "/keys/other.key")
    with pytest.raises(lake.KeyMismatchError) as err:
        lake.check_key(tmp_path, other, ["shop_a"], purpose="serve")
    msg = str(err.value)
    assert Pseudonymizer(b"a" * 32).fingerprint in msg and other.fingerprint in msg
    assert "/keys/other.key" in msg and "$TEST_KEY" in msg and "shop_a" in msg


def test_lake_without_fingerprint_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _synthetic(tmp_path, b"a" * 32, "shop_a")
    report = lake.platform_dir(tmp_path, "shop_a") / "report.json"
    old = json.loads(report.read_text())
    del old["pseudonym_key_fingerprint"], old["pseudonym_key_source"]
    report.write_text(json.dumps(old))
    keys = lake.check_key(tmp_path, Pseudonymizer(b"b" * 32), purpose="serve")
    assert keys[0].fingerprint is None
    assert "recorded no pseudonym key fingerprint" in caplog.text


def test_ingest_refuses_to_mix_keys_in_one_lake(tmp_path: Path) -> None:
    _synthetic(tmp_path, b"a" * 32, "shop_a")
    with pytest.raises(lake.KeyMismatchError, match="cannot ingest into lake"):
        _synthetic(tmp_path, b"b" * 32, "shop_b")
    assert lake.list_platforms(tmp_path) == ["shop_a"]
    _synthetic(tmp_path, b"a" * 32, "shop_b")  # same key: a new platform is welcome
    # Re-ingesting every platform it holds replaces them whole: a new key is allowed then.
    ingest(IngestOptions(source="synthetic", out=tmp_path, scale=0.05, seed=1,
                         platform="shop_a,shop_b"), Pseudonymizer(b"b" * 32))
    assert {k.fingerprint for k in lake.lake_keys(tmp_path)} == {
        Pseudonymizer(b"b" * 32).fingerprint}
