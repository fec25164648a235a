"""A real Prometheus (the Debian package ``prometheus``) scraping real local Ray clusters:

* the test session's private ``ray.init`` cluster (``ray_cluster``) serving the app of
  ``test_serve.py`` (its ``served`` fixture, one deployment for this module): requests over
  real HTTP to two platforms, then PromQL over Prometheus' HTTP API on 127.0.0.1 returns exactly
  the requests sent per platform (the increase over what Prometheus saw before they were sent,
  so the count is exact even if this Ray session served the app earlier);
* the Ray head ``recsys.cluster.ensure_local_head`` starts (the demo's), with Prometheus run by
  the command ``make prometheus`` runs, and the head's dashboard finding it.

Skipped, saying why, only when the ``prometheus`` executable is absent (``make test`` installs
it where it can: root and apt-get)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from test_serve import Served, served  # noqa: F401  (the module's Serve app, a fixture)

from recsys.cluster import (
    LOOPBACK,
    free_port,
    prometheus_host,
)
from recsys.serving.prometheus import (
    INSTALL_HINT,
    Prometheus,
    current_session_dir,
    discovery_file,
    prometheus_binary,
)

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason=f"no prometheus executable on PATH: {INSTALL_HINT}")

REPO = Path(__file__).resolve().parents[2]
SENT = {"shop_a": 7, "shop_b": 4}
APP = "recsys-test"  # test_serve's application name
AUTH_MODE = "token" if (Path.home() / ".ray" / "auth_token").exists() else "disabled"


def _wait(what: str, check: Callable[[], object], timeout_s: float = 90.0,
          every_s: float = 1.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def _port_of(url: str) -> int | None:
    """The port of a loopback url that nothing listens on yet (else None)."""
    u = urllib.parse.urlparse(url)
    if u.hostname not in (LOOPBACK, "localhost") or u.port is None:
        return None
    import socket

    with socket.socket() as s:
        return u.port if s.connect_ex((LOOPBACK, u.port)) != 0 else None


def _dashboard_get(base: str, path: str) -> requests.Response:
    """A GET to a Ray dashboard, with the cluster's token when Ray runs with token auth."""
    r = requests.get(f"{base}{path}", timeout=10)
    token = Path.home() / ".ray" / "auth_token"
    if r.status_code in (401, 403) and token.exists():
        r = requests.get(f"{base}{path}", timeout=10,
                         headers={"Authorization": f"Bearer {token.read_text().strip()}"})
    return r


def _by_platform(prom: Prometheus, promql: str) -> dict[str, float]:
    return {r["metric"].get("platform", ""): float(r["value"][1]) for r in prom.query(promql)}


@pytest.fixture(scope="module")
def prometheus(served: Served, ray_cluster,  # noqa: F811 (the imported fixture)
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, bool]]:
    """Prometheus (1 s scrapes) on the session cluster's service-discovery file, on the port
    the cluster's dashboard was told (``prometheus_host()``) when it is free; and whether it is
    that port."""
    targets = discovery_file(current_session_dir())
    _wait(f"{targets} written by Ray's metrics agent", targets.exists, 60)
    port = _port_of(prometheus_host())
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), targets, port=port or free_port(),
                      scrape_interval_s=1).start()
    try:
        _wait("Prometheus scrapes the Ray targets", lambda: prom.targets_up() > 0, 60)
        yield prom, port is not None
    finally:
        prom.stop()
    assert prom.proc is None


