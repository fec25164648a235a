"""Streaming ingest (chunk_rows): the same lake as the in-memory path, bounded chunks, atomic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from recsys.data import lake
from recsys.data.ingest import stream, tables
from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer

PSEUDO = Pseudonymizer(bytes(range(32)))
ROWS = 5200
CHUNK = 1000
MAPPING = {"user_id": "uid", "item_id": "sku", "timestamp": "when", "event_type": "what",
           "price": "cost"}
BAD = {1500: ("uid", ""), 2700: ("when", "not-a-time"), 3100: ("what", "wishlist"),
       4200: ("sku", "NOPE"), 4800: ("cost", "-3")}


def _events(with_titles: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = ROWS
    ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 10**6, n), "s")
    df = pd.DataFrame({
        "uid": [f"u{k}" for k in rng.integers(0, 300, n)],
        "sku": [f"I{k}" for k in rng.integers(0, 60, n)],
        "when": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "what": rng.choice(["view", "click", "Purchase"], n),
        "cost": [f"{v:.2f}" for v in rng.uniform(1, 20, n)],
    })
    for row, (col, value) in BAD.items():
        df.loc[row, col] = value
    if with_titles:  # blank titles early on: the catalog must take a later row's
        df["name"] = np.where(np.arange(n) < 2500, "", "Item " + df["sku"])
    return df


def _items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"I{k}" for k in range(60)] + ["I3", ""],
                         "title": [f"Item {k}" for k in range(59)] + ["", "dup", "x"]})


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_csv(path, index=False)
    return path


def _opts(tmp_path: Path, name: str, events: Path, **kw: Any) -> IngestOptions:
    return IngestOptions(source="generic", out=tmp_path / name, platform="shop", path=events,
                         columns=MAPPING, **kw)


def _frames(lake_dir: Path) -> dict[str, pd.DataFrame]:
    root = lake.platform_dir(lake_dir, "shop")
    keys = ["user_id", "timestamp", "event_index"]
    return {
        "events": lake.read_events(lake_dir, "shop").to_pandas().sort_values(keys)
        .reset_index(drop=True),
        "items": lake.read_items(lake_dir, "shop").to_pandas(),
        "q_events": pd.read_parquet(root / "quarantine" / "events.parquet")
        .sort_values(["_file", "_row"]).reset_index(drop=True),
        "q_items": pd.read_parquet(root / "quarantine" / "items.parquet"),
    }


def _assert_same_lake(memory: Path, streamed: Path) -> dict[str, Any]:
    a, b = _frames(memory), _frames(streamed)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    ra, rb = lake.read_report(memory, "shop"), lake.read_report(streamed, "shop")
    assert set(ra) == set(rb)
    for key in ("events", "items", "users", "items_with_events", "catalog_items",
                "first_event", "last_event", "event_types"):
        assert ra[key] == rb[key], key
    assert rb["events"]["invariant_holds"] and rb["items"]["invariant_holds"]
    assert {k: v for k, v in rb["quirks"].items() if k != "streaming"} == ra["quirks"]
    return rb


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_stream_equals_memory(tmp_path: Path, suffix: str) -> None:
    events = _write(_events(), tmp_path / f"events{suffix}")
    items = _write(_items(), tmp_path / "items.csv")
    ingest(_opts(tmp_path, "mem", events, items_path=items), PSEUDO)
    ingest(_opts(tmp_path, "str", events, items_path=items, chunk_rows=CHUNK), PSEUDO)
    report = _assert_same_lake(tmp_path / "mem", tmp_path / "str")
    assert report["quirks"]["streaming"]["chunks"] == -(-ROWS // CHUNK)
    reasons = report["events"]["quarantined_by_reason"]
    assert set(reasons) == {"invalid_timestamp", "item_not_in_catalog", "missing_user_id",
                            "negative_price", "unknown_event_type"}
    q = _frames(tmp_path / "str")["q_events"]
    row_of = 2 if suffix == ".csv" else 1
    assert {r + row_of for r in BAD} <= set(q["_row"])


def test_stream_catalog_from_events(tmp_path: Path) -> None:
    events = _write(_events(with_titles=True), tmp_path / "events.csv")
    kw: dict[str, Any] = {"item_columns": {"title": "name"}}
    ingest(_opts(tmp_path, "mem", events, **kw), PSEUDO)
    ingest(_opts(tmp_path, "str", events, chunk_rows=CHUNK, **kw), PSEUDO)
    _assert_same_lake(tmp_path / "mem", tmp_path / "str")
    assert lake.read_items(tmp_path / "str", "shop")["title"][0].as_py().startswith("Item ")


def test_stream_epoch_timestamps_and_directory(tmp_path: Path) -> None:
    df = _events()
    df["when"] = (1_700_000_000 + np.arange(len(df)) * 7).astype(str)
    df.loc[2700, "when"] = ""
    src = tmp_path / "logs"
    src.mkdir()
    _write(df.iloc[:2600], src / "a.csv")
    _write(df.iloc[2600:], src / "b.csv")
    items = _write(_items(), tmp_path / "items.csv")
    ingest(_opts(tmp_path, "mem", src, items_path=items), PSEUDO)
    ingest(_opts(tmp_path, "str", src, items_path=items, chunk_rows=CHUNK), PSEUDO)
    _assert_same_lake(tmp_path / "mem", tmp_path / "str")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_chunks_never_exceed_chunk_rows(tmp_path: Path, suffix: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(_events(), tmp_path / f"events{suffix}")
    sizes = [len(df) for df, _, _ in tables.iter_table(path, ["uid", "sku"], CHUNK)]
    assert sum(sizes) == ROWS and max(sizes) <= CHUNK and len(sizes) > 4
    seen: list[int] = []
    real = stream.iter_table

    def spy(*args: Any) -> Any:
        for chunk in real(*args):
            seen.append(len(chunk[0]))
            yield chunk

    monkeypatch.setattr(stream, "iter_table", spy)
    items = _write(_items(), tmp_path / "items.csv")
    ingest(_opts(tmp_path, "str", path, items_path=items, chunk_rows=CHUNK), PSEUDO)
    assert max(seen) <= CHUNK and sum(seen) == ROWS


def _lake_state(lake_dir: Path) -> tuple[dict[str, Any], list[str]]:
    return (lake.read_report(lake_dir, "shop"),
            sorted(p.name for p in lake_dir.iterdir()))


def test_failed_stream_leaves_previous_lake(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    items = _write(_items(), tmp_path / "items.csv")
    good = _write(_events(), tmp_path / "events.csv")
    ingest(_opts(tmp_path, "lake", good, items_path=items, chunk_rows=CHUNK), PSEUDO)
    before = _lake_state(tmp_path / "lake")
    # A quote that never closes, well after the first chunks were spilled.
    lines = good.read_text().splitlines()
    lines[3500] = '"' + lines[3500]
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(IngestError, match="broken.csv"):
        ingest(_opts(tmp_path, "lake", broken, items_path=items, chunk_rows=CHUNK), PSEUDO)
    assert _lake_state(tmp_path / "lake") == before

    def boom(self: stream.Spill, staging: Path) -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(stream.Spill, "write_buckets", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(_opts(tmp_path, "lake", good, items_path=items, chunk_rows=CHUNK), PSEUDO)
    assert _lake_state(tmp_path / "lake") == before


def test_stream_refuses_k_core_and_other_sources(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="min_user_events.*chunk_rows"):
        _opts(tmp_path, "lake", tmp_path / "e.csv", chunk_rows=CHUNK, min_user_events=5)
    with pytest.raises(ValidationError, match="chunk_rows.*'generic' only"):
        IngestOptions(source="recbole", out=tmp_path, platform="x", path=tmp_path,
                      chunk_rows=CHUNK)
    with pytest.raises(ValidationError, match="chunk_rows"):
        _opts(tmp_path, "lake", tmp_path / "e.csv", chunk_rows=10)


def test_bucket_count(tmp_path: Path) -> None:
    path = _write(_events(), tmp_path / "events.parquet")
    opts = _opts(tmp_path, "lake", path, chunk_rows=CHUNK)
    assert stream.bucket_count(opts, [path]) == (1, "estimated row count")
    assert stream.bucket_count(opts.model_copy(update={"buckets": 7}), [path])[0] == 7
    gz = tmp_path / "events.csv.gz"
    _events().to_csv(gz, index=False)
    assert stream.bucket_count(opts, [gz])[0] == lake.MAX_BUCKETS
    assert tables.estimate_rows(_write(_events(), tmp_path / "e.csv")) == pytest.approx(
        ROWS, rel=0.05)


def test_pseudonym_cache_is_bounded_and_exact() -> None:
    cached = stream.CachedPseudonymizer(PSEUDO, limit=5)
    for batch in (["a", "b", None, "a"], ["c", "d", "e", "a"], ["f", "b", "g"], ["a"] * 3):
        assert cached.many(batch) == PSEUDO.many(batch)
        assert len(cached.cache[""]) <= max(5, len(set(batch)))
    assert cached.many(["a"], prefix="s:") == PSEUDO.many(["a"], prefix="s:")
    assert cached.fingerprint == PSEUDO.fingerprint
