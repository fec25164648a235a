"""amazon-json adapter: LC-Rec layout and Amazon's own JSON lines, through the full ingest."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer

KEY = bytes(range(32))
PSEUDO = Pseudonymizer(KEY)


def _run(tmp_path: Path, **kw: Any) -> lake.PlatformTables:
    opts = IngestOptions(source="amazon-json", out=tmp_path / "lake",
                         platform=kw.pop("platform", "shop"), **kw)
    written = ingest(opts, Pseudonymizer(KEY))
    return lake.read_platform(opts.out, written[0].platform)


def _quarantine(tmp_path: Path, table: str, platform: str = "shop") -> pd.DataFrame:
    path = lake.platform_dir(tmp_path / "lake", platform) / "quarantine" / f"{table}.parquet"
    return pq.read_table(path).to_pandas()


# --------------------------------------------------------------------------- LC-Rec layout


def _lcrec(directory: Path) -> Path:
    directory.mkdir()
    inter = {"0": [0, 1, 2], "1": [2, 0, 9, 1]}  # item 9 has no metadata
    items = {
        "0": {"title": "AT&amp;T Phone", "description": "", "brand": "AT&T",
              "categories": "Office Electronics, Telephones & Accessories"},
        "1": {"title": "Pen", "description": "Blue ink.", "brand": "", "categories": "Pens"},
        # Empty title: LC-Rec is a fixed benchmark, the item must survive.
        "2": {"title": "", "description": "A stylus for tablets. Works with all screens.",
              "brand": "", "categories": "Kindle Accessories, Styluses"},
    }
    (directory / "Mini.inter.json").write_text(json.dumps(inter, indent=2))
    (directory / "Mini.item.json").write_text(json.dumps(items, indent=2))
    return directory


def test_lcrec_directory(tmp_path: Path) -> None:
    src = _lcrec(tmp_path / "mini")
    report, events, items = _run(tmp_path, path=src)

    ev = report["events"]
    assert (ev["rows_in"], ev["rows_out"], ev["rows_quarantined"]) == (7, 6, 1)
    assert ev["quarantined_by_reason"] == {"item_not_in_catalog": 1}
    assert ev["invariant_holds"] and report["items"]["invariant_holds"]
    assert report["items"]["rows_out"] == 3
    assert "timestamps_synthesised" in report["quirks"]
    assert report["quirks"]["titles_synthesised"]["count"] == 1

    df = events.to_pandas().sort_values("event_index")
    # Dataset-local indices are namespaced by platform before hashing.
    assert set(df["user_id"]) == {PSEUDO.one("shop:0"), PSEUDO.one("shop:1")}
    assert set(df["event_type"]) == {"review"}
    user1 = df[df["user_id"] == PSEUDO.one("shop:1")]
    assert list(user1["item_id"]) == ["2", "0", "1"]
    secs = (user1["timestamp"] - pd.Timestamp("2000-01-01", tz="UTC")).dt.total_seconds()
    assert list(secs) == [0, 1, 3]  # position in the list, the unknown item 9 was at 2

    it = items.to_pandas().set_index("item_id")
    assert it.loc["0", "title"] == "AT&T Phone"  # HTML entity unescaped
    assert list(it.loc["0", "category"]) == ["Office Electronics", "Telephones & Accessories"]
    assert it.loc["2", "title"] == "A stylus for tablets."
    assert pd.isna(it.loc["0", "description"])

    q = _quarantine(tmp_path, "events")
    assert list(q["_reason"]) == ["item_not_in_catalog"]
    assert q["_file"].iloc[0].endswith("Mini.inter.json") and q["_row"].iloc[0] == 6
    assert "1" not in set(q["user_id"]) and "shop:1" not in set(q["user_id"])


def test_lcrec_inter_file_and_namespace(tmp_path: Path) -> None:
    src = _lcrec(tmp_path / "mini")
    report, events, _ = _run(tmp_path, path=src / "Mini.inter.json", user_namespace="office14")
    assert report["users"] == 2
    assert PSEUDO.one("office14:0") in set(events["user_id"].to_pylist())


def test_lcrec_bad_json_names_file_and_line(tmp_path: Path) -> None:
    src = _lcrec(tmp_path / "mini")
    (src / "Mini.item.json").write_text('{\n  "0": {"title": "x"},\n  oops\n}\n')
    with pytest.raises(IngestError) as exc:
        _run(tmp_path, path=src)
    assert exc.value.file.endswith("Mini.item.json") and exc.value.row == 3


# --------------------------------------------------------------------------- JSON lines layout


REVIEWS = [
    {"reviewerID": "A1", "asin": "B01", "unixReviewTime": 1400000000, "overall": 5.0},
    {"reviewerID": "A1", "asin": "B02", "unixReviewTime": 1400000100, "overall": 3.0},
    {"reviewerID": "A1", "asin": "B02", "unixReviewTime": 1400000100, "overall": 3.0},  # dup
    {"reviewerID": "A2", "asin": "B01", "unixReviewTime": 1300000000, "overall": 4.0},
    {"reviewerID": "A2", "asin": "B99", "unixReviewTime": 1300000500, "overall": 1.0},  # no meta
    {"reviewerID": "A3", "asin": "B03", "unixReviewTime": 1300000600, "overall": 2.0},
]

META_LINES = [
    # Amazon 2014: a Python dict literal (single quotes), categories as a list of paths.
    "{'asin': 'B01', 'title': 'Stapler', 'price': 12.5, 'brand': 'Swingline', "
    "'categories': [['Office Products', 'Staplers'], ['Home', 'Tools']], "
    "'description': 'Staples 20 sheets'}",
    # Amazon 2018: strict JSON, category a flat list, price a "$" string, description a list.
    json.dumps({"asin": "B02", "title": "Paper &amp; Pad", "price": "$1,299.00",
                "category": ["Office Products", "Paper"], "description": ["Lined.", "A4."]}),
    "",
    json.dumps({"asin": "B03", "title": "", "price": "$5 - $9"}),  # no title -> quarantined
    json.dumps({"asin": "B04", "title": "Unused", "price": "junk"}),
]


def _write_reviews(path: Path, records: list[dict[str, Any]]) -> Path:
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        path.write_text(lines)
    return path


def test_reviews_and_metadata(tmp_path: Path) -> None:
    reviews = _write_reviews(tmp_path / "reviews_Office.json.gz", REVIEWS)
    meta = tmp_path / "meta_Office.json"
    meta.write_text("\n".join(META_LINES) + "\n")
    report, events, items = _run(tmp_path, path=reviews, items_path=meta)

    ev = report["events"]
    assert ev["rows_in"] == 6 and ev["rows_out"] == 3
    assert ev["filtered_by_rule"] == {"duplicate": 1}
    # B99 has no metadata; B03's title is empty, so its item and review go too.
    assert ev["quarantined_by_reason"] == {"item_not_in_catalog": 2}
    assert ev["invariant_holds"]
    it_r = report["items"]
    assert (it_r["rows_in"], it_r["rows_out"]) == (4, 3)
    assert it_r["quarantined_by_reason"] == {"missing_title": 1}
    q = report["quirks"]
    assert q["python_literal_lines"] == {"meta_Office.json": 1}
    assert q["unparseable_item_prices"] == 2
    assert q["category_first_path_of_several"] == 1
    assert q["ratings_ignored"]["distribution"]["5.0"] == 1

    df = events.to_pandas()
    # Global reviewer ids are hashed as-is, so they link across categories.
    assert set(df["user_id"]) == {PSEUDO.one("A1"), PSEUDO.one("A2")}
    first = df[df["item_id"] == "B01"].sort_values("timestamp")
    assert first["timestamp"].iloc[0] == pd.Timestamp(1300000000, unit="s", tz="UTC")

    it = items.to_pandas().set_index("item_id")
    assert list(it.loc["B01", "category"]) == ["Office Products", "Staplers"]
    assert it.loc["B01", "price"] == 12.5 and it.loc["B01", "brand"] == "Swingline"
    assert it.loc["B02", "price"] == 1299.0
    assert it.loc["B02", "title"] == "Paper & Pad"
    assert it.loc["B02", "description"] == "Lined. A4."
    assert pd.isna(it.loc["B04", "price"])

    qi = _quarantine(tmp_path, "items")
    assert list(qi["_reason"]) == ["missing_title"] and list(qi["_row"]) == [4]


def test_reviews_directory_and_2023_fields(tmp_path: Path) -> None:
    src = tmp_path / "amazon23"
    src.mkdir()
    _write_reviews(src / "Office.jsonl", [
        {"user_id": "U1", "asin": "X1", "parent_asin": "P1", "timestamp": 1600000000123,
         "rating": 4.0},
    ])
    (src / "meta_Office.jsonl").write_text(json.dumps(
        {"parent_asin": "P1", "title": "Desk", "store": "Acme", "categories": ["Office"],
         "description": [], "price": None}) + "\n")
    report, events, items = _run(tmp_path, path=src, user_namespace="amz")
    assert report["events"]["rows_out"] == 1
    row = events.to_pylist()[0]
    assert row["item_id"] == "P1" and row["user_id"] == PSEUDO.one("amz:U1")
    assert row["timestamp"] == pd.Timestamp(1600000000123, unit="ms", tz="UTC")
    assert items.to_pylist()[0]["brand"] == "Acme"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    reviews = _write_reviews(tmp_path / "r.json", REVIEWS[:2])
    meta = tmp_path / "meta.json.gz"
    with gzip.open(meta, "wt", encoding="utf-8") as fh:
        fh.write(META_LINES[0] + "\n" + META_LINES[1] + "\n{'asin': 'B05', 'title': \n")
    with pytest.raises(IngestError, match=r"meta\.json\.gz, row 3") as exc:
        _run(tmp_path, path=reviews, items_path=meta)
    assert exc.value.row == 3


def test_non_object_line_rejected(tmp_path: Path) -> None:
    reviews = tmp_path / "r.json"
    reviews.write_text(json.dumps(REVIEWS[0]) + "\n[1, 2]\n")
    meta = tmp_path / "meta.json"
    meta.write_text(META_LINES[0] + "\n")
    with pytest.raises(IngestError, match="row 2"):
        _run(tmp_path, path=reviews, items_path=meta)


def test_reviews_need_metadata(tmp_path: Path) -> None:
    reviews = _write_reviews(tmp_path / "r.json", REVIEWS[:1])
    with pytest.raises(IngestError, match="items-path"):
        _run(tmp_path, path=reviews)


@pytest.mark.parametrize("literal", [False, True], ids=["arrow-reader", "line-reader"])
def test_blank_lines_and_both_readers_agree(tmp_path: Path, literal: bool) -> None:
    """Strict JSON goes through Arrow, anything else line by line: same events, same rows."""
    lines = [json.dumps(r) for r in REVIEWS]
    if literal:  # a Python-literal review line forces the line-by-line reader
        lines[0] = repr(REVIEWS[0])
    reviews = tmp_path / "r.json"
    reviews.write_text("\n\n".join(lines))  # blank line between records, no final newline
    meta = tmp_path / "meta.json"
    meta.write_text("\n".join(META_LINES) + "\n")
    report, events, _ = _run(tmp_path, path=reviews, items_path=meta)
    assert report["events"]["rows_in"] == 6 and report["events"]["rows_out"] == 3
    assert ("r.json" in report["quirks"].get("python_literal_lines", {})) == literal
    q = _quarantine(tmp_path, "events").sort_values("_row")
    assert list(q["_row"]) == [9, 11]  # records 5 and 6 sit on lines 9 and 11
    assert sorted(events["event_index"].to_pylist()) == [0, 1, 3]