def test_promql_returns_the_requests_sent_per_platform(
        served: Served, prometheus: tuple[Prometheus, bool]) -> None:  # noqa: F811
    prom, _ = prometheus
    sel = f'application="{APP}"'
    requests_q = f"sum by (platform) (ray_recsys_requests_total{{{sel}}})"
    latency_q = f"sum by (platform) (ray_recsys_request_ms_count{{{sel}}})"
    time.sleep(2)  # two scrapes: whatever the agent held before is in Prometheus
    before = _by_platform(prom, requests_q)
    before_latency = _by_platform(prom, latency_q)
    users = ["alice", "bob", None, "nobody-knows-me"]  # model answers and popular fallbacks
    for platform, n in SENT.items():
        for i in range(n):
            body = {"platform": platform, "k": 3}
            if users[i % len(users)]:
                body["user_id"] = users[i % len(users)]
            r = served.post("/recommend", body)
            assert r.status_code == 200, r.text
    expected = {p: before.get(p, 0.0) + n for p, n in SENT.items()}

    def counted() -> dict[str, float] | None:
        now = _by_platform(prom, requests_q)
        return now if all(now.get(p, 0.0) >= v for p, v in expected.items()) else None

    # Ray's agents export every metrics_report_interval_ms (10 s by default), Prometheus
    # scrapes every second
    _wait(f"PromQL {requests_q} reaching {expected}", counted, 90)
    time.sleep(3)  # and no more than that arrives
    got = _by_platform(prom, requests_q)
    print(f"PromQL: {requests_q} -> {got} (before the requests: {before})")
    assert {p: got[p] - before.get(p, 0.0) for p in SENT} == SENT

    latency = _by_platform(prom, latency_q)
    assert {p: latency[p] - before_latency.get(p, 0.0) for p in SENT} == SENT
    outcomes = {r["metric"]["outcome"] for r in prom.query(
        f"sum by (outcome) (ray_recsys_requests_total{{{sel}}})")}
    assert {"model", "popular"} <= outcomes
    p95 = prom.query(f'histogram_quantile(0.95, sum by (platform, le) '
                     f'(rate(ray_recsys_request_ms_bucket{{{sel}}}[1m])))')
    assert {r["metric"]["platform"] for r in p95} >= set(SENT)
    versions = _by_platform(prom, f"max by (platform) (ray_recsys_model_version{{{sel}}})")
    assert versions["shop_a"] == versions["shop_b"] == 1.0  # the fixture serves version 1
    coverage = _by_platform(prom, f"max by (platform) (ray_recsys_catalog_coverage{{{sel}}})")
    assert all(0 < coverage[p] <= 1 for p in SENT)
    assert prom.query(f"sum(ray_recsys_scores_count{{{sel}}})")
    # no user or item id in any label of our series
    series = prom.api("series", **{"match[]": '{__name__=~"ray_recsys_.*"}'})
    labels = {k for s in series for k in s} - {"__name__"}
    # (event_type, reason, arm: the feedback log's and the canary's counters, bounded sets)
    assert labels <= {"platform", "outcome", "endpoint", "model", "le", "deployment", "replica",
                      "event_type", "reason", "arm",
                      "application", "job", "instance", "SessionName", "NodeAddress",
                      "Version", "Component", "WorkerId", "otel_scope_name"}, labels


def test_the_private_clusters_dashboard_finds_prometheus(
        ray_cluster, prometheus: tuple[Prometheus, bool]) -> None:
    prom, on_dashboards_port = prometheus
    if not on_dashboards_port:
        pytest.skip(f"{prometheus_host()} (the dashboard's RAY_PROMETHEUS_HOST) was taken")
    assert prometheus_host() == prom.url
    base = "http://" + ray_cluster._private.worker.global_worker.node.address_info["webui_url"]
    r = _dashboard_get(base, "/api/prometheus_health")
    assert r.status_code == 200 and r.json()["result"] is True, r.text


def test_make_prometheus_scrapes_the_demo_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ensure_local_head`` (the demo's head) told its dashboard where Prometheus is;
    ``python -m recsys.serving.prometheus`` (``make prometheus``) finds the head from its
    record, scrapes it there, the dashboard reports it healthy, and Ctrl-C stops it."""
    from recsys.cluster import HEAD_RECORD, ensure_local_head, stop_local_head

    root = Path(tempfile.mkdtemp(prefix="rp", dir="/tmp"))  # Ray's socket paths must be short
    work = root / "work"
    prom_port, dash_port = free_port(), free_port()
    monkeypatch.setenv("RAY_ADDRESS", "restored-after-the-test")  # ensure_local_head sets it
    monkeypatch.setenv("RAY_AUTH_MODE", AUTH_MODE)
    monkeypatch.setenv("RAY_PROMETHEUS_HOST", f"http://{LOOPBACK}:{prom_port}")
    cli = None
    try:
        ensure_local_head(1, port=free_port(), dashboard_port=dash_port,
                          client_port=free_port(), temp_dir=root / "ray", work_dir=work)
        session = Path(json.loads((work / HEAD_RECORD).read_text())["session_dir"])
        _wait("the head's service-discovery file", discovery_file(session).exists, 60)
        env = {**os.environ, "RECSYS_WORK_DIR": str(work)}
        cli = subprocess.Popen([sys.executable, "-m", "recsys.serving.prometheus", "--port",
                                str(prom_port), "--scrape-interval", "1"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        prom = Prometheus(work / "prometheus", discovery_file(session), port=prom_port)
        _wait("make prometheus answering", prom.healthy, 60, 0.5)
        assert json.loads((work / "prometheus" / "prometheus.yml").read_text())[
            "scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(discovery_file(session))]
        _wait("a Ray system metric of the head in Prometheus",
              lambda: prom.query(f'ray_node_cpu_count{{SessionName="{session.name}"}}'), 60)
        assert prom.query("ALERTS") is not None  # the alert rules are loaded
        assert prom.api("rules")["groups"][0]["name"] == "recsys-serving"
        r = _dashboard_get(f"http://{LOOPBACK}:{dash_port}", "/api/prometheus_health")
        assert r.status_code == 200 and r.json()["result"] is True, r.text
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=30)
        assert cli.returncode == 0, out
        assert not prom.healthy(), "Prometheus still answers after Ctrl-C"
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
        stop_local_head(work)
        shutil.rmtree(root, ignore_errors=True)
