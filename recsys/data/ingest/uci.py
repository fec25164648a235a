"""UCI "Online Retail" (2010-2011) and "Online Retail II" (2009-2011) transaction files.

One row per invoice line of a UK online gift shop. The two published spellings of the columns
are detected from the header:

* Online Retail:    ``InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice,
  CustomerID, Country``
* Online Retail II: ``Invoice, StockCode, Description, Quantity, InvoiceDate, Price,
  Customer ID, Country``

``Country`` is optional (nothing downstream needs it). Files: ``.parquet``, ``.csv`` (also
``.csv.gz``) and ``.xlsx`` (every sheet, in order; needs openpyxl).

Two recipes (``opts.recipe``), each applying its rules in a fixed order; a row is counted under
the *first* rule that removes it, so the report's counts add up to the rows of the file:

``customer`` (default) -- the shop's customers as users, purchases only:
  1. quarantine ``invalid_quantity`` / ``invalid_timestamp`` (unparseable source values);
  2. filter ``cancellation`` (invoice starting with "C");
  3. filter ``non_product_code`` (postage, fees, manual adjustments, discounts, vouchers: see
     :data:`NON_PRODUCT_CODES`; other unusual codes are kept and listed in a quirk);
  4. filter ``non_positive_quantity`` (stock adjustments on ordinary invoices);
  5. quarantine ``missing_item_text`` (Description null, blank or the string "nan");
  6. quarantine ``missing_user_id`` (no CustomerID);
  7. filter ``duplicate`` (rows equal in every source column; the first is kept);
  then :func:`~recsys.data.ingest.finalize.finalize` (e.g. ``negative_price``). Zero unit prices
  (free samples, gifts) are kept: the purchase happened; the price 0.0 is recorded.

``unisrec-or`` -- UniSRec's "OR" set (``dataset/preprocessing/process_or.py``): every invoice is a
user (cancellation invoices included), rows without description are skipped (quarantined
``missing_item_text``), interactions are deduplicated on (invoice, stock code, quantity,
minute of InvoiceDate) (filtered ``duplicate``), then an iterative 5-core on users and items
(filtered ``k_core`` by finalize). Item text is the first description seen for the code,
stripped, lower-cased, with "." appended. On the UCI file: 16,520 users, 3,469 items,
519,906 interactions.

Time: InvoiceDate is UK wall-clock time. It is localised as Europe/London (the repeated hour when
summer time ends is read as summer time, the skipped hour when it starts is shifted forward) and
converted to UTC. An item "row" (``ledger.items.rows_in``) is one distinct StockCode of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.ingest.base import IngestError, IngestOptions, Ledger, RowRules, SourceFrames
from recsys.data.ingest.parsing import (
    localize_wall_clock,
    parse_wall_clock,
    stripped_text,
    whole_number_ids,
)
from recsys.data.ingest.tables import detect_spelling, read_csv_text, read_workbook
from recsys.data.pseudonym import Pseudonymizer

RECIPES: tuple[str, ...] = ("customer", "unisrec-or")
UNISREC_K_CORE = 5
SOURCE_TZ = "Europe/London"

# Canonical role -> column name, per published spelling. Country is optional.
SPELLINGS: dict[str, dict[str, str]] = {
    "online_retail": {
        "invoice": "InvoiceNo", "stock_code": "StockCode", "description": "Description",
        "quantity": "Quantity", "invoice_date": "InvoiceDate", "unit_price": "UnitPrice",
        "customer_id": "CustomerID",
    },
    "online_retail_ii": {
        "invoice": "Invoice", "stock_code": "StockCode", "description": "Description",
        "quantity": "Quantity", "invoice_date": "InvoiceDate", "unit_price": "Price",
        "customer_id": "Customer ID",
    },
}

# Stock codes that are not products, found by inspecting the files: postage (POST, DOT = dotcom
# postage, C2/C3 = carriage), manual corrections (M, m), discounts (D), samples (S), bad-debt
# adjustments (B), fees and commissions (BANK CHARGES, AMAZONFEE, CRUK), cushion pads sold at
# 0.001 to balance stock (PADS), test and adjustment codes of Online Retail II.
NON_PRODUCT_CODES: frozenset[str] = frozenset({
    "POST", "DOT", "C2", "C3", "M", "D", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS",
    "ADJUST", "ADJUST2", "TEST001", "TEST002",
})
# Gift vouchers (gift_0001_10 .. gift_0001_50) and test codes, whatever their suffix.
_NON_PRODUCT_RE = re.compile(r"^(gift_\d+_\d+|TEST\d*)$", re.IGNORECASE)
# The ordinary product code: five digits and an optional variant suffix (85123A, 15056BL).
_PRODUCT_RE = r"^\d{5}[A-Za-z]*$"
_MISSING_TEXT = ("", "nan")
# InvoiceDate: month first as in the UCI CSV ("12/1/2010 8:26"), with seconds, or ISO 8601.
_DATE_FORMATS = ("%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S", "ISO8601")
_MAX_LISTED_CODES = 50


@dataclass
class _Source:
    """The file as read (source columns untouched) plus provenance per row."""

    raw: pd.DataFrame
    files: np.ndarray  # _file per row (one file, or "file[sheet]" for workbooks)
    rows: np.ndarray  # 1-based row in its file/sheet; the header line counts as row 1
    fmt: str
    encoding: str | None = None


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    """Parse one Online Retail file into events + catalog under the chosen recipe."""
    path = opts.source_path()
    recipe = opts.recipe or "customer"
    if recipe not in RECIPES:
        raise IngestError(str(path), f"unknown recipe {recipe!r} for uci-online-retail; "
                          f"use one of {list(RECIPES)}")
    platform = opts.platform or "online-retail"
    ledger = Ledger(pseudo)
    src = _read_file(path)
    spelling, cols = detect_spelling(src.raw, SPELLINGS, str(path), "an Online Retail file")
    ledger.quirk("spelling", {"detected": spelling, "columns": list(cols.values()),
                              "file_format": src.fmt, "encoding": src.encoding})
    ledger.events.rows_in = len(src.raw)

    p = _parse(src.raw, cols)
    ts_utc = _to_utc(p.naive_ts, p.aware, ledger)
    _record_quirks(p, src.raw, ledger)

    # Raw user ids: CustomerID (customer recipe) or the invoice (unisrec-or), as hashed.
    prefix = f"{opts.user_namespace}:" if opts.user_namespace else ""
    customer_key = (prefix + p.customer).where(p.customer.notna())
    # The quarantine keeps the source row as read, with the customer id replaced by the same
    # string the events hash, so that Ledger.quarantine pseudonymises it consistently; the
    # invoice is hashed as the events' session_id is.
    qsrc = src.raw.copy()
    qsrc[cols["customer_id"]] = customer_key
    qsrc["_file"] = src.files
    qsrc["_row"] = src.rows
    rules = RowRules(ledger, qsrc, user_column=cols["customer_id"],
                     session_columns=(cols["invoice"],))

    if recipe == "customer":
        alive = _customer_rules(p, src.raw, cols, rules)
        user = customer_key
        titles = _most_frequent_title(p)
        min_events = 0
    else:
        alive = _unisrec_rules(p, cols, rules)
        ns = opts.user_namespace or platform
        user = (f"{ns}:" + p.invoice).where(p.invoice.notna())
        titles = _first_title_lowercased(p)
        min_events = UNISREC_K_CORE

    events = pd.DataFrame({
        "user_id": user[alive],
        "item_id": p.code[alive],
        "event_type": "purchase",
        "timestamp": ts_utc[alive],
        "quantity": p.quantity[alive],
        "price": p.price[alive],
        "session_id": p.invoice[alive],
        "event_index": _tie_order(np.flatnonzero(alive), recipe, opts.seed),
        "_file": src.files[alive],
        "_row": src.rows[alive],
    }).reset_index(drop=True)

    items = _catalog(p, titles, src, recipe, ledger)
    ledger.quirk("recipe", recipe)
    if recipe == "unisrec-or":
        ledger.quirk("tie_order", f"lines of one invoice share a timestamp; their order is a "
                                  f"seeded permutation (seed {opts.seed}), not the file order")
    return [SourceFrames(platform, events, items, ledger, str(path),
                         min_user_events=min_events, min_item_events=min_events)]


# --------------------------------------------------------------------------------------------
# reading


def _read_file(path: Path) -> _Source:
    """Read every column as it is stored; CSV cells stay text so that "NA" or "nan" survive."""
    if not path.is_file():
        raise IngestError(str(path), "uci-online-retail source must be a .parquet, .csv or "
                          ".xlsx file")
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        raw = pd.read_parquet(path)
        return _Source(raw, np.full(len(raw), str(path), dtype=object),
                       np.arange(1, len(raw) + 1, dtype=np.int64), "parquet")
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        # UTF-8 (a BOM is dropped), or ISO-8859-1 as the UCI/Kaggle CSV export.
        raw, encoding = read_csv_text(path, utf8="utf-8-sig", empty_is_missing=False)
        # Line number in the file: the header is line 1 (descriptions hold no newlines).
        return _Source(raw, np.full(len(raw), str(path), dtype=object),
                       np.arange(2, len(raw) + 2, dtype=np.int64), "csv", encoding)
    if name.endswith(".xlsx"):
        return _Source(*read_workbook(path), "xlsx")
    raise IngestError(str(path), "unsupported file type: expected .parquet, .csv or .xlsx")


# --------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class _Lines:
    """The invoice lines parsed once (one entry per source row), shared by rules and quirks."""

    invoice: pd.Series  # string, <NA> where blank
    code: pd.Series  # StockCode, string, <NA> where blank
    desc: pd.Series  # Description, <NA> where missing (null, blank or "nan")
    desc_missing: np.ndarray  # bool
    quantity: pd.Series  # float64, NaN where unparseable
    price: pd.Series  # float64, NaN where blank or unparseable
    price_unparseable: int
    price_blank: int
    naive_ts: pd.Series  # datetime64[us], UK wall-clock (UTC when ``aware``), NaT if unparseable
    aware: bool
    customer: pd.Series  # string, <NA> where missing
    cancelled: np.ndarray  # bool: invoice starts with "C"

    @property
    def n(self) -> int:
        return len(self.invoice)


def _parse(raw: pd.DataFrame, cols: dict[str, str]) -> _Lines:
    invoice = stripped_text(raw[cols["invoice"]])
    desc = raw[cols["description"]].astype("string").str.strip()
    desc_missing = (desc.isna() | desc.str.lower().isin(_MISSING_TEXT)).to_numpy(dtype=bool)
    price_raw = raw[cols["unit_price"]]
    price = pd.to_numeric(price_raw, errors="coerce").astype("float64")
    price_blank = stripped_text(price_raw.astype("string")).isna()
    naive_ts, aware = parse_wall_clock(raw[cols["invoice_date"]], _DATE_FORMATS)
    return _Lines(
        invoice=invoice,
        code=stripped_text(raw[cols["stock_code"]]),
        desc=desc.where(~desc_missing),
        desc_missing=desc_missing,
        quantity=pd.to_numeric(raw[cols["quantity"]], errors="coerce").astype("float64"),
        price=price,
        price_unparseable=int((price.isna() & ~price_blank).sum()),
        price_blank=int(price_blank.sum()),
        naive_ts=naive_ts,
        aware=aware,
        customer=whole_number_ids(raw[cols["customer_id"]]),
        cancelled=invoice.str.upper().str.startswith("C").fillna(False).to_numpy(dtype=bool),
    )


def _to_utc(naive: pd.Series, aware: bool, ledger: Ledger) -> pd.Series:
    """Localise the shop's UK wall-clock time to Europe/London, then convert to UTC."""
    if aware:
        ledger.quirk("timezone", "InvoiceDate carries a time zone: converted to UTC")
        return naive.dt.tz_localize("UTC")
    out, n_ambiguous, n_nonexistent = localize_wall_clock(naive, SOURCE_TZ)
    ledger.quirk("timezone", {
        "source": f"InvoiceDate is UK wall-clock time: localised as {SOURCE_TZ}, stored as UTC",
        "ambiguous_local_times": n_ambiguous,
        "ambiguous_policy": "read as summer time (BST)",
        "nonexistent_local_times": n_nonexistent,
        "nonexistent_policy": "shifted forward to the first valid time",
    })
    return out


