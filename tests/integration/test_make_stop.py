"""`make stop` beside other Ray processes (issue 20): it stops the head it started, with its Ray
client server and its workers, and nothing else: not a foreign head (another ``ray start --head``
with its own port and --temp-dir), not a head it merely joined, not a ``tail -f`` of a log file,
not a process whose command line names the session directory as Ray's own processes do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from recsys.cluster import HEAD_RECORD, LOOPBACK, ensure_local_head, free_port, loopback_env

REPO = Path(__file__).resolve().parents[2]
AUTH_MODE = "token" if (Path.home() / ".ray" / "auth_token").exists() else "disabled"


@dataclass
class Head:
    port: int
    sid: int
    session_dir: str

    def processes(self) -> dict[int, str]:
        """pid -> command line of the head's processes that still run."""
        found = {}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.sid and p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = " ".join(p.cmdline())
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return found


def _gcs_server(port: int) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "gcs_server" and f"--gcs_server_port={port}" in cmd:
            return p
    return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def _ray_env() -> dict[str, str]:
    env = {**os.environ, **loopback_env(), "RAY_AUTH_MODE": AUTH_MODE}
    env.pop("RAY_ADDRESS", None)
    return env


def _kill_session(sid: int | None) -> None:
    """Cleanup even after a failure: SIGKILL whatever still runs in the head's session."""
    if sid is None or sid == os.getsid(0):
        return
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _session_dir(gcs: psutil.Process) -> str:
    return next(a.split("=", 1)[1] for a in gcs.cmdline() if a.startswith("--session-dir="))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Under /tmp, short: Ray's Unix sockets live in the session dir (108-byte path limit)."""
    path = Path(tempfile.mkdtemp(prefix="stop-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def foreign_head(short_tmp: Path) -> Iterator[Head]:
    """Someone else's `ray start --head`: its own port and --temp-dir, no record of ours."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head",
           "--node-ip-address", LOOPBACK, "--port", str(port), "--num-cpus", "1",
           "--temp-dir", str(short_tmp / "foreign"), "--include-dashboard", "false",
           "--disable-usage-stats"]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port"):
        cmd += [flag, str(free_port())]
    # A session of its own, so that the cleanup below can find all of it whatever happens.
    proc = subprocess.Popen(cmd, env=_ray_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        gcs = _gcs_server(port)
        assert gcs is not None
        yield Head(port, proc.pid, _session_dir(gcs))
    finally:
        proc.kill()
        _kill_session(proc.pid)


@pytest.fixture
def own_head(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Head, Path]]:
    """The demo's head as ensure_local_head starts it (free ports, own --temp-dir, record in a
    work dir of the test's), and the work dir."""
    work = short_tmp / "work"
    monkeypatch.setenv("RAY_ADDRESS", "restored-after-the-test")  # ensure_local_head sets it
    monkeypatch.setenv("RAY_AUTH_MODE", AUTH_MODE)
    port = free_port()
    sid = None
    try:
        ensure_local_head(1, port=port, dashboard_port=free_port(), client_port=free_port(),
                          temp_dir=short_tmp / "own", work_dir=work)
        record = json.loads((work / HEAD_RECORD).read_text())
        sid = record["session_id"]
        yield Head(port, sid, record["session_dir"]), work
    finally:
        gcs = _gcs_server(port)
        _kill_session(sid if gcs is None else os.getsid(gcs.pid))


@pytest.fixture
def bystanders(foreign_head: Head, own_head: tuple[Head, Path]) -> Iterator[dict[str, int]]:
    """Processes that only mention a session directory: `tail -f` of a log file of each head,
    and one whose arguments name our head's session dir exactly as Ray's processes do."""
    own, _ = own_head
    cmds = {
        "tail -f own raylet.out": ["tail", "-f", f"{own.session_dir}/logs/raylet.out"],
        "tail -f foreign gcs_server.out": ["tail", "-f",
                                           f"{foreign_head.session_dir}/logs/gcs_server.out"],
        "--session-dir=<own>": [sys.executable, "-c", "import time; time.sleep(600)",
                                f"--session-dir={own.session_dir}"],
    }
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, cmd in cmds.items()}
    try:
        yield {name: p.pid for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=10)


def _stop(work: Path) -> subprocess.CompletedProcess[str]:
    """`make stop` for this work dir: python -m jobs.stop."""
    env = {**os.environ, "RECSYS_WORK_DIR": str(work)}
    env.pop("RECSYS_MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "jobs.stop"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _detached_actor(head: Head) -> int:
    """A worker that outlives its driver, as a Serve replica does; returns its pid."""
    code = ("import os, ray; ray.init(address=os.environ['RAY_ADDRESS']);\n"
            "@ray.remote(num_cpus=0)\nclass Replica:\n    def pid(self): return os.getpid()\n"
            "a = Replica.options(name='replica', namespace='stop', lifetime='detached').remote()\n"
            "print('PID', ray.get(a.pid.remote()))")
    env = {**_ray_env(), "RAY_ADDRESS": f"{LOOPBACK}:{head.port}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("PID")[-1].split()[0])


def test_stop_stops_our_head_only(foreign_head: Head, own_head: tuple[Head, Path],
                                  bystanders: dict[str, int], tmp_path: Path) -> None:
    own, work = own_head
    # A head we joined is not ours: no record, and `make stop` leaves it running.
    joined_work = tmp_path / "joined"
    assert ensure_local_head(1, port=foreign_head.port, work_dir=joined_work) == (
        f"{LOOPBACK}:{foreign_head.port}")
    assert not (joined_work / HEAD_RECORD).exists()
    done = _stop(joined_work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no head started by us" in done.stdout

    replica = _detached_actor(own)
    foreign_before = foreign_head.processes()
    own_before = own.processes()
    assert replica in own_before
    # What the old cmdline-based stop left running: the Ray client server (no session dir in
    # its arguments, and its parent, `ray start`, had exited).
    client_server = next(pid for pid, cmd in own_before.items()
                         if "-m ray.util.client.server" in cmd)
    assert any("-m ray.util.client.server" in cmd for cmd in foreign_before.values())

    started = time.monotonic()
    done = _stop(work)
    took = time.monotonic() - started
    print(done.stdout)  # what `make stop` said (shown with -rP)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert f"Ray head {LOOPBACK}:{own.port}: stopped" in done.stdout
    assert f"ray client server {client_server}" in done.stdout

    assert own.processes() == {}, "processes of our head still run"
    assert not _running(replica) and not _running(client_server)
    assert not _port_open(own.port)
    assert not (work / HEAD_RECORD).exists()
    # Everything else survives: the foreign head, process for process, and the bystanders.
    assert foreign_head.processes() == foreign_before
    assert _port_open(foreign_head.port)
    for name, pid in bystanders.items():
        assert _running(pid), f"{name} (pid {pid}) was stopped"
    assert took < 60, f"make stop took {took:.0f} s"

    again = _stop(work)
    assert again.returncode == 0 and "no head started by us" in again.stdout
