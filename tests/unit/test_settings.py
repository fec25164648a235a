"""Every ``RECSYS_*`` setting has an effect: each test sets one and shows where it lands."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from recsys import cluster
from recsys.config import load_config
from recsys.settings import Settings, get_settings
from recsys.tracking.server import default_root, ensure_tracking
from recsys.tuning.config import SweepConfig
from recsys.tuning.sweep import tune_storage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``ray.init`` recorded instead of run; no cluster is started or joined."""
    import ray

    calls: list[dict[str, Any]] = []

    def fake_init(**kwargs: Any) -> SimpleNamespace:
        calls.append(kwargs)
        return SimpleNamespace(dashboard_url=None)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    for key in ("RAY_ADDRESS", "RECSYS_RAY_ADDRESS", "RECSYS_RAY_NUM_CPUS"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RAY_NUM_CPUS", "3")
    monkeypatch.setenv("RECSYS_STORAGE_PATH", "s3://bucket/recsys")
    s = get_settings()
    assert (s.ray_num_cpus, s.storage_path) == (3, "s3://bucket/recsys")


def test_ray_address_is_joined(ray_init: list[dict[str, Any]],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RAY_ADDRESS", "10.1.2.3:6379")
    cluster.init_ray()
    assert ray_init[-1]["address"] == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # set by `ray job submit`: it wins
    cluster.init_ray()
    assert ray_init[-1]["address"] == "10.9.9.9:6379"


def test_ray_num_cpus_sizes_a_local_cluster(ray_init: list[dict[str, Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.init_ray(dashboard=False)
    assert ray_init[-1]["address"] == "local" and ray_init[-1]["num_cpus"] is None
    monkeypatch.setenv("RECSYS_RAY_NUM_CPUS", "3")
    cluster.init_ray(dashboard=False)
    assert ray_init[-1]["num_cpus"] == 3
    cluster.init_ray(num_cpus=2, dashboard=False)  # the job's own number wins
    assert ray_init[-1]["num_cpus"] == 2


def test_ray_num_cpus_sizes_the_demo_head(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cluster, "_port_open", lambda port, host=cluster.LOOPBACK: False)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("RAY_ADDRESS", "restored-after-the-test")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RECSYS_RAY_NUM_CPUS", "5")
    cluster.ensure_local_head()
    (cmd,) = commands
    assert cmd[cmd.index("--num-cpus") + 1] == "5"


def test_storage_path_holds_the_sweeps_tune_experiment(tmp_path: Path) -> None:
    cfg = load_config(SweepConfig, REPO / "tune" / "sweeps" / "demo.yaml",
                      [f"output_dir={tmp_path}/tune"])
    assert tune_storage(cfg, Settings(storage_path=None)) == str(tmp_path / "tune" / cfg.name)
    assert tune_storage(cfg, Settings(storage_path="s3://bucket/recsys/")) == (
        f"s3://bucket/recsys/{cfg.name}")
    assert tune_storage(cfg, Settings(storage_path=str(tmp_path / "shared"))) == str(
        tmp_path / "shared" / cfg.name)


def test_work_dir_and_tracking_uri_place_mlflow(tmp_path: Path) -> None:
    assert default_root(Settings(work_dir=str(tmp_path))) == tmp_path / "mlflow"
    uri = "http://mlflow.example:5000"
    assert ensure_tracking(Settings(work_dir=str(tmp_path), mlflow_tracking_uri=uri)) == uri
    assert not (tmp_path / "mlflow").exists()  # a given server: nothing started locally