# --------------------------------------------------------------------------------------------
# rules


def _parse_errors(p: _Lines, cols: dict[str, str], rules: RowRules) -> None:
    rules.quarantine(p.quantity.isna().to_numpy(), "invalid_quantity", cols["quantity"])
    rules.quarantine(p.naive_ts.isna().to_numpy(), "invalid_timestamp", cols["invoice_date"])


def _non_product(code: pd.Series) -> np.ndarray:
    upper = code.str.upper()
    return (upper.isin(NON_PRODUCT_CODES) | code.str.match(_NON_PRODUCT_RE)).fillna(
        False).to_numpy(dtype=bool)


def _customer_rules(p: _Lines, raw: pd.DataFrame, cols: dict[str, str],
                    rules: RowRules) -> np.ndarray:
    _parse_errors(p, cols, rules)
    rules.filter(p.cancelled, "cancellation")
    rules.filter(_non_product(p.code), "non_product_code")
    rules.filter((p.quantity <= 0).to_numpy(), "non_positive_quantity")
    rules.quarantine(p.desc_missing, "missing_item_text", cols["description"])
    rules.quarantine(p.customer.isna().to_numpy(), "missing_user_id", cols["customer_id"])
    rules.filter_duplicates(raw)  # equal in every source column
    alive, ledger = rules.alive, rules.ledger
    ledger.quirk("zero_price_policy", {
        "policy": "kept: a free line (sample, gift) is still a purchase; price 0.0 recorded",
        "events_with_zero_price": int((alive & (p.price == 0).to_numpy()).sum()),
    })
    ledger.quirk("rule_order", ["invalid_quantity", "invalid_timestamp", "cancellation",
                                "non_product_code", "non_positive_quantity",
                                "missing_item_text", "missing_user_id", "duplicate"])
    return alive


