"""A project-owned MLflow tracking server on 127.0.0.1, and the URI every job logs to.

Why a server rather than ``sqlite:///`` straight from each process: concurrent Tune trials racing on
first use of one SQLite file broke (STACK_NOTES), and a server gives the user a UI. It runs lean
(``--workers 1``, job execution off: 2 processes, ~0.5 GB instead of 15 processes, 3.2 GB).

Two ways to run it:

* ``LocalMlflowServer(root)``: owned by the caller (tests, a script), stopped with ``stop()`` or at
  the end of a ``with`` block.
* ``ensure_tracking(settings)``: a *detached* server under ``<work_dir>/mlflow`` that outlives the
  job so the user can open the UI afterwards. Its pid and port are in ``server.json``; the next job
  reuses it, if that pid still has the recorded start time. Stop it with
  ``stop_detached_server(root)`` (what ``recsys stop`` / ``make stop`` call).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from recsys.cluster import free_port
from recsys.processes import StopReport, around, find_recorded, terminate, with_descendants
from recsys.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVER_JSON = "server.json"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
LOG_NAME = "server.log"
# The server's own default when it proxies artifacts; the schema initialiser must use the same root,
# or the Default experiment (id 0) it creates points at a local ./mlruns of whoever ran it.
PROXIED_ARTIFACT_ROOT = "mlflow-artifacts:/"
READY_TIMEOUT_S = 180.0  # ~10 s on a quiet 2-core machine; minutes when it is busy
STOP_TIMEOUT_S = 15.0

# Detached servers started by this process, kept so that stop_detached can reap them (they are our
# children until we exit) and so Popen.__del__ does not warn about a still-running child.
_DETACHED: dict[int, subprocess.Popen[bytes]] = {}


def sqlite_uri(root: Path) -> str:
    return f"sqlite:///{(root / DB_NAME).resolve()}"


def init_backend_store(root: Path) -> None:
    """Create the SQLite schema and the Default experiment once, before any client can race on it.

    STACK_NOTES: concurrent first use raced (``table experiments already exists``). Also checks an
    existing database's schema version (raises with MLflow's ``mlflow db upgrade`` hint if stale).
    """
    # Imported here: SQLAlchemy + alembic cost seconds; only a process starting a server needs it.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root.mkdir(parents=True, exist_ok=True)
    store = SqlAlchemyStore(sqlite_uri(root), PROXIED_ARTIFACT_ROOT)
    store.engine.dispose()  # release the file before the server opens it


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def health_ok(uri: str, timeout: float = 2.0) -> bool:
    """``GET <uri>/health`` answers 200. Ignores ``http_proxy``: the server is on loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _live_group_members(pgid: int) -> list[psutil.Process]:
    """Processes of a process group that still run. Zombies count as gone: their sockets are closed,
    and in a container whose PID 1 does not reap, they would otherwise never disappear."""
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                alive.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue  # exited while we looked: exactly what we want
    return alive


