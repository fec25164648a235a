"""A local Prometheus (the Debian package ``prometheus``) scraping a local Ray cluster: the
serving metrics (``recsys/serving/metrics.py``), Serve's and Ray's own.

Ray's metrics agents write the cluster's scrape targets to
``<session dir>/prom_metrics_service_discovery.json``; the config written here reads that file
(``file_sd_configs``), so every node's agent is scraped and new ones are found. It names the
session's own file, never ``/tmp/ray/prom_metrics_service_discovery.json`` (a link to whichever
cluster on the machine wrote it last). Prometheus binds 127.0.0.1 and keeps its data in a
directory of its own.

    python -m recsys.serving.prometheus            # the demo's head (runs/ray-head.json), :9090
    make prometheus                                # the same

The Ray dashboard's Prometheus-backed views query ``RAY_PROMETHEUS_HOST``, read when the head
starts: ``recsys.cluster`` sets it to this server's address (``PROMETHEUS_PORT``, or the port it
reserves for a private cluster: ``recsys.cluster.prometheus_host``). See docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from recsys.cluster import PROMETHEUS_PORT, free_port, head_record_path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
RULES = Path(__file__).resolve().parents[2] / "infra" / "monitoring" / "alerts.yml"
INSTALL_HINT = "apt-get install -y prometheus (the Debian package; as root)"


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable on PATH, or None."""
    return shutil.which("prometheus")


def discovery_file(session_dir: str | Path) -> Path:
    """The scrape targets Ray's metrics agents keep up to date for this session."""
    return Path(session_dir) / DISCOVERY_FILE


def current_session_dir() -> Path:
    """The session directory of the Ray cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("not connected to Ray: call recsys.cluster.init_ray() first")
    return Path(ray._private.worker._global_node.get_session_dir_path())


def write_config(path: Path, targets_file: Path, scrape_interval_s: float = 5.0,
                 rule_files: list[Path] | None = None) -> Path:
    """``prometheus.yml`` scraping the targets in ``targets_file`` (JSON, file_sd format)."""
    interval = f"{max(1, round(scrape_interval_s))}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files or []],
        "scrape_configs": [{
            "job_name": "ray",
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}],
        }],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


class Prometheus:
    """One Prometheus process: ``start()``, ``query()``, ``stop()`` (or ``with``)."""

    def __init__(self, work_dir: str | Path, targets_file: str | Path, *,
                 port: int | None = None, scrape_interval_s: float = 5.0,
                 rule_files: list[Path] | None = None, binary: str | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.targets_file = Path(targets_file)
        self.port = port or free_port()
        self.scrape_interval_s = scrape_interval_s
        self.rule_files = rule_files or []
        self.binary = binary or prometheus_binary()
        if self.binary is None:
            raise FileNotFoundError(f"no prometheus executable on PATH: {INSTALL_HINT}")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        config = write_config(self.work_dir / "prometheus.yml", self.targets_file,
                              self.scrape_interval_s, self.rule_files)
        return [self.binary, f"--config.file={config}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--storage.tsdb.retention.time=7d", "--log.level=warn"]

    def start(self, timeout_s: float = 30.0) -> Prometheus:
        """Start and wait until it answers queries; its output goes to ``prometheus.log``."""
        cmd = self.command()
        logfile = open(self.work_dir / "prometheus.log", "ab")  # noqa: SIM115 (the child's)
        try:
            # its own session: a Ctrl-C meant for a test or a job does not reach it; stop() does
            self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            logfile.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.work_dir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}):\n{tail}")
            if self.healthy():
                log.info("prometheus %s scraping %s (pid %d)", self.url, self.targets_file,
                         self.proc.pid)
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready on {self.url} in {timeout_s:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def api(self, path: str, **params: str) -> dict:
        """One call of the HTTP API (``/api/v1/<path>``); its ``data``."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's vector: ``[{"metric": {labels}, "value": [t, "v"]}, ...]``."""
        return self.api("query", query=promql)["result"]

    def targets_up(self) -> int:
        """Scrape targets whose last scrape succeeded."""
        return sum(t.get("health") == "up" for t in self.api("targets")["activeTargets"])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Prometheus flushes its head block and exits), SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> Prometheus:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def head_session_dir(work_dir: str | Path | None = None) -> Path:
    """The session directory of the head ``recsys.cluster.ensure_local_head`` started."""
    path = head_record_path(work_dir)
    if not path.exists():
        raise FileNotFoundError(f"no local Ray head recorded ({path}): start one with make demo, "
                                "or pass --session-dir")
    session = json.loads(path.read_text()).get("session_dir")
    if not session:
        raise FileNotFoundError(f"{path} names no session directory: pass --session-dir")
    return Path(session)


def main(argv: list[str] | None = None) -> int:
    from recsys.settings import get_settings

    ap = argparse.ArgumentParser(prog="python -m recsys.serving.prometheus",
                                 description="Run Prometheus on 127.0.0.1 against a local Ray "
                                             "cluster until Ctrl-C.")
    ap.add_argument("--session-dir", help="Ray session directory (default: the head recorded "
                                          "in <work dir>/ray-head.json, as make demo starts it)")
    ap.add_argument("--port", type=int, default=PROMETHEUS_PORT)
    ap.add_argument("--scrape-interval", type=float, default=5.0, help="seconds")
    ap.add_argument("--dir", help="config and data (default: <work dir>/prometheus)")
    a = ap.parse_args(argv)
    if prometheus_binary() is None:
        print(f"prometheus is not installed: {INSTALL_HINT}")
        return 2
    try:
        session = Path(a.session_dir) if a.session_dir else head_session_dir()
    except FileNotFoundError as e:
        print(e)
        return 2
    targets = discovery_file(session)
    if not targets.exists():
        print(f"{targets} does not exist (yet): is that Ray cluster running?")
        return 2
    work = Path(a.dir) if a.dir else Path(get_settings().work_dir) / "prometheus"
    server = Prometheus(work, targets, port=a.port, scrape_interval_s=a.scrape_interval,
                        rule_files=[RULES] if RULES.exists() else [])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server.start()
    expected = os.environ.get("RAY_PROMETHEUS_HOST")
    print(f"Prometheus {server.url} (data {work / 'data'}), scraping {targets}")
    if expected and expected.rstrip("/") != server.url:
        print(f"note: RAY_PROMETHEUS_HOST is {expected}: the Ray dashboard queries that one")
    print("Ctrl-C stops it")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                print(f"prometheus exited: see {work / 'prometheus.log'}")
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