def _unisrec_rules(p: _Lines, cols: dict[str, str], rules: RowRules) -> np.ndarray:
    rules.quarantine(p.desc_missing, "missing_item_text", cols["description"])
    _parse_errors(p, cols, rules)
    # UniSRec parsed '%m/%d/%Y %H:%M' strings: its dedup key has minute resolution.
    rules.filter_duplicates(pd.DataFrame({
        "invoice": p.invoice, "code": p.code, "quantity": p.quantity,
        "minute": p.naive_ts.dt.floor("min"),
    }))
    seconds = p.naive_ts.dt.second.fillna(0).to_numpy() != 0
    rules.ledger.quirk("unisrec_or", {
        "users": "InvoiceNo (cancellation invoices are users too; negative quantities kept)",
        "dedup_key": "(invoice, stock code, quantity, InvoiceDate to the minute)",
        "rows_with_seconds_in_InvoiceDate": int(seconds.sum()),
        "k_core": UNISREC_K_CORE,
        "item_text": "first non-missing description of the code, stripped, lower-cased, + '.'",
        "rule_order": ["missing_item_text", "invalid_quantity", "invalid_timestamp",
                       "duplicate", "(finalize)", "k_core"],
    })
    return rules.alive


# --------------------------------------------------------------------------------------------
# catalog