def stop_process_group(pgid: int, timeout: float = STOP_TIMEOUT_S,
                       popen: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the group (mlflow CLI + uvicorn), wait, then SIGKILL what is left.

    ``popen``: when the leader is our child, reap it so it does not linger as a zombie.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        log.debug("process group %d already gone", pgid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not _live_group_members(pgid):
            break
        time.sleep(0.2)
    else:
        log.warning("MLflow server group %d ignored SIGTERM for %.0f s; killing it", pgid, timeout)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            log.debug("process group %d exited just before SIGKILL", pgid)
    if popen is not None:
        popen.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while _live_group_members(pgid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"MLflow server process group {pgid} survived SIGKILL")
        time.sleep(0.1)


class LocalMlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and proxied artifacts under ``root``.

    The process runs in its own process group (its own session), so stopping it takes the uvicorn
    worker along, and a Ctrl-C meant for the caller does not reach it.
    """

    def __init__(self, root: Path, port: int | None = None,
                 artifacts_destination: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port
        # None: <root>/artifacts; a URI (s3://bucket/prefix: boto3 reads the endpoint and the
        # credentials from the server's environment, MLFLOW_S3_ENDPOINT_URL for a local S3).
        self.artifacts_destination = artifacts_destination
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started: the port is chosen by start()")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    def command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", sqlite_uri(self.root),
            "--default-artifact-root", PROXIED_ARTIFACT_ROOT,
            "--artifacts-destination",
            self.artifacts_destination or str(self.root / ARTIFACTS_DIR),
            "--host", LOOPBACK,
            "--port", str(port),
            "--workers", "1",
        ]

    def start(self, timeout: float = READY_TIMEOUT_S) -> LocalMlflowServer:
        """Initialise the store, launch the server, return once ``/health`` answers."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        init_backend_store(self.root)
        if self.port is None:
            self.port = free_port()
        elif port_in_use(self.port):
            raise RuntimeError(f"port {self.port} on {LOOPBACK} is already in use; pass port=None "
                               "to pick a free one")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        started = time.monotonic()
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                self.command(self.port), env=env, cwd=self.root, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("MLflow server %s ready in %.1f s (pid %d, log %s)", self.uri,
                 time.monotonic() - started, self._proc.pid, self.log_path)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"MLflow server exited with code {self._proc.returncode} before it was ready "
                    f"(port {self.port}). Last lines of {self.log_path}:\n{_tail(self.log_path)}")
            if health_ok(self.uri):
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"MLflow server at {self.uri} not healthy after {timeout:.0f} s. Last lines of "
            f"{self.log_path}:\n{_tail(self.log_path)}")

    def rss_bytes(self) -> int:
        """Resident memory of the whole server group (for the docs' and tests' budgets)."""
        if self._proc is None:
            return 0
        total = 0
        for proc in _live_group_members(self._proc.pid):
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue  # exited between listing and measuring
        return total

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Terminate the process group and wait until its processes are gone."""
        if self._proc is None:
            return
        stop_process_group(self._proc.pid, timeout, popen=self._proc)
        self._proc = None

    def detach(self) -> dict[str, Any]:
        """Hand the running server over to ``server.json``: it keeps running after we exit."""
        if self._proc is None or self.port is None:
            raise RuntimeError("server not started")
        # The start time identifies the process: a pid in a stale file may be another's now.
        info = {"pid": self._proc.pid,
                "create_time": psutil.Process(self._proc.pid).create_time(),
                "port": self.port, "uri": self.uri, "root": str(self.root),
                "started": time.time()}
        tmp = self.root / (SERVER_JSON + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.root / SERVER_JSON)
        _DETACHED[self._proc.pid] = self._proc
        self._proc = None
        return info

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One process at a time decides whether to start the detached server (two jobs at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "server.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _server_process(info: dict[str, Any], report: StopReport) -> psutil.Process | None:
    """The process ``server.json`` names, if it still is the server we started: its pid with
    the recorded start time (files written before start times were recorded: a start before
    ``started``, within the readiness timeout). A recycled pid is reported, never returned."""
    pid = int(info["pid"])
    if "create_time" in info:
        created = around(float(info["create_time"]))
    else:
        started = float(info["started"])
        created = (started - READY_TIMEOUT_S - 60.0, started)
    return find_recorded(pid, created, "mlflow server", report)


def read_detached(root: Path) -> dict[str, Any] | None:
    """``server.json`` if the server it names is alive (same pid and start time) and healthy,
    else None."""
    path = Path(root) / SERVER_JSON
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if _server_process(info, StopReport("MLflow server")) is not None \
            and health_ok(str(info["uri"])):
        return info
    return None


def start_detached(root: Path) -> str:
    """Reuse the detached server under ``root`` if it is alive, else start one; return its URI."""
    root = Path(root).resolve()
    with _locked(root):
        info = read_detached(root)
        if info is not None:
            log.info("reusing MLflow server %s (pid %s)", info["uri"], info["pid"])
            return str(info["uri"])
        if (root / SERVER_JSON).exists():
            log.info("%s names a server that is gone; starting a new one", root / SERVER_JSON)
            (root / SERVER_JSON).unlink()
        server = LocalMlflowServer(root).start()
        info = server.detach()
    log.info("MLflow UI at %s (keeps running after this job; `make stop` or `recsys stop` "
             "stops it)", info["uri"])
    return str(info["uri"])


def stop_detached(root: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the detached server under ``root``; False if there was none running (or it could
    not be stopped: :func:`stop_detached_server` says why)."""
    report = stop_detached_server(root, timeout)
    for line in report.skipped + report.failed:
        log.warning("%s: %s", report.what, line)
    return bool(report.stopped) and not report.failed


