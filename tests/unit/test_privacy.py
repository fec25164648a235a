"""No raw identifier leaves ingest: not in events, not in quarantine, not in reports."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data.audit import scan
from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.ingest.synthetic import generate
from recsys.data.lake import platform_dir, read_events
from recsys.data.pseudonym import SESSION_PREFIX, Pseudonymizer
from recsys.data.schema import QUARANTINE_KEY_METADATA, QUARANTINE_PSEUDONYMISED_METADATA
from recsys.serving.history import HistoryStore


def _lake(tmp_path: Path, key: bytes, name: str) -> Path:
    out = tmp_path / name
    ingest(IngestOptions(source="synthetic", out=out, scale=0.1, seed=5), Pseudonymizer(key))
    return out


def test_raw_ids_never_reach_the_lake(tmp_path: Path) -> None:
    lake = _lake(tmp_path, b"a" * 32, "lake")
    raw = set()
    for events, _ in generate(3, 0.1, 5).values():
        raw |= set(events["user_id"].astype(str))
    assert raw
    for f in lake.rglob("*"):
        if f.suffix == ".parquet":
            text = pq.read_table(f).to_pandas().astype(str).to_csv()
        elif f.suffix == ".json":
            text = f.read_text()
        else:
            continue
        leaked = [r for r in raw if r in text]
        assert not leaked, f"{f} contains raw user ids {leaked[:3]}"


def test_same_key_links_platforms_other_key_does_not(tmp_path: Path) -> None:
    one = _lake(tmp_path, b"a" * 32, "one")
    users = {p: set(read_events(one, p)["user_id"].to_pylist())
             for p in ("shop_a", "shop_b", "shop_c")}
    assert users["shop_a"] & users["shop_b"], "overlapping users must share a pseudonym"
    two = _lake(tmp_path, b"b" * 32, "two")
    other = set(read_events(two, "shop_a")["user_id"].to_pylist())
    assert len(other) == len(users["shop_a"])
    assert other.isdisjoint(users["shop_a"])


# -- every adapter: identifiers hashed in the quarantine too ---------------------------------------
#
# User ids AND session/invoice ids are e-mail-like here, and each source has bad rows, so the
# quarantine is not empty. The scan reads Parquet through pyarrow (every string column) and
# every other file as bytes; it must find the raw ids in the sources (so it can fail) and none
# in the lake (events, catalog, quarantine, report.json).

KEY = bytes(range(32))
PSEUDO = Pseudonymizer(KEY)
JANE, BOB = "jane.doe+17@example.com", "Bob.Smith@Example.org"
SESSION_1, SESSION_2 = "sess-1.jane@cookies.example.net", "sess-2.bob@cookies.example.net"


def _generic(src: Path, fmt: str) -> dict:
    df = pd.DataFrame({
        "user_id": [JANE, JANE, BOB, BOB, BOB, "", JANE],
        "item_id": ["i1", "i2", "i1", "i2", "ghost", "i1", "i1"],
        "timestamp": ["2025-01-01T10:00:00Z", "2025-01-01T10:01:00Z", "2025-01-02T09:00:00Z",
                      "not a date", "2025-01-02T09:02:00Z", "2025-01-02T09:03:00Z",
                      "2025-01-03T09:00:00Z"],
        "event_type": ["view", "purchase", "view", "view", "view", "view", "wishlist"],
        "session_id": [SESSION_1, SESSION_1, SESSION_2, SESSION_2, SESSION_2, SESSION_2,
                       SESSION_1],
        "title": ["Mug", "Pen", "Mug", "Pen", "Ghost", "Mug", "Mug"],
    })
    path = src / f"events.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    catalog = src / "items.csv"
    pd.DataFrame({"item_id": ["i1", "i2"], "title": ["Mug", "Pen"]}).to_csv(catalog, index=False)
    return {"source": "generic", "path": path, "items_path": catalog, "platform": "shop"}


def _uci(src: Path, recipe: str) -> dict:
    inv1, inv2 = "inv.1@billing.example.com", "inv.2@billing.example.com"
    rows = [  # InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID
        (inv1, "85123A", "WHITE HEART", "6", "12/1/2010 8:26", "2.55", JANE),
        (inv1, "71053", "WHITE LANTERN", "6", "12/1/2010 8:26", "3.39", JANE),
        (inv2, "22139", "nan", "5", "12/1/2010 9:00", "0.0", BOB),          # missing_item_text
        (inv2, "22556", "PLASTERS", "abc", "12/2/2010 11:00", "1.65", BOB),  # invalid_quantity
        (inv2, "22557", "TIN", "2", "12/1/2010 9:20", "-1.0", BOB),          # negative_price
        (inv2, "22558", "TEA SET", "2", "12/1/2010 9:05", "4.95", ""),       # missing_user_id
    ]
    path = src / "retail.csv"
    pd.DataFrame(rows, columns=["InvoiceNo", "StockCode", "Description", "Quantity",
                                "InvoiceDate", "UnitPrice", "CustomerID"]
                 ).assign(Country="UK").to_csv(path, index=False)
    return {"source": "uci-online-retail", "path": path, "platform": "retail", "recipe": recipe}


def _amazon(src: Path) -> dict:
    reviews = src / "reviews.json"
    reviews.write_text("\n".join(json.dumps(r) for r in [
        {"reviewerID": JANE, "asin": "B01", "unixReviewTime": 1600000000, "overall": 5},
        {"reviewerID": JANE, "asin": "B02", "unixReviewTime": 1600000100, "overall": 4},
        {"reviewerID": BOB, "asin": "B99", "unixReviewTime": 1600000200, "overall": 3},  # ghost
        {"reviewerID": BOB, "asin": "B01", "unixReviewTime": None, "overall": 3},  # no time
    ]) + "\n")
    meta = src / "meta.json"
    meta.write_text("\n".join(json.dumps(r) for r in [
        {"asin": "B01", "title": "Mug"}, {"asin": "B02", "title": "Pen"}]) + "\n")
    return {"source": "amazon-json", "path": reviews, "items_path": meta, "platform": "shop"}


def _recbole(src: Path) -> dict:
    d = src / "mini"
    d.mkdir()
    (d / "mini.inter").write_text(
        "session_id:token\titem_id:token\ttimestamp:float\n"
        f"{SESSION_1}\t10\t881250949\n{SESSION_1}\t20\t881250950\n"
        f"{SESSION_2}\t10\tyesterday\n{SESSION_2}\t99\t881250970\n")
    (d / "mini.item").write_text("item_id:token\ttitle:token_seq\n10\tMug\n20\tPen\n")
    return {"source": "recbole", "path": d, "platform": "movies"}


def _unisrec(src: Path) -> dict:
    d = src / "uni"
    d.mkdir()
    (d / "Mini.user2index").write_text(f"{JANE}\t1\n{BOB}\t2\n")
    (d / "Mini.item2index").write_text("A\t1\nB\t2\nC\t3\nD\t4\n")
    (d / "Mini.text").write_text("item_id:token\ttext:token_seq\n1\tMug\n2\tPen\n3\tCup\n"
                                 "4\tInk\n")
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (d / "Mini.train.inter").write_text(head + "1\t1\t2\n2\t2\t9\n")  # 9: unknown item index
    (d / "Mini.valid.inter").write_text(head + "1\t1 2\t3\n2\t2 9\t1\n")
    (d / "Mini.test.inter").write_text(head + "1\t1 2 3\t4\n2\t2 9 1\t3\n")
    return {"source": "unisrec", "path": d, "platform": "mini"}


SOURCES = {
    "generic-csv": lambda src: _generic(src, "csv"),
    "generic-parquet": lambda src: _generic(src, "parquet"),
    "uci-customer": lambda src: _uci(src, "customer"),
    "uci-unisrec-or": lambda src: _uci(src, "unisrec-or"),
    "amazon-json": _amazon,
    "recbole-sessions": _recbole,
    "unisrec": _unisrec,
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_no_raw_identifier_in_lake_or_quarantine(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    opts = SOURCES[name](src)
    out = tmp_path / "lake"
    written = ingest(IngestOptions(**opts, out=out), Pseudonymizer(KEY))
    report = written[0].report
    assert report["events"]["rows_quarantined"] > 0, "the test needs a non-empty quarantine"
    quarantine = pq.read_table(written[0].path / "quarantine" / "events.parquet")
    hashed = json.loads(quarantine.schema.metadata[QUARANTINE_PSEUDONYMISED_METADATA])
    assert hashed == report["events"]["quarantine_pseudonymised_columns"]
    assert hashed, "the quarantine must say which columns it pseudonymised"
    assert quarantine.schema.metadata[QUARANTINE_KEY_METADATA].decode() == PSEUDO.fingerprint
    assert {"_file", "_row", "_reason"} <= set(quarantine.column_names)  # still diagnosable

    raw = [JANE, BOB, SESSION_1, SESSION_2, "inv.1@billing", "jane.doe", "Bob.Smith"]
    assert scan([src], raw), "the scan must see the raw ids in the source"
    hits = scan([out], raw)
    assert not hits, f"raw identifiers in the lake: {hits[:5]}"


def test_quarantined_ids_hash_like_the_lake(tmp_path: Path) -> None:
    """A quarantined row's user and session pseudonyms are the lake's: it can be joined back."""
    src = tmp_path / "src"
    src.mkdir()
    ingest(IngestOptions(**_generic(src, "csv"), out=tmp_path / "lake"), PSEUDO)
    q = pq.read_table(platform_dir(tmp_path / "lake", "shop") / "quarantine" / "events.parquet"
                      ).to_pandas().set_index("_reason")
    ev = read_events(tmp_path / "lake", "shop").to_pandas()
    assert q.loc["unknown_event_type", "user_id"] == PSEUDO.one(JANE)
    assert q.loc["unknown_event_type", "session_id"] in set(ev["session_id"])
    assert q.loc["unknown_event_type", "session_id"] == PSEUDO.one(SESSION_1,
                                                                   prefix=SESSION_PREFIX)
    assert pd.isna(q.loc["missing_user_id", "user_id"])  # missing stays missing
    assert q.loc["missing_user_id", "session_id"] == PSEUDO.one(SESSION_2, prefix=SESSION_PREFIX)
    assert q.loc["invalid_timestamp", "source_timestamp"] == "not a date"  # kept as text


def test_uci_invoice_hashed_as_the_lake_session(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ingest(IngestOptions(**_uci(src, "customer"), out=tmp_path / "lake"), PSEUDO)
    q = pq.read_table(platform_dir(tmp_path / "lake", "retail") / "quarantine" /
                      "events.parquet")
    kinds = json.loads(q.schema.metadata[QUARANTINE_PSEUDONYMISED_METADATA])
    assert kinds["InvoiceNo"] == "session" and kinds["CustomerID"] == "user"
    q = q.to_pandas().set_index("_reason")
    inv2 = PSEUDO.one("inv.2@billing.example.com", prefix=SESSION_PREFIX)
    assert q.loc["missing_item_text", "InvoiceNo"] == inv2
    assert q.loc["missing_item_text", "CustomerID"] == PSEUDO.one(BOB)
    assert q.loc["missing_item_text", "Description"] == "nan"  # the rest stays readable


def test_ingest_and_serving_normalise_ids_the_same_way(tmp_path: Path) -> None:
    """Ids with stray blanks or full-width letters at ingest are found by a request that
    spells them plainly, and the other way round (serving hashes with the same function)."""
    path = tmp_path / "events.csv"
    pd.DataFrame({
        "user_id": [" Alice@Example.com ", "\uff21lice@Example.com", "carol@example.com\u00a0"],
        "item_id": ["i1", "i2", "i1"],
        "timestamp": [1700000000, 1700000100, 1700000200],
        "title": ["Mug", "Pen", "Mug"],
    }).to_csv(path, index=False)
    ingest(IngestOptions(source="generic", path=path, platform="shop", event_type="view",
                         item_columns={"title": "title"}, out=tmp_path / "lake"), PSEUDO)
    users = set(read_events(tmp_path / "lake", "shop")["user_id"].to_pylist())
    assert users == {PSEUDO.one("Alice@Example.com"), PSEUDO.one("carol@example.com")}
    store = HistoryStore.from_lake(tmp_path / "lake")
    for request_id in ("Alice@Example.com", "  Alice@Example.com\t", "\uff21lice@Example.com"):
        assert store.lookup(PSEUDO.one(request_id))["shop"].items == ("i1", "i2")
    assert store.lookup(PSEUDO.one(" carol@example.com"))["shop"].items == ("i1",)
    assert store.lookup(PSEUDO.one("alice@example.com")) == {}  # case is part of the id