def _most_frequent_title(p: _Lines) -> pd.Series:
    """Per code: its most frequent description on sale lines (quantity and price > 0).

    Stock adjustments carry notes such as "damages" or "ebay" as description; counting sale
    lines first keeps those out of titles. Then all lines, then the one seen first break ties.
    """
    sale = ((p.quantity > 0) & (p.price > 0)).to_numpy(dtype=bool)
    df = pd.DataFrame({"code": p.code, "desc": p.desc, "pos": np.arange(p.n),
                       "sale": sale})
    df = df.dropna(subset=["code", "desc"])
    g = df.groupby(["code", "desc"], sort=False).agg(
        sales=("sale", "sum"), n=("pos", "size"), first=("pos", "min"))
    g = g.reset_index().sort_values(["code", "sales", "n", "first"],
                                    ascending=[True, False, False, True])
    best = g.drop_duplicates("code", keep="first")
    return pd.Series(best["desc"].to_numpy(), index=best["code"].to_numpy(), dtype="string")


def _first_title_lowercased(p: _Lines) -> pd.Series:
    """UniSRec: the first description seen for the code, stripped, lower-cased, '.' added."""
    df = pd.DataFrame({"code": p.code, "desc": p.desc}).dropna(subset=["code", "desc"])
    first = df.drop_duplicates("code", keep="first")
    text = first["desc"].str.lower() + "."
    return pd.Series(text.to_numpy(), index=first["code"].to_numpy(), dtype="string")


