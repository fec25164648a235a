"""`make stop` stops only what it started and recorded (issue 20): a pid from a stale file (alive,
but another start time) is left alone; a permission error is a message and exit code 1, not a
traceback, and the other processes are still stopped. Real processes (``sleep``-like), no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from jobs import stop
from recsys.cluster import HEAD_RECORD, stop_local_head
from recsys.tracking.server import SERVER_JSON, read_detached, stop_detached_server

# A parent that starts a child, both sleeping: stands in for a head's process and its worker.
PARENT_AND_CHILD = ("import subprocess, sys, time; "
                    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
                    "time.sleep(300)")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_children(proc: subprocess.Popen[bytes], n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 30
    while len(kids := psutil.Process(proc.pid).children()) < n:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return kids


@pytest.fixture
def spawn() -> Iterator:
    """Start processes in sessions of their own (as the head and MLflow are); all killed after."""
    started: list[subprocess.Popen[bytes]] = []

    def _spawn(code: str = "import time; time.sleep(300)") -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        started.append(proc)
        return proc

    yield _spawn
    for proc in started:
        for p in [*psutil.Process(proc.pid).children(recursive=True), proc] \
                if _running(proc.pid) else []:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)


def _write_head_record(work: Path, procs: list[subprocess.Popen[bytes]],
                       shift_s: float = 0.0) -> Path:
    """``ray-head.json`` as ensure_local_head writes it, naming ``procs`` (their session is the
    first one's); ``shift_s`` moves the recorded start times (a stale file)."""
    records = [{"pid": p.pid, "create_time": psutil.Process(p.pid).create_time() + shift_s,
                "name": "raylet"} for p in procs]
    path = work / HEAD_RECORD
    path.write_text(json.dumps({"address": "127.0.0.1:1", "port": 1, "session_id": procs[0].pid,
                                "session_dir": None, "temp_dir": None, "started": time.time(),
                                "processes": records}))
    return path


def _write_server_json(root: Path, proc: subprocess.Popen[bytes], shift_s: float = 0.0,
                       legacy: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    created = psutil.Process(proc.pid).create_time()
    info = {"pid": proc.pid, "port": 1, "uri": "http://127.0.0.1:1", "root": str(root),
            "started": created + shift_s + 5}
    if not legacy:
        info["create_time"] = created + shift_s
    path = root / SERVER_JSON
    path.write_text(json.dumps(info))
    return path


def test_a_recorded_head_is_stopped_with_its_children(tmp_path: Path, spawn) -> None:
    """The positive control: a recorded process with its start time is ours, and so is what it
    started (the raylet's workers, Serve's replicas); an unrecorded bystander is not."""
    head = spawn(PARENT_AND_CHILD)
    (child,) = _wait_children(head, 1)
    bystander = spawn()
    path = _write_head_record(tmp_path, [head])
    report = stop_local_head(tmp_path, timeout_s=5)
    assert not report.failed and not report.skipped
    assert len(report.stopped) == 2, report.lines()
    assert not _running(head.pid) and not _running(child.pid)
    assert _running(bystander.pid)
    assert not path.exists()


def test_stale_pid_alive_with_another_start_time_is_not_killed(tmp_path: Path, spawn) -> None:
    proc = spawn()
    path = _write_head_record(tmp_path, [proc], shift_s=-3600)  # "recorded" an hour earlier
    report = stop_local_head(tmp_path, timeout_s=5)
    assert _running(proc.pid)
    assert report.stopped == [] and report.failed == []
    (skipped,) = report.skipped
    assert f"pid {proc.pid}" in skipped and "now another process" in skipped
    assert "not running" in report.lines()[0]
    assert not path.exists()  # the head it recorded is gone: the record goes too


def test_no_record_stops_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path))
    assert stop.main([]) == 0
    out = capsys.readouterr().out
    assert "Ray head: no head started by us" in out and "nothing stopped" in out
    assert "MLflow server" in out and "not running" in out


@pytest.mark.parametrize("legacy", [False, True], ids=["create_time", "legacy-started"])
def test_mlflow_pid_from_a_stale_server_json_is_not_killed(tmp_path: Path, spawn,
                                                           legacy: bool) -> None:
    """server.json names a live pid that is not the server (recycled): not stopped, not reused.
    Files written before start times were recorded are checked against ``started``."""
    proc = spawn()
    root = tmp_path / "mlflow"
    path = _write_server_json(root, proc, shift_s=-86400, legacy=legacy)
    assert read_detached(root) is None
    report = stop_detached_server(root, timeout=5)
    assert _running(proc.pid)
    assert report.stopped == [] and report.failed == []
    assert f"pid {proc.pid}" in report.skipped[0]
    assert not path.exists()


def test_mlflow_server_json_with_its_start_time_is_stopped(tmp_path: Path, spawn) -> None:
    proc = spawn(PARENT_AND_CHILD)  # the mlflow CLI and its uvicorn worker
    (child,) = _wait_children(proc, 1)
    root = tmp_path / "mlflow"
    path = _write_server_json(root, proc)
    report = stop_detached_server(root, timeout=5)
    assert len(report.stopped) == 2 and not report.failed, report.lines()
    assert not _running(proc.pid) and not _running(child.pid)
    assert not path.exists()


@pytest.mark.parametrize("error", [psutil.AccessDenied, PermissionError])
def test_permission_denied_is_reported_not_raised(
        tmp_path: Path, spawn, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], error: type[Exception]) -> None:
    """Processes of another user (here: signals refused by a patched terminate/kill): each named
    with what to do, the others still stopped, exit code 1, no traceback; the records stay so
    that `make stop` can be run again."""
    denied_head, other_head, denied_mlflow = spawn(), spawn(), spawn()
    refused = {denied_head.pid, denied_mlflow.pid}
    real_terminate = psutil.Process.terminate

    def terminate(self: psutil.Process) -> None:
        if self.pid in refused:
            raise error(self.pid) if error is psutil.AccessDenied else error(1, "Not permitted")
        real_terminate(self)

    monkeypatch.setattr(psutil.Process, "terminate", terminate)
    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path))
    head_record = _write_head_record(tmp_path, [denied_head, other_head])
    server_json = _write_server_json(tmp_path / "mlflow", denied_mlflow)

    assert stop.main([]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "Traceback" not in out + captured.err
    for pid in refused:
        line = next(ln for ln in out.splitlines() if f"pid {pid} " in ln)
        assert "NOT stopped" in line and "permission denied" in line and f"kill {pid}" in line
    assert f"stopped 1 process (python -c {other_head.pid})" in out  # the others still are
    assert _running(denied_head.pid) and _running(denied_mlflow.pid)
    assert not _running(other_head.pid)
    assert head_record.exists() and server_json.exists()
