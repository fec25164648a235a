"""generic adapter: mapped CSV/Parquet -> canonical lake; YAML mappings; timestamp parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.generic import apply_mapping, load_mapping
from recsys.data.ingest.parsing import parse_price, parse_timestamps
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer

KEY = bytes(range(32))
PSEUDO = Pseudonymizer(KEY)

EVENTS_CSV = (
    "CustomerID,StockCode,When,Action,Qty,UnitPrice\n"
    "c1,A,1700000000,Purchase,2,$3.50\n"
    "c1,B,1700000100,view,,\n"
    "c2,A,1700000200,wishlist,1,3.50\n"  # unknown event type -> quarantined
    "c2,Z,1700000300,view,1,1\n"  # not in catalog -> quarantined
    ",A,1700000400,view,1,1\n"  # no user -> quarantined
    "c3,B,1700000500,cart,lots,1\n"  # junk quantity -> missing, counted
)
ITEMS_CSV = (
    "code,name,about,maker,dept,cost\n"
    "A,Mug,White mug,Acme,Kitchen > Mugs,3.5\n"
    "B,Tea,,,Food,n/a\n"
    "C,,No title,,,\n"
)
MAPPING = {"user_id": "CustomerID", "item_id": "StockCode", "timestamp": "When",
           "event_type": "Action", "quantity": "Qty", "price": "UnitPrice"}
ITEM_MAPPING = {"item_id": "code", "title": "name", "description": "about", "brand": "maker",
                "category": "dept", "price": "cost"}


def _run(tmp_path: Path, **kw: Any) -> lake.PlatformTables:
    opts = IngestOptions(source="generic", out=tmp_path / "lake", platform="shop", **kw)
    ingest(opts, Pseudonymizer(KEY))
    return lake.read_platform(opts.out, "shop")


def _files(tmp_path: Path) -> tuple[Path, Path]:
    ev, it = tmp_path / "events.csv", tmp_path / "items.csv"
    ev.write_text(EVENTS_CSV)
    it.write_text(ITEMS_CSV)
    return ev, it


def test_csv_with_mapping_dict(tmp_path: Path) -> None:
    ev_p, it_p = _files(tmp_path)
    report, events, items = _run(tmp_path, path=ev_p, items_path=it_p, columns=MAPPING,
                                 item_columns=ITEM_MAPPING)
    ev = report["events"]
    assert (ev["rows_in"], ev["rows_out"]) == (6, 3)
    assert ev["quarantined_by_reason"] == {"item_not_in_catalog": 1, "missing_user_id": 1,
                                           "unknown_event_type": 1}
    assert ev["invariant_holds"] and report["items"]["invariant_holds"]
    assert report["items"]["quarantined_by_reason"] == {"missing_title": 1}
    assert report["event_types"] == {"purchase": 1, "view": 1, "cart": 1}
    q = report["quirks"]
    assert q["timestamp_epoch_unit"] == "s"
    assert q["unparseable_quantities"] == 1 and q["unparseable_item_prices"] == 1

    df = events.to_pandas().set_index("event_index")
    assert df.loc[0, "user_id"] == PSEUDO.one("c1")  # global ids hashed as-is
    assert df.loc[0, "timestamp"] == pd.Timestamp(1700000000, unit="s", tz="UTC")
    assert df.loc[0, "price"] == 3.5 and df.loc[0, "quantity"] == 2
    assert np.isnan(df.loc[5, "quantity"])

    it = items.to_pandas().set_index("item_id")
    assert list(it.loc["A", "category"]) == ["Kitchen", "Mugs"]
    assert it.loc["A", "brand"] == "Acme" and it.loc["A", "price"] == 3.5
    assert pd.isna(it.loc["B", "price"])


def test_parquet_catalog_from_events(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame({
        "cust": [17850.0, 17850.0, np.nan, 13047.0],  # float ids, as pandas stores them
        "sku": ["A", "B", "A", "B"],
        "at": pd.to_datetime(["2010-12-01 08:26", "2010-12-01 09:00", "2010-12-02 10:00",
                              "2010-12-03 11:00"]),
        "desc": ["", "Tea", "Mug", "Tea tin"],
    }).to_parquet(path)
    report, events, items = _run(
        tmp_path, path=path, event_type="purchase",
        columns={"user_id": "cust", "item_id": "sku", "timestamp": "at"},
        item_columns={"title": "desc"})
    assert report["events"]["rows_out"] == 3
    assert report["events"]["quarantined_by_reason"] == {"missing_user_id": 1}
    assert report["items"]["rows_in"] == 2 and report["items"]["invariant_holds"]
    assert report["quirks"]["naive_timestamps_assumed_utc"] == 4
    assert report["quirks"]["float_ids_as_integers"] == ["user_id"]
    assert PSEUDO.one("17850") in set(events["user_id"].to_pylist())
    titles = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist(), strict=True))
    assert titles == {"A": "Mug", "B": "Tea"}  # first non-blank title per item
    assert events["timestamp"][0].as_py().tzinfo is not None


def test_yaml_mapping(tmp_path: Path) -> None:
    ev_p, it_p = _files(tmp_path)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "columns:\n" + "".join(f"  {k}: {v}\n" for k, v in MAPPING.items() if k != "price")
        + "item_columns:\n" + "".join(f"  {k}: {v}\n" for k, v in ITEM_MAPPING.items())
        + "event_type: view\n")
    columns, item_columns, event_type = load_mapping(mapping)
    assert columns["user_id"] == "CustomerID" and item_columns["title"] == "name"
    assert event_type == "view"

    opts = IngestOptions(source="generic", out=tmp_path / "lake", platform="shop", path=ev_p,
                         items_path=it_p, columns={"price": "UnitPrice"})
    merged = apply_mapping(opts, mapping)
    assert merged.columns["price"] == "UnitPrice" and merged.columns["user_id"] == "CustomerID"
    ingest(merged, Pseudonymizer(KEY))
    assert lake.read_report(tmp_path / "lake", "shop")["events"]["rows_out"] == 3


def test_yaml_unknown_key_rejected(tmp_path: Path) -> None:
    mapping = tmp_path / "m.yml"
    mapping.write_text("columns:\n  user: CustomerID\n")
    with pytest.raises(IngestError, match=r"unknown key 'columns\.user'"):
        load_mapping(mapping)
    mapping.write_text("colums:\n  user_id: CustomerID\n")
    with pytest.raises(IngestError, match="unknown key 'colums'"):
        load_mapping(mapping)
    mapping.write_text("columns: [a, b\n")
    with pytest.raises(IngestError, match="not valid YAML"):
        load_mapping(mapping)


def test_missing_mapped_column(tmp_path: Path) -> None:
    ev_p, it_p = _files(tmp_path)
    with pytest.raises(IngestError) as exc:
        _run(tmp_path, path=ev_p, items_path=it_p, item_columns=ITEM_MAPPING,
             columns={**MAPPING, "user_id": "Customer"})
    assert exc.value.column == "Customer" and exc.value.file.endswith("events.csv")
    with pytest.raises(IngestError, match="items.csv.*'nom'"):
        _run(tmp_path, path=ev_p, items_path=it_p, columns=MAPPING,
             item_columns={**ITEM_MAPPING, "title": "nom"})


def test_errors_up_front(tmp_path: Path) -> None:
    ev_p, it_p = _files(tmp_path)
    no_type = {k: v for k, v in MAPPING.items() if k != "event_type"}
    with pytest.raises(IngestError, match="no event type"):
        _run(tmp_path, path=ev_p, items_path=it_p, columns=no_type, item_columns=ITEM_MAPPING)
    with pytest.raises(IngestError, match="not one of"):
        _run(tmp_path, path=ev_p, items_path=it_p, columns=no_type, item_columns=ITEM_MAPPING,
             event_type="like")
    with pytest.raises(IngestError, match="item text"):
        _run(tmp_path, path=ev_p, columns=MAPPING)
    with pytest.raises(IngestError, match="unknown canonical field"):
        _run(tmp_path, path=ev_p, items_path=it_p, columns={**MAPPING, "user": "CustomerID"},
             item_columns=ITEM_MAPPING)
    bad = tmp_path / "events.xlsx"
    bad.write_text("x")
    with pytest.raises(IngestError, match="unknown file type"):
        _run(tmp_path, path=bad, items_path=it_p, columns=MAPPING, item_columns=ITEM_MAPPING)


def test_unparseable_timestamps_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "e.tsv"
    path.write_text("user_id\titem_id\ttimestamp\ttitle\n"
                    "u\ti\t2024-01-01T10:00:00+02:00\tThing\n"
                    "u\ti\tnot a date\tThing\n"
                    "u\ti\t12/1/2010 8:26\tThing\n")
    report, events, _ = _run(tmp_path, path=path, event_type="view",
                             item_columns={"title": "title"})
    assert report["events"]["quarantined_by_reason"] == {"invalid_timestamp": 1}
    assert report["quirks"]["timestamps_parsed_loosely"] == 1
    ts = sorted(events["timestamp"].to_pylist())
    assert ts[1] == pd.Timestamp("2024-01-01T08:00:00", tz="UTC")
    q = pq.read_table(lake.platform_dir(tmp_path / "lake", "shop") / "quarantine" /
                      "events.parquet").to_pylist()
    assert q[0]["source_timestamp"] == "not a date" and q[0]["_row"] == 3


@pytest.mark.parametrize("value,unit", [(1.7e9, "s"), (1.7e12, "ms"), (1.7e15, "us"),
                                        (1.7e18, "ns")])
def test_epoch_unit_by_magnitude(value: float, unit: str) -> None:
    ts, notes = parse_timestamps(pd.Series([value, value + 1]))
    assert notes["timestamp_epoch_unit"] == unit
    assert ts.iloc[0].year == 2023


def test_parse_price() -> None:
    prices, junk = parse_price(pd.Series(["$12.99", "1,299.00", None, "", "$5 - $9", "abc"]))
    assert prices.iloc[0] == 12.99 and prices.iloc[1] == 1299.0
    assert prices.iloc[2:].isna().all() and junk == 2


def test_directory_source_reads_every_log_file_and_points_at_each(tmp_path: Path) -> None:
    """New logs arrive as new files; the quarantine names the file and row of each bad one."""
    from recsys.data.ingest.synthetic import release_holdback, write_logs

    logs = write_logs(tmp_path / "logs", num_platforms=2, scale=0.1, seed=5,
                      holdback={"shop_b": 0.3})
    (tmp_path / "logs" / "shop_b" / "README.txt").write_text("not a log")  # ignored
    opts = {"source": "generic", "platform": "shop_b", "path": logs["shop_b"]["path"],
            "items_path": logs["shop_b"]["items_path"]}
    first = ingest(IngestOptions(**opts, out=tmp_path / "lake1"), PSEUDO)[0].report
    new_file = release_holdback(tmp_path / "logs", "shop_b")
    assert new_file.name == "events-0002.parquet"
    second = ingest(IngestOptions(**opts, out=tmp_path / "lake2"), PSEUDO)[0].report
    held = pd.read_parquet(new_file)
    assert second["events"]["rows_in"] == first["events"]["rows_in"] + len(held)
    assert second["events"]["invariant_holds"]
    events = lake.read_events(tmp_path / "lake2", "shop_b").to_pandas()
    assert events["timestamp"].max() == held["timestamp"].max()
    q = pq.read_table(lake.platform_dir(tmp_path / "lake2", "shop_b") / "quarantine"
                      / "events.parquet").to_pandas()
    files = {str(p) for p in (tmp_path / "logs" / "shop_b").glob("*.parquet")}
    assert len(q) > 0 and set(q["_file"]) <= files


def test_directory_source_with_different_columns_names_the_file(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    pd.DataFrame({"user_id": ["u"], "item_id": ["i"], "timestamp": [1], "title": ["t"]}) \
        .to_parquet(d / "a.parquet")
    pd.DataFrame({"user": ["u"], "item_id": ["i"], "timestamp": [1], "title": ["t"]}) \
        .to_parquet(d / "b.parquet")
    with pytest.raises(IngestError, match=r"b\.parquet.*same columns"):
        ingest(IngestOptions(source="generic", platform="p", path=d, out=tmp_path / "lake",
                             event_type="purchase", item_columns={"title": "title"}), PSEUDO)
    with pytest.raises(IngestError, match="no .csv"):
        (tmp_path / "empty").mkdir()
        ingest(IngestOptions(source="generic", platform="p", path=tmp_path / "empty",
                             out=tmp_path / "lake", event_type="purchase"), PSEUDO)