def stop_detached_server(root: Path, timeout: float = STOP_TIMEOUT_S) -> StopReport:
    """Stop the detached server under ``root`` (what ``make stop`` calls), only if its pid is
    still the server we started (same start time): the group it leads (the mlflow CLI and its
    uvicorn worker). Permission errors are reported, not raised."""
    root = Path(root).resolve()
    report = StopReport(f"MLflow server ({root})")
    path = root / SERVER_JSON
    if not path.exists():
        report.note = "not running"
        return report
    with _locked(root):
        if not path.exists():  # stopped by someone else meanwhile
            report.note = "not running"
            return report
        try:
            info = json.loads(path.read_text())
            leader = _server_process(info, report)
            report.what = f"MLflow server {info.get('uri', root)}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            report.failed.append(f"cannot read {path} ({type(e).__name__}: {e}); look at the "
                                 "pid it names and remove it")
            return report
        if leader is None:
            if not report.failed:
                report.note = "not running (the process server.json names is gone)"
                path.unlink()
            return report
        # The leader is alive, so its pid is still the group's id: the group is the server's.
        group = [leader, *(p for p in _live_group_members(leader.pid) if p.pid != leader.pid)]
        terminate(with_descendants(group), report, timeout)
        popen = _DETACHED.pop(leader.pid, None)
        if popen is not None:  # our child (started by this process): reap it
            popen.wait(timeout=timeout)
        if not report.failed:
            path.unlink()
        return report


def default_root(settings: Settings) -> Path:
    return Path(settings.work_dir) / "mlflow"


def ensure_tracking(settings: Settings) -> str:
    """The tracking URI for this job: ``RECSYS_MLFLOW_TRACKING_URI`` unchanged if set, else a
    detached local server under ``<work_dir>/mlflow`` (started once, reused by later jobs)."""
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    return start_detached(default_root(settings))


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
"""What the MLflow 3 UI calls a "Machine learning" experiment (its other kind is
``genai_development``): the tag its experiment-type selector writes, set on every experiment the
platform creates so that it opens on training runs, not on GenAI traces."""
ML_WORKFLOW_QUERY = "workflowType=machine_learning"
"""MLflow 3.17's UI picks the view from a global GenAI / Machine-learning switch (stored in the
browser, GenAI by default) rather than from the tag: links the platform prints carry this."""


def experiment_url(uri: str, experiment_id: str) -> str:
    """The UI page of an experiment's training runs (the machine-learning view)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{ML_WORKFLOW_QUERY}"


def model_version_url(uri: str, name: str, version: str) -> str:
    """The UI page of a registered model version."""
    from urllib.parse import quote

    return (f"{uri.rstrip('/')}/#/models/{quote(name, safe='')}/versions/{version}"
            f"?{ML_WORKFLOW_QUERY}")


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, created if missing, tagged as a machine-learning experiment
    (an existing one keeps a kind someone chose in the UI). Call once on the driver before trials
    start; safe if another process creates it at the same moment."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}))
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)  # someone else created it first
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted at {uri}: "
            f"restore it (`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
            "or set `tracking.experiment` to another name")
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):  # made before the platform tagged
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return str(experiment.experiment_id)
