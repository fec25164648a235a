"""No raw user id leaves ingest: not in events, not in quarantine, not in reports."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.ingest.synthetic import generate
from recsys.data.lake import read_events
from recsys.data.pseudonym import Pseudonymizer


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
