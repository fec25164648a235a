"""Pseudonyms everywhere: a multi-platform log whose user ids AND session ids are e-mail
addresses, with bad rows, goes through ingest (generic CSV and Parquet), the ingest summary
report and the Ray Data example builder; then every file of the lake (events, catalogs,
quarantine, report.json), the reports directory and the example set is scanned for a raw
e-mail. Parquet is decoded by pyarrow (all string columns and the schema metadata), PNG,
safetensors and zip files where they hold text, every other file read as bytes
(``recsys.data.audit``). The same scan over the raw logs must find
them, so that the test can fail.

Not scanned here: MLflow (the data stages log nothing to it; runs log configs, metrics and
evaluation reports, which hold aggregates) and evaluation reports (they need a trained model:
``tests/integration/test_pipeline.py`` owns that run).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data.audit import scan
from recsys.data.examples import DataConfig, build_example_set
from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import format_ingest_summary, ingest
from recsys.data.ingest.synthetic import generate
from recsys.data.lake import check_key, list_platforms, platform_dir, read_events
from recsys.data.pseudonym import Pseudonymizer, load_key
from recsys.data.schema import QUARANTINE_PSEUDONYMISED_METADATA
from recsys.serving.history import HistoryStore

PLATFORMS = ("shop_a", "shop_b", "shop_c")


def email(user: str) -> str:
    """u000017 -> jane.doe+17@example.com (mixed case for a few: kept as they are)."""
    n = int(user[1:])
    return f"Jane.Doe+{n}@Example.com" if n % 7 == 0 else f"jane.doe+{n}@example.com"


def session_email(session: str) -> str:
    """shop_a-s0000012 -> visit.12.shop_a@sessions.example.org"""
    platform, s = session.rsplit("-s", 1)
    return f"visit.{int(s)}.{platform}@sessions.example.org"


def _bad_rows(events: pd.DataFrame) -> pd.DataFrame:
    """Rows that finalize must quarantine, each with an e-mail user and/or session id."""
    first = events.iloc[0]
    base = {"item_id": first["item_id"], "event_type": "view", "quantity": np.nan,
            "price": np.nan, "session_id": first["session_id"], "user_id": first["user_id"],
            "timestamp": first["timestamp"]}
    return pd.DataFrame([
        {**base, "user_id": None},                          # missing_user_id (session kept)
        {**base, "timestamp": pd.NaT},                      # invalid_timestamp
        {**base, "event_type": "wishlist"},                 # unknown_event_type
        {**base, "item_id": "ghost-item"},                  # item_not_in_catalog
        {**base, "event_type": "purchase", "price": -3.0},  # negative_price
    ])


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pseudonyms")
    logs, lake, reports = root / "logs", root / "lake", root / "reports"
    raw_users: set[str] = set()
    raw_sessions: set[str] = set()
    for name, (events, items) in generate(3, 0.1, 23, list(PLATFORMS)).items():
        events = events.drop(columns=["event_index", "_file", "_row"])
        events["user_id"] = events["user_id"].map(email)
        events["session_id"] = events["session_id"].map(session_email)
        if name == "shop_b":  # stray blanks at one shop: the same people after normalising
            events["user_id"] = " " + events["user_id"] + "\u00a0"
        events = pd.concat([events, _bad_rows(events)], ignore_index=True)
        raw_users |= {u.strip("\u00a0 ") for u in events["user_id"].dropna()}
        raw_sessions |= set(events["session_id"].dropna())
        (logs / name).mkdir(parents=True)
        if name == "shop_a":
            events.to_csv(logs / name / "events.csv", index=False)
        else:
            events.to_parquet(logs / name / "events.parquet", index=False)
        items = items.drop(columns=["_file", "_row"])
        items.to_parquet(logs / f"{name}-items.parquet", index=False)
    written = []
    for name in PLATFORMS:
        path = next((logs / name).iterdir())
        # No pseudonymizer given: the key comes from $RECSYS_PSEUDONYM_KEY (tests/conftest.py),
        # the way `recsys ingest` finds it.
        written += ingest(IngestOptions(source="generic", platform=name, path=path,
                                        items_path=logs / f"{name}-items.parquet", out=lake))
    reports.mkdir()
    summary = format_ingest_summary([w.report for w in written], lake)
    (reports / "ingest.txt").write_text(summary + "\n")
    (reports / "ingest.json").write_text(json.dumps([w.report for w in written], default=str))
    examples = build_example_set(DataConfig(lake=str(lake), examples=str(root / "examples"),
                                            sequences={"max_seq_len": 20}))
    return {"root": root, "logs": logs, "lake": lake, "reports": reports,
            "examples": examples.path, "users": raw_users, "sessions": raw_sessions,
            "written": written}


def test_scan_finds_raw_ids_in_the_logs(world) -> None:
    """The scan can fail: it sees the e-mails in the raw CSV (bytes) and Parquet (decoded)."""
    hits = scan([world["logs"]])
    found = {h.value for h in hits}
    assert {h.path.suffix for h in hits} == {".csv", ".parquet"}
    assert len(found & world["users"]) > 100 and len(found & world["sessions"]) > 100
    sample = sorted(world["users"])[:3] + sorted(world["sessions"])[:3]
    assert {h.value for h in scan([world["logs"]], sample, pattern=None)} == set(sample)


def test_no_raw_id_in_lake_quarantine_reports_or_examples(world) -> None:
    roots = [world["lake"], world["reports"], world["examples"]]
    sample = sorted(world["users"])[:20] + sorted(world["sessions"])[:20]
    hits = scan(roots, sample)
    assert not hits, f"{len(hits)} raw identifiers leaked, e.g. {hits[:5]}"
    # What was scanned: every platform's events, catalog, both quarantine files, report.json.
    for name in PLATFORMS:
        d = platform_dir(world["lake"], name)
        assert (d / "quarantine" / "events.parquet").is_file() and (d / "report.json").is_file()


def test_quarantine_is_not_empty_and_names_hashed_columns(world) -> None:
    for w in world["written"]:
        ev = w.report["events"]
        assert ev["rows_quarantined"] >= 5, ev
        assert {"missing_user_id", "invalid_timestamp", "unknown_event_type",
                "item_not_in_catalog", "negative_price"} <= set(ev["quarantined_by_reason"])
        q = pq.read_table(w.path / "quarantine" / "events.parquet")
        kinds = json.loads(q.schema.metadata[QUARANTINE_PSEUDONYMISED_METADATA])
        assert kinds == {"session_id": "session", "user_id": "user"}
        sessions = set(q["session_id"].to_pylist()) - {None}
        assert sessions and all(len(s) == 32 for s in sessions)  # pseudonyms, not e-mails


def test_users_link_across_shops_and_serving_finds_them(world) -> None:
    """shop_b's ids had stray blanks: normalised, they are the same people as on shop_a, and a
    request spelled either way finds the history (serving uses the same key and function)."""
    key, where = load_key(create_if_missing=False)
    pseudo = Pseudonymizer(key, where)
    keys = check_key(world["lake"], pseudo, purpose="serve")
    assert {k.fingerprint for k in keys} == {pseudo.fingerprint}
    users = {p: set(read_events(world["lake"], p)["user_id"].to_pylist())
             for p in list_platforms(world["lake"])}
    assert users["shop_a"] & users["shop_b"]
    store = HistoryStore.from_lake(world["lake"])
    both = next(u for u in sorted(world["users"])
                if {"shop_a", "shop_b"} <= set(store.lookup(pseudo.one(u))))
    assert store.lookup(pseudo.one(f"  {both}\u00a0")) == store.lookup(pseudo.one(both))
