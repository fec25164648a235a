from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data import lake
from recsys.data.ingest.base import Ledger
from recsys.data.ingest.finalize import finalize
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENTS_SCHEMA, check_schema, validate_platform_name


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
