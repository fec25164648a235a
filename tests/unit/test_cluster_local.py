"""The multi-node helpers without starting anything: the S3 environment, where a run with an
S3 ``output_dir`` keeps its local files, and the placement strategy's validation
(tests/integration/test_multinode.py runs the real thing, marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.cluster_local import LocalS3
from recsys.training.config import TrainJobConfig
from recsys.training.run import RESUMABLE, resume_fingerprint, run_dir


def test_local_s3_env_points_every_client_at_the_endpoint(tmp_path: Path) -> None:
    s3 = LocalS3("http://127.0.0.1:5555", "b", popen=None, log_path=tmp_path)  # type: ignore[arg-type]
    env = s3.env()
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:5555"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_DEFAULT_REGION"]


def test_an_s3_output_dir_keeps_export_and_report_under_the_work_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path))
    cfg = TrainJobConfig(name="r", output_dir="s3://bucket/ray")
    assert run_dir(cfg) == tmp_path / "train" / "s3" / "bucket" / "ray" / "r"
    other = TrainJobConfig(name="r", output_dir="s3://bucket/other/")
    assert run_dir(other) == tmp_path / "train" / "s3" / "bucket" / "other" / "r"
    assert run_dir(TrainJobConfig(name="r", output_dir="runs/x")) == Path("runs/x/r")


def test_resume_false_deletes_the_previous_run_in_uri_storage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the pipeline (resume=false) does with RECSYS_STORAGE_PATH: the run's previous
    ``<output_dir>/<name>`` goes (pyarrow; file:// stands in for s3://), its siblings stay."""
    from recsys.training.run import _start_over, run_dir

    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path / "work"))
    (tmp_path / "store" / "r" / "checkpoint_000000").mkdir(parents=True)
    (tmp_path / "store" / "other").mkdir()
    cfg = TrainJobConfig(name="r", output_dir=f"file://{tmp_path}/store/", resume=False)
    local = tmp_path / "work" / "train" / "file" / str(tmp_path / "store").strip("/") / "r"
    assert run_dir(cfg) == local  # the URI's mirror under the work dir
    (local / "export").mkdir(parents=True)
    _start_over(cfg)
    assert not (tmp_path / "store" / "r").exists() and (tmp_path / "store" / "other").exists()
    assert not local.exists()
    _start_over(cfg)  # nothing left to delete


def test_placement_strategy_is_validated_and_resumable() -> None:
    cfg = TrainJobConfig(scaling={"placement_strategy": "STRICT_SPREAD"})
    assert cfg.scaling.placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ValidationError):
        TrainJobConfig(scaling={"placement_strategy": "ANYWHERE"})
    assert "scaling.placement_strategy" in RESUMABLE
    assert resume_fingerprint(cfg) == resume_fingerprint(TrainJobConfig())
