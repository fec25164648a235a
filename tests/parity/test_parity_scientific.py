"""Parity with UniSRec/VQ-Rec's published Scientific split: counts and the exact valid/test
targets, through ingest and the Ray Data pipeline."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys.data.examples import DataConfig, build_example_set, read_split
from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.lake import read_report
from recsys.data.pseudonym import Pseudonymizer

KEY = Pseudonymizer(bytes(range(32)))


def _rows(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.open()][1:]


@pytest.fixture(scope="module")
def scientific(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = shared_data / "amazon18_scientific_unisrec"
    lake = tmp_path_factory.mktemp("lake")
    ingest(IngestOptions(source="unisrec", path=src, platform="scientific", out=lake), KEY)
    return src, lake


def test_counts(scientific: tuple[Path, Path]) -> None:
    _, lake = scientific
    report = read_report(lake, "scientific")
    assert report["users"] == 8442
    assert report["items_with_events"] == report["catalog_items"] == 4385
    assert report["events"]["rows_out"] == 59427
    assert report["events"]["invariant_holds"] and report["items"]["invariant_holds"]


def test_exact_valid_and_test_targets(ray_cluster, scientific: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    src, lake = scientific
    es = build_example_set(DataConfig(lake=str(lake), examples=str(tmp_path / "ex"),
                                      sequences={"max_seq_len": 50, "collapse_repeats": False}))
    catalog = pq.read_table(es.path / "catalog" / "scientific.parquet")
    idx_to_asin = dict(zip(catalog["item_idx"].to_pylist(), catalog["item_id"].to_pylist()))
    item_of = {line.split("\t")[1].strip(): line.split("\t")[0]
               for line in (src / "Scientific.item2index").open()}
    user_of = {line.split("\t")[1].strip(): line.split("\t")[0]
               for line in (src / "Scientific.user2index").open()}
    for split in ("valid", "test"):
        expected = {KEY.one(user_of[u]): ([item_of[i] for i in hist.split()], item_of[t])
                    for u, hist, t in _rows(src / f"Scientific.{split}.inter")}
        got = {r["user_id"]: ([idx_to_asin[i] for i in r["history"]], idx_to_asin[r["target"]])
               for r in read_split(es, split).to_pylist()}
        assert len(got) == len(expected) == 8442
        assert got == expected, f"{split} split differs from the published file"
