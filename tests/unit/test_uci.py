"""UCI Online Retail adapter: both column spellings, both file formats, every quirk counted."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.lake import platform_dir, read_events, read_items, read_report
from recsys.data.pseudonym import Pseudonymizer

PSEUDO = Pseudonymizer(bytes(range(32)))
PLATFORM = "retail"

# invoice | stock code | description | quantity | date | price | customer | what the default
# recipe does with the row. Quantity "abc" / date "not a date" become NaN / NaT in typed files.
ROWS: list[tuple[str, ...]] = [tuple(line.split("|")) for line in """
536365|85123A|WHITE HANGING HEART T-LIGHT HOLDER|6|12/1/2010 8:26|2.55|17850|kept
536365|71053|WHITE METAL LANTERN|6|12/1/2010 8:26|3.39|17850|kept
536365|85123A|WHITE HANGING HEART T-LIGHT HOLDER|6|12/1/2010 8:26|2.55|17850|duplicate
C536379|22556|PLASTERS IN TIN|-1|12/1/2010 9:41|1.65|17851|cancellation
536370|POST|POSTAGE|3|12/1/2010 8:45|18.0|12583|non_product_code
536371|gift_0001_10|Dotcomgiftshop Gift Voucher|1|12/1/2010 8:50|8.5|12583|non_product_code
536372|22139|nan|5|12/1/2010 9:00|0.0|17852|missing_item_text
536373|22139|RETROSPOT TEA SET CERAMIC 11 PC|2|12/1/2010 9:05|4.95||missing_user_id
536374|21730|GLASS STAR FROSTED T-LIGHT HOLDER|-3|12/1/2010 9:10|0.0||non_positive_quantity
536375|21730|GLASS STAR|1|6/1/2011 12:00|0.0|17850|kept
536376|85123A|WHITE HANGING HEART T-LIGHT HOLDER|2|12/1/2010 9:20|-1.0|17853|negative_price
536377|M|Manual|1|12/1/2010 9:25|2.0|17850|non_product_code
536378|21730|GLASS STAR FROSTED T-LIGHT HOLDER|4|12/2/2010 10:00|4.25|17854|kept
536380|22556|PLASTERS IN TIN|12|not a date|1.65|17850|invalid_timestamp
536381|22556|PLASTERS IN TIN|abc|12/2/2010 11:00|1.65|17850|invalid_quantity
""".strip().splitlines()]
QUARANTINED = {"invalid_quantity": 1, "invalid_timestamp": 1, "missing_item_text": 1,
               "missing_user_id": 1, "negative_price": 1}
FILTERED = {"cancellation": 1, "duplicate": 1, "non_positive_quantity": 1,
            "non_product_code": 3}

SPELLING_COLUMNS = {
    "online_retail": ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate",
                      "UnitPrice", "CustomerID", "Country"],
    "online_retail_ii": ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate",
                         "Price", "Customer ID", "Country"],
}


def _us_date(text: str) -> pd.Timestamp:
    """"12/1/2010 8:26" (with or without seconds) as the UCI file writes it; NaT otherwise."""
    for fmt in ("%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S"):
        ts = pd.to_datetime(text, format=fmt, errors="coerce")
        if not pd.isna(ts):
            return ts
    return pd.NaT


def _iso(text: str) -> str:
    ts = _us_date(text)
    return text if pd.isna(ts) else ts.strftime("%Y-%m-%d %H:%M:%S")


def write_source(rows: list[tuple[Any, ...]], directory: Path, spelling: str, fmt: str) -> Path:
    """Write rows as the published files look: CSV all text; Parquet typed (UCI: datetimes,
    float customer ids; Online Retail II: date strings)."""
    cols = SPELLING_COLUMNS[spelling]
    recs = [list(r[:7]) + ["United Kingdom"] for r in rows]
    df = pd.DataFrame(recs, columns=cols)
    if spelling == "online_retail_ii":
        # Online Retail II exports write ISO dates and "13085.0"-style customer ids.
        df["InvoiceDate"] = df["InvoiceDate"].map(_iso)
        df[cols[6]] = df[cols[6]].map(lambda v: f"{v}.0" if v else v)
    path = directory / f"{spelling}.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
        return path
    df["Quantity"] = pd.to_numeric(df["Quantity"], errors="coerce")
    df[cols[5]] = pd.to_numeric(df[cols[5]], errors="coerce")
    df[cols[6]] = pd.to_numeric(df[cols[6]].replace("", np.nan), errors="coerce")
    if spelling == "online_retail":
        df["InvoiceDate"] = pd.to_datetime(df["InvoiceDate"].map(_us_date))
    df.to_parquet(path, index=False)
    return path


def run(path: Path, out: Path, **kw: Any) -> dict[str, Any]:
    ingest(IngestOptions(source="uci-online-retail", path=path, platform=PLATFORM, out=out,
                         **kw), PSEUDO)
    return read_report(out, PLATFORM)


def quarantine(lake: Path) -> pd.DataFrame:
    return pq.read_table(platform_dir(lake, PLATFORM) / "quarantine" / "events.parquet").to_pandas()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("spelling", ["online_retail", "online_retail_ii"])
def test_customer_recipe_counts_every_quirk(tmp_path: Path, spelling: str, fmt: str) -> None:
    path = write_source(ROWS, tmp_path, spelling, fmt)
    lake = tmp_path / "lake"
    report = run(path, lake)
    ev = report["events"]
    assert ev["rows_in"] == len(ROWS)
    assert ev["quarantined_by_reason"] == QUARANTINED
    assert ev["filtered_by_rule"] == FILTERED
    assert ev["rows_out"] == sum(r[7] == "kept" for r in ROWS) == 4
    assert ev["invariant_holds"]
    # Items: one per distinct code; POST, gift voucher and M are not products.
    assert report["items"]["rows_in"] == 8
    assert report["items"]["filtered_by_rule"] == {"non_product_code": 3}
    assert report["items"]["rows_out"] == 5 and report["items"]["invariant_holds"]
    assert report["quirks"]["spelling"]["detected"] == spelling
    assert report["quirks"]["spelling"]["file_format"] == fmt
    assert report["quirks"]["missing_descriptions"]["rows"] == 1
    assert report["quirks"]["cancellations"]["rows"] == 1
    assert report["quirks"]["missing_customer_id"] == 2
    assert report["quirks"]["non_product_codes"]["rows"] == 3
    assert report["quirks"]["exact_duplicate_rows"] == 1
    assert report["quirks"]["prices"] == {"zero": 3, "negative": 1, "blank": 0,
                                          "unparseable_set_to_null": 0}
    assert report["quirks"]["descriptions_vary_per_stock_code"]["codes"] == 1
    assert "Europe/London" in report["quirks"]["timezone"]["source"]

    events = read_events(lake, PLATFORM).to_pandas().sort_values("event_index")
    assert events["event_index"].tolist() == [i for i, r in enumerate(ROWS) if r[7] == "kept"]
    assert set(events["user_id"]) == {PSEUDO.one("17850"), PSEUDO.one("17854")}
    assert (events["event_type"] == "purchase").all()
    # invoices are session ids, pseudonymised like users (an invoice can identify a person)
    assert events["session_id"].tolist() == [PSEUDO.one(f"session:{i}") for i in
                                             ["536365", "536365", "536375", "536378"]]
    # UK wall-clock time: 12:00 in June is BST (UTC+1), 08:26 in December is GMT.
    assert events["timestamp"].tolist() == [
        pd.Timestamp("2010-12-01 08:26", tz="UTC"), pd.Timestamp("2010-12-01 08:26", tz="UTC"),
        pd.Timestamp("2011-06-01 11:00", tz="UTC"), pd.Timestamp("2010-12-02 10:00", tz="UTC")]
    assert events["price"].tolist() == [2.55, 3.39, 0.0, 4.25]

    items = read_items(lake, PLATFORM).to_pandas().set_index("item_id")
    assert sorted(items.index) == ["21730", "22139", "22556", "71053", "85123A"]
    # Most frequent description on sale lines wins over "GLASS STAR" (a free line).
    assert items.loc["21730", "title"] == "GLASS STAR FROSTED T-LIGHT HOLDER"
    assert items.loc["22556", "price"] == pytest.approx(1.65)
    assert items.loc["85123A", "price"] == pytest.approx(2.55)  # the -1.0 line is ignored


@pytest.mark.parametrize("spelling", ["online_retail", "online_retail_ii"])
def test_quarantine_points_at_source_and_hashes_customers(tmp_path: Path, spelling: str) -> None:
    path = write_source(ROWS, tmp_path, spelling, "csv")
    lake = tmp_path / "lake"
    run(path, lake)
    q = quarantine(lake)
    assert sorted(q["_reason"]) == sorted(QUARANTINED)
    assert set(q["_file"]) == {str(path)}
    by_reason = q.set_index("_reason")
    cust = SPELLING_COLUMNS[spelling][6]
    # _row is the CSV line (the header is line 1); _column names the offending source column.
    for reason, column in [("missing_item_text", "Description"), ("missing_user_id", cust),
                           ("invalid_timestamp", "InvoiceDate"), ("invalid_quantity", "Quantity")]:
        pos = next(i for i, r in enumerate(ROWS) if r[7] == reason)
        assert by_reason.loc[reason, "_row"] == pos + 2
        assert by_reason.loc[reason, "_column"] == column
    assert by_reason.loc["negative_price", "_row"] == 12
    assert by_reason.loc["negative_price", "_column"] == "price"
    # Customer ids are pseudonymised, in source columns and canonical ones alike.
    assert by_reason.loc["missing_item_text", cust] == PSEUDO.one("17852")
    assert by_reason.loc["invalid_quantity", cust] == PSEUDO.one("17850")
    assert pd.isna(by_reason.loc["missing_user_id", cust])
    assert by_reason.loc["negative_price", "user_id"] == PSEUDO.one("17853")
    cells = {str(v) for col in q.columns for v in q[col].dropna()}
    for raw in ("17850", "17852", "17853", "17850.0", "17852.0"):
        assert raw not in cells


def test_user_namespace_prefixes_customer_ids(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    run(write_source(ROWS, tmp_path, "online_retail", "parquet"), lake, user_namespace="uk")
    users = set(read_events(lake, PLATFORM).column("user_id").to_pylist())
    assert users == {PSEUDO.one("uk:17850"), PSEUDO.one("uk:17854")}
    q = quarantine(lake).set_index("_reason")
    assert q.loc["missing_item_text", "CustomerID"] == PSEUDO.one("uk:17852")


def _unisrec_rows() -> list[tuple[Any, ...]]:
    """Five invoices x five items (a 5-core), plus one row per rule of the recipe."""
    rows: list[tuple[Any, ...]] = []
    codes = ["10001", "10002", "10003", "10004", "10005"]
    for inv in range(5):
        for j, code in enumerate(codes):
            rows.append((f"53000{inv}", code, f"  Item {code} Desc ", "2",
                         f"12/{inv + 1}/2010 10:0{j}", "1.0", "17850", "kept"))
    # Same invoice, item, quantity and minute as the first row, 30 s later: a duplicate.
    rows.append(("530000", "10001", "Item 10001 other text", "2", "12/1/2010 10:00:30", "1.0",
                 "17850", "duplicate"))
    rows.append(("530000", "10006", "nan", "1", "12/1/2010 10:09", "1.0", "", "missing_item_text"))
    # A cancellation invoice is just another user in this recipe.
    for j, code in enumerate(codes):
        rows.append(("C530009", code, f"Item {code}", "-2", f"12/9/2010 11:0{j}", "1.0",
                     "17850", "kept"))
    rows.append(("530007", "10001", "Item 10001", "1", "12/7/2010 10:00", "1.0", "", "k_core"))
    for inv in range(4):  # item 10007 has 4 events: below the item threshold
        rows.append((f"53000{inv}", "10007", "Item 10007", "1", f"12/{inv + 1}/2010 10:09",
                     "1.0", "17851", "k_core"))
    return rows


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("spelling", ["online_retail", "online_retail_ii"])
def test_unisrec_or_recipe(tmp_path: Path, spelling: str, fmt: str) -> None:
    rows = _unisrec_rows()
    lake = tmp_path / "lake"
    report = run(write_source(rows, tmp_path, spelling, fmt), lake, recipe="unisrec-or")
    ev = report["events"]
    assert ev["rows_in"] == len(rows) == 37
    assert ev["quarantined_by_reason"] == {"missing_item_text": 1}
    assert ev["filtered_by_rule"] == {"duplicate": 1, "k_core": 5}
    assert ev["rows_out"] == 30 and ev["invariant_holds"]
    items = report["items"]
    assert items["rows_in"] == 7  # 10001..10007
    assert items["quarantined_by_reason"] == {"missing_title": 1}  # 10006: only "nan"
    assert items["filtered_by_rule"] == {"k_core": 1}  # 10007
    assert items["rows_out"] == 5 and items["invariant_holds"]
    assert report["users"] == 6 and report["items_with_events"] == 5

    events = read_events(lake, PLATFORM)
    invoices = [f"53000{i}" for i in range(5)] + ["C530009"]
    assert set(events.column("user_id").to_pylist()) == {
        PSEUDO.one(f"{PLATFORM}:{inv}") for inv in invoices}
    assert min(events.column("quantity").to_pylist()) == -2.0
    catalog = read_items(lake, PLATFORM)
    titles = {r["item_id"]: r["title"] for r in catalog.to_pylist()}
    # UniSRec text: first description of the code, stripped, lower-cased, "." appended.
    assert titles["10001"] == "item 10001 desc."


def test_unisrec_or_namespace_option(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    run(write_source(_unisrec_rows(), tmp_path, "online_retail", "csv"), lake,
        recipe="unisrec-or", user_namespace="or")
    users = set(read_events(lake, PLATFORM).column("user_id").to_pylist())
    assert PSEUDO.one("or:530000") in users and len(users) == 6


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    df = pd.DataFrame([r[:7] for r in ROWS], columns=SPELLING_COLUMNS["online_retail"][:7])
    path = tmp_path / "no_price.csv"
    df.drop(columns="UnitPrice").to_csv(path, index=False)
    with pytest.raises(IngestError) as err:
        run(path, tmp_path / "lake")
    assert str(path) in str(err.value) and "UnitPrice" in str(err.value)
    assert err.value.column == "UnitPrice"


def test_unknown_recipe_and_file_type(tmp_path: Path) -> None:
    path = write_source(ROWS, tmp_path, "online_retail", "csv")
    with pytest.raises(IngestError, match="unknown recipe"):
        run(path, tmp_path / "lake", recipe="nope")
    other = tmp_path / "data.json"
    other.write_text("{}")
    with pytest.raises(IngestError, match="unsupported file type"):
        run(other, tmp_path / "lake")


@pytest.mark.skipif(importlib.util.find_spec("openpyxl") is not None,
                    reason="openpyxl is installed: .xlsx is readable")
def test_xlsx_without_openpyxl_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "Online Retail.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(IngestError, match="openpyxl") as err:
        run(path, tmp_path / "lake")
    assert str(path) in str(err.value) and "convert" in str(err.value)


def test_latin1_csv_is_read(tmp_path: Path) -> None:
    """The UCI/Kaggle CSV export is ISO-8859-1: the pound sign must survive."""
    rows = [r for r in ROWS if r[7] == "kept"]
    rows[0] = rows[0][:2] + ("JUMBO BAG £5 OFFER",) + rows[0][3:]
    df = pd.DataFrame([list(r[:7]) + ["United Kingdom"] for r in rows],
                      columns=SPELLING_COLUMNS["online_retail"])
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False, encoding="latin-1")
    lake = tmp_path / "lake"
    report = run(path, lake)
    assert report["quirks"]["spelling"]["encoding"] == "latin-1"
    assert report["events"]["rows_out"] == 4
    titles = {r["item_id"]: r["title"] for r in read_items(lake, PLATFORM).to_pylist()}
    assert titles["85123A"] == "JUMBO BAG £5 OFFER"


def _invoice_order(lake: Path) -> list[list[str]]:
    ev = read_events(lake, PLATFORM).to_pandas()  # sorted by (user, timestamp, event_index)
    return [list(g["item_id"]) for _, g in ev.groupby("user_id", sort=True)]


def test_unisrec_or_orders_invoice_lines_by_seed_not_file_order(tmp_path: Path) -> None:
    """Lines of one invoice share a timestamp: their order is a seeded permutation."""
    codes = [f"2000{j}" for j in range(6)]
    rows = [(f"54000{inv}", code, f"Item {code}", "1", f"12/{inv + 1}/2010 10:00", "1.0", "1", "")
            for inv in range(6) for code in codes]
    src = write_source(rows, tmp_path, "online_retail", "csv")
    orders = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(src, tmp_path / name, recipe="unisrec-or", seed=seed)
        orders[name] = _invoice_order(tmp_path / name)
    assert orders["a"] == orders["b"]  # deterministic
    assert orders["a"] != orders["c"]  # the seed decides
    assert any(o != codes for o in orders["a"])  # not the file order
    assert all(sorted(o) == codes for o in orders["a"])  # nothing lost
    run(src, tmp_path / "customer", recipe="customer")
    assert _invoice_order(tmp_path / "customer") == [codes * 6]  # one customer, file order
