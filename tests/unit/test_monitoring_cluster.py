"""Where a Ray cluster's dashboard looks for Prometheus (``RAY_PROMETHEUS_HOST``, read when the
head starts), and the Prometheus config written for a cluster; no Ray, no Prometheus started."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from recsys import cluster
from recsys.serving import prometheus
from recsys.serving.prometheus import Prometheus, discovery_file, write_config


def test_a_private_cluster_gets_a_prometheus_port_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster.PROMETHEUS_HOST_ENV, raising=False)
    monkeypatch.setattr(cluster, "_prometheus_host", None)
    assert cluster.prometheus_host() == "http://127.0.0.1:9090"  # the head's, by default
    with cluster._own_address_env():
        host = os.environ[cluster.PROMETHEUS_HOST_ENV]  # what the cluster's dashboard reads
    assert host.startswith("http://127.0.0.1:") and not host.endswith(":9090")
    assert cluster.PROMETHEUS_HOST_ENV not in os.environ  # restored
    assert cluster.prometheus_host() == host


def test_a_chosen_prometheus_host_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cluster.PROMETHEUS_HOST_ENV, "http://127.0.0.1:9555")
    monkeypatch.setattr(cluster, "_prometheus_host", None)
    with cluster._own_address_env():
        assert os.environ[cluster.PROMETHEUS_HOST_ENV] == "http://127.0.0.1:9555"
    assert cluster.prometheus_host() == "http://127.0.0.1:9555"


@pytest.mark.parametrize("preset", [None, "http://127.0.0.1:9777"])
def test_the_heads_dashboard_is_told_where_prometheus_is(
        preset: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if preset is None:
        monkeypatch.delenv(cluster.PROMETHEUS_HOST_ENV, raising=False)
    else:
        monkeypatch.setenv(cluster.PROMETHEUS_HOST_ENV, preset)
    monkeypatch.setenv("RAY_ADDRESS", "restored-after-the-test")  # both set by the call
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    seen = {}

    def fake_run(cmd: list[str], env: dict[str, str], **kw: object):
        seen.update(env=env, cmd=cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cluster, "_port_open", lambda port, host="": False)
    monkeypatch.setattr(cluster, "_record_head", lambda *a: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    cluster.ensure_local_head(1, port=1, work_dir=tmp_path)
    assert seen["env"][cluster.PROMETHEUS_HOST_ENV] == (preset or "http://127.0.0.1:9090")
    assert "--metrics-export-port" in seen["cmd"]


def test_the_config_scrapes_the_sessions_discovery_file(tmp_path: Path) -> None:
    session = tmp_path / "session_2026"
    config = json.loads(write_config(tmp_path / "p.yml", discovery_file(session), 1,
                                     [prometheus.RULES]).read_text())
    assert config["global"]["scrape_interval"] == "1s"
    job = config["scrape_configs"][0]
    assert job["file_sd_configs"][0]["files"] == [
        str(session / "prom_metrics_service_discovery.json")]
    assert config["rule_files"] == [str(prometheus.RULES)] and prometheus.RULES.exists()


def test_prometheus_binds_loopback_with_its_own_storage(tmp_path: Path) -> None:
    prom = Prometheus(tmp_path, tmp_path / "sd.json", port=9999, binary="/bin/true")
    cmd = prom.command()
    assert "--web.listen-address=127.0.0.1:9999" in cmd
    assert f"--storage.tsdb.path={tmp_path / 'data'}" in cmd
    assert prom.url == "http://127.0.0.1:9999"


def test_without_the_executable_the_error_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(prometheus, "prometheus_binary", lambda: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y prometheus"):
        Prometheus(tmp_path, tmp_path / "sd.json")
    assert prometheus.main(["--session-dir", str(tmp_path)]) == 2
