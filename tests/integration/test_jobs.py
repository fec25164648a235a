"""The command line and the pipeline job, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.data.lake import list_platforms, read_report

REPO = Path(__file__).resolve().parents[2]


def _recsys(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECSYS_PSEUDONYM_KEY": "11" * 16}
    return subprocess.run([sys.executable, "-m", "recsys.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_ingest_synthetic_prints_summary(tmp_path: Path) -> None:
    r = _recsys("ingest", "--source", "synthetic", "--out", str(tmp_path / "lake"),
                "--scale", "0.1", "--num-platforms", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "shop_d" in r.stdout and "quarant." in r.stdout
    assert list_platforms(tmp_path / "lake") == ["shop_a", "shop_b", "shop_c", "shop_d"]
    assert read_report(tmp_path / "lake", "shop_d")["events"]["invariant_holds"]


def test_cli_bad_input_is_named_and_nothing_written(tmp_path: Path) -> None:
    bad = tmp_path / "events.csv"
    bad.write_text("customer,sku\n1,a\n")
    r = _recsys("ingest", "--source", "generic", "--path", str(bad), "--platform", "shop",
                "--map", "user_id=customer", "--map", "item_id=sku", "--map", "timestamp=when",
                "--out", str(tmp_path / "lake"), cwd=tmp_path)
    assert r.returncode != 0
    assert "events.csv" in r.stderr and "when" in r.stderr
    assert list_platforms(tmp_path / "lake") == []


def test_cli_rejects_multiple_platforms_for_one_source(tmp_path: Path) -> None:
    r = _recsys("ingest", "--source", "recbole", "--path", str(tmp_path), "--platform", "a,b",
                "--out", str(tmp_path / "lake"), cwd=tmp_path)
    assert r.returncode != 0 and "one platform per" in r.stderr


def test_pipeline_job_data_stages(ray_cluster, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.pipeline import main

    rc = main(["--config", str(REPO / "configs/pipeline/demo.yaml"),
               f"data.lake={tmp_path}/lake", f"data.examples={tmp_path}/examples",
               f"work_dir={tmp_path}/work", "stages=[ingest,examples]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "stage times" in out and "distinct texts tokenised once" in out
    manifest = json.loads((tmp_path / "examples" / "manifest.json").read_text())
    assert set(manifest["platforms"]) == {"shop_a", "shop_b", "shop_c"}
    for counts in manifest["platforms"].values():
        assert counts["users"] + counts["users_too_short"] == counts["lake_users"]


def test_pipeline_job_rejects_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from jobs.pipeline import main

    rc = main(["--config", str(REPO / "configs/pipeline/demo.yaml"), "data.sequencez.x=1"])
    assert rc == 2
    assert "unknown key 'data.sequencez'" in capsys.readouterr().err
