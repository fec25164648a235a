"""The real UCI Online Retail file: UniSRec's "OR" numbers reproduced exactly, default recipe sane.

UniSRec/VQ-Rec report 16,520 users (invoices), 3,469 items and 519,906 interactions after
dropping empty descriptions, deduplicating and a 5-core filter.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.lake import read_events, read_items, read_report
from recsys.data.pseudonym import Pseudonymizer

PSEUDO = Pseudonymizer(bytes(range(32)))
ROWS_IN_FILE = 541_909


@pytest.fixture(scope="module")
def retail_file(shared_data: Path) -> Path:
    path = shared_data / "online_retail_uci" / "Online_Retail.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def _ingest(path: Path, lake: Path, recipe: str | None) -> dict:
    ingest(IngestOptions(source="uci-online-retail", path=path, platform="or", out=lake,
                         recipe=recipe), PSEUDO)
    return read_report(lake, "or")


def test_unisrec_or_counts_match_published(retail_file: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    report = _ingest(retail_file, lake, "unisrec-or")
    events, items = read_events(lake, "or"), read_items(lake, "or")

    assert events.num_rows == 519_906
    assert pc.count_distinct(events["user_id"]).as_py() == 16_520
    assert pc.count_distinct(events["item_id"]).as_py() == 3_469
    assert items.num_rows == 3_469
    assert set(items["item_id"].to_pylist()) == set(events["item_id"].unique().to_pylist())

    ev = report["events"]
    assert ev["rows_in"] == ROWS_IN_FILE and ev["invariant_holds"]
    assert ev["quarantined_by_reason"]["missing_item_text"] == 1_454  # the "nan" strings
    assert ev["filtered_by_rule"]["duplicate"] == 5_429
    assert report["items"]["invariant_holds"]
    assert report["items"]["rows_in"] == 4_070  # distinct StockCodes
    titles = items["title"].to_pylist()
    assert all(t.endswith(".") and t == t.lower() for t in titles)


def test_customer_recipe_runs_and_balances(retail_file: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    report = _ingest(retail_file, lake, None)
    ev = report["events"]
    assert ev["rows_in"] == ROWS_IN_FILE and ev["invariant_holds"]
    assert report["items"]["invariant_holds"]
    assert ev["filtered_by_rule"]["cancellation"] == report["quirks"]["cancellations"]["rows"]
    assert ev["quarantined_by_reason"]["missing_user_id"] > 100_000
    events = read_events(lake, "or")
    assert events.num_rows == ev["rows_out"]
    # Only the shop's registered customers (4,372 in the file) remain as users.
    assert 4_000 < report["users"] <= 4_372
    assert pc.min(events["quantity"]).as_py() > 0
    assert pc.min(events["price"]).as_py() >= 0