def _tie_order(rows: np.ndarray, recipe: str, seed: int) -> np.ndarray:
    """``event_index`` (the tie-break among equal timestamps) for the kept source rows.

    All lines of an invoice share one timestamp. UniSRec's ``process_or.py`` orders them by
    iterating a Python set, i.e. arbitrarily; the file's line order (the till's scanning order,
    often neighbouring stock codes) would make next-item prediction easier than in the published
    set. So ``unisrec-or`` uses a seeded permutation; ``customer`` keeps the file order.
    """
    if recipe != "unisrec-or":
        return rows.astype(np.int64)
    return np.random.default_rng(seed).permutation(len(rows)).astype(np.int64)


def _catalog(p: _Lines, titles: pd.Series, src: _Source, recipe: str,
             ledger: Ledger) -> pd.DataFrame:
    """One item per distinct StockCode of the file (a blank code is one item, rejected later)."""
    code = p.code.fillna("")
    first = ~code.duplicated(keep="first").to_numpy()
    ids = code[first]
    positive = p.price > 0
    median = p.price[positive].groupby(code[positive]).median()
    items = pd.DataFrame({
        "item_id": ids.to_numpy(),
        "title": ids.map(titles).to_numpy(),
        "price": ids.map(median).to_numpy(dtype="float64", na_value=np.nan),
        "brand": None,
        "category": None,
        "_file": src.files[first],
        "_row": src.rows[first],
    })
    ledger.items.rows_in = len(items)
    if recipe == "customer":
        bad = _non_product(pd.Series(items["item_id"], dtype="string"))
        ledger.filter("items", int(bad.sum()), "non_product_code")
        items = items[~bad]
    ledger.quirk("item_rows", "one per distinct StockCode; price = median positive UnitPrice; "
                 + ("title = most frequent description" if recipe == "customer"
                    else "title = UniSRec text")
                 + "; codes differing only in case are distinct items, as in the source")
    return items.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# quirks


def _record_quirks(p: _Lines, raw: pd.DataFrame, ledger: Ledger) -> None:
    """Counts over the whole file, independent of recipe and rule order."""
    ledger.quirk("exact_duplicate_rows", int(raw.duplicated(keep="first").sum()))
    code, qty, price = p.code, p.quantity, p.price
    cancelled = p.cancelled
    non_product = _non_product(code)
    ledger.quirk("missing_descriptions", {"rows": int(p.desc_missing.sum()),
                                          "note": 'null, blank or the string "nan"'})
    ledger.quirk("cancellations", {
        "rows": int(cancelled.sum()),
        "invoices": int(p.invoice[cancelled].nunique()),
        "with_positive_quantity": int((cancelled & (qty > 0).to_numpy()).sum()),
    })
    ledger.quirk("missing_customer_id", int(p.customer.isna().sum()))
    counts = code[non_product].value_counts()
    ledger.quirk("non_product_codes", {"rows": int(non_product.sum()),
                                       "by_code": {str(k): int(v) for k, v in counts.items()}})
    other = code[~non_product & code.notna() & ~code.str.match(_PRODUCT_RE).fillna(False)]
    oc = other.value_counts()
    ledger.quirk("other_stock_code_formats", {
        "note": "not of the form 5 digits + letters, kept as products",
        "codes": int(len(oc)), "rows": int(oc.sum()),
        "by_code": {str(k): int(v) for k, v in oc.head(_MAX_LISTED_CODES).items()},
    })
    ordinary = ~cancelled
    ledger.quirk("non_positive_quantity", {
        "rows_on_ordinary_invoices": int((ordinary & (qty <= 0).to_numpy()).sum()),
        "negative_rows_total": int((qty < 0).sum()),
    })
    ledger.quirk("prices", {
        "zero": int((price == 0).sum()), "negative": int((price < 0).sum()),
        "blank": p.price_blank, "unparseable_set_to_null": p.price_unparseable,
    })
    distinct = pd.Series(code.dropna().unique(), dtype="string")
    ledger.quirk("stock_codes_differing_only_in_case",
                 int(distinct.str.upper().duplicated(keep=False).sum()))
    desc = pd.DataFrame({"code": code, "desc": p.desc}).dropna()
    per_code = desc.drop_duplicates().groupby("code").size()
    ledger.quirk("descriptions_vary_per_stock_code", {
        "codes": int((per_code > 1).sum()), "max_descriptions": int(per_code.max())
        if len(per_code) else 0,
    })
