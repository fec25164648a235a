"""Connecting to Ray: a local single-machine cluster bound to 127.0.0.1, or an existing one.

Under ``ray job submit`` (``RAY_ADDRESS`` set) or with ``RECSYS_RAY_ADDRESS`` the job joins that
cluster; otherwise it starts a private local cluster whose listeners bind and advertise loopback
only (STACK_NOTES: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does that on Linux).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from recsys.processes import (
    CREATE_TIME_TOLERANCE_S,
    StopReport,
    around,
    cmdline,
    describe,
    find_recorded,
    terminate,
    with_descendants,
)
from recsys.settings import get_settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
# Where a head's dashboard looks for Prometheus (read once, when the head starts): its
# Prometheus-backed views and /api/prometheus_health. recsys/serving/prometheus.py runs one.
PROMETHEUS_HOST_ENV = "RAY_PROMETHEUS_HOST"
PROMETHEUS_PORT = 9090  # the head's (make prometheus); a private cluster gets a port of its own
_prometheus_host: str | None = None  # the one given to the private cluster started here


def loopback_env() -> dict[str, str]:
    """Environment that keeps a locally started Ray on 127.0.0.1 (also for `ray start`)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prometheus_host() -> str:
    """The Prometheus address the dashboard of this process's cluster queries: the port reserved
    for the private cluster :func:`init_ray` started, else ``RAY_PROMETHEUS_HOST``, else the
    head's default (``http://127.0.0.1:9090``, what :func:`ensure_local_head` gives a head)."""
    return _prometheus_host or os.environ.get(PROMETHEUS_HOST_ENV) \
        or f"http://{LOOPBACK}:{PROMETHEUS_PORT}"


def init_ray(num_cpus: int | None = None, address: str | None = None,
             dashboard: bool = True) -> None:
    """Idempotent ``ray.init``: join ``address``, else ``RAY_ADDRESS``, else the settings'
    ``RECSYS_RAY_ADDRESS``; otherwise start locally with ``num_cpus`` (default: the settings'
    ``RECSYS_RAY_NUM_CPUS``, else the machine's count)."""
    for key, value in loopback_env().items():
        os.environ.setdefault(key, value)
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    settings = get_settings()
    address = address or os.environ.get("RAY_ADDRESS") or settings.ray_address
    if num_cpus is None:
        num_cpus = settings.ray_num_cpus
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        _route_logs()
        log.info("joined Ray cluster at %s", address)
        return
    if dashboard and _dashboard_missing():
        log.warning("Ray's dashboard packages are not installed (a minimal `pip install ray`, "
                    "not ray[default]): starting without the dashboard")
        dashboard = False
    with _own_address_env():
        ctx = ray.init(
            address="local",  # a private cluster, even if `ray start` left one on this machine
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            # Not 8265: that is the `ray start --head` cluster's (`ray job submit` targets it).
            # A private cluster holding it left a head started later without a dashboard, and
            # Ray Train's placement-group cleaner then waited 12 s at the end of every fit.
            dashboard_port=free_port(),
            _node_ip_address=LOOPBACK,
            logging_level=logging.WARNING,
        )
    _route_logs()
    log.info("started local Ray (%s CPUs), dashboard %s", num_cpus or os.cpu_count(),
             f"http://{ctx.dashboard_url}" if ctx.dashboard_url else "off")


def _route_logs() -> None:
    """With a job log file (``recsys.logs.log_to_file``): Ray's loggers and its workers' output
    go to the files, the console keeps our lines and the workers' epoch lines."""
    from recsys.logs import route_library_loggers, route_worker_output

    route_library_loggers()
    route_worker_output()


def _dashboard_missing() -> bool:
    from ray._private.utils import get_dashboard_dependency_error

    return get_dashboard_dependency_error() is not None


@contextmanager
def _own_address_env() -> Iterator[None]:
    """While a private cluster starts: its GCS on a port chosen here, and ``RAY_ADDRESS`` naming
    it, in the environment its processes inherit (this process's is restored afterwards).

    Ray processes that look the cluster up by themselves use ``RAY_ADDRESS``, else the address
    file ``/tmp/ray/ray_current_cluster``, which names the cluster a ``ray start`` started last,
    stale once it is stopped. Ray Train's ``PlacementGroupCleaner`` is one: with a stale file
    each of its state-API checks hung ~40 s, and every ``TorchTrainer.fit`` waited 12 s at its
    end for the cleaner to stop (measured; a sweep trial is one fit)."""
    global _prometheus_host
    keys = (GCS_PORT_ENV, "RAY_ADDRESS", PROMETHEUS_HOST_ENV)
    saved = {k: os.environ.get(k) for k in keys}
    port = os.environ.get(GCS_PORT_ENV) or str(free_port())
    os.environ[GCS_PORT_ENV] = port
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
    # A Prometheus port of its own (not the head's 9090): recsys.serving.prometheus starts one
    # there for this cluster (prometheus_host()), and the dashboard's charts query it.
    _prometheus_host = os.environ.get(PROMETHEUS_HOST_ENV) or f"http://{LOOPBACK}:{free_port()}"
    os.environ[PROMETHEUS_HOST_ENV] = _prometheus_host
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_ray_data() -> None:
    """Ray Data configures its own loggers on import; keep its per-operator chatter at WARNING
    (progress bars on a terminal are not logging and stay)."""
    import ray.data  # noqa: F401  (configures the loggers we then adjust)

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor",
                 "ray.data._internal.progress.logging_progress", "ray.data.dataset"):
        logging.getLogger(name).setLevel(logging.WARNING)


HEAD_PORT = 6379
DASHBOARD_PORT = 8265


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    """A port free on 127.0.0.1 right now (whoever binds it does so a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


CLIENT_PORT = 10001  # Ray's default for the Ray client server (`ray://127.0.0.1:10001`)
HEAD_RECORD = "ray-head.json"


def head_record_path(work_dir: str | Path | None = None) -> Path:
    """``<work_dir>/ray-head.json``: the head :func:`ensure_local_head` started (never one it
    joined), the only one :func:`stop_local_head` stops. ``work_dir``: the settings' default."""
    return Path(get_settings().work_dir if work_dir is None else work_dir) / HEAD_RECORD


def ensure_local_head(num_cpus: int | None = None, *, port: int = HEAD_PORT,
                      dashboard_port: int = DASHBOARD_PORT, client_port: int = CLIENT_PORT,
                      temp_dir: str | Path | None = None,
                      work_dir: str | Path | None = None) -> str:
    """A ``ray start --head`` cluster on 127.0.0.1 that outlives this process (so a deployed
    Serve app keeps answering after the job ends); joins the one already on ``port`` if any.

    Returns its address, also exported as ``RAY_ADDRESS`` so :func:`init_ray` joins it. A head
    started here is recorded in :func:`head_record_path` (``work_dir``), and ``make stop``
    (:func:`stop_local_head`) stops it; a head joined here is not recorded and is left running.
    ``num_cpus`` defaults to the settings' ``RECSYS_RAY_NUM_CPUS`` (only a head started here
    gets it). ``temp_dir``: Ray's ``--temp-dir`` (default ``/tmp/ray``). The ports and the
    directories are parameters for tests, which run a head of their own beside the demo's.
    """
    import shutil
    import subprocess
    import sys

    address = f"{LOOPBACK}:{port}"
    if num_cpus is None:
        num_cpus = get_settings().ray_num_cpus
    # One explicit auth mode for the head and this driver. Ray's default ("token" when
    # ~/.ray/auth_token exists) is applied by `ray start` but not by a joining ray.init.
    os.environ.setdefault("RAY_AUTH_MODE", "token" if (Path.home() / ".ray" / "auth_token")
                          .exists() else "disabled")
    if not _port_open(port):
        ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        cmd = [ray_cli, "start", "--head", "--node-ip-address", LOOPBACK,
               "--port", str(port), "--dashboard-host", LOOPBACK,
               "--dashboard-port", str(dashboard_port),
               "--ray-client-server-port", str(client_port), "--disable-usage-stats"]
        # Agent and metrics ports off their defaults: a private `ray.init` cluster (a test
        # session, another job) on the same machine would otherwise collide on 52365.
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port"):
            cmd += [flag, str(free_port())]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        if temp_dir is not None:
            cmd += ["--temp-dir", str(temp_dir)]
        env = {**os.environ, **loopback_env()}
        env.pop("RAY_ADDRESS", None)
        env.setdefault(PROMETHEUS_HOST_ENV, f"http://{LOOPBACK}:{PROMETHEUS_PORT}")
        log.info("starting a local Ray head: %s", " ".join(cmd))
        launched = time.time()
        # A session of its own (setsid): every process of the head, and all they start, carry
        # its id, which is how stop_local_head tells them from other Ray processes (a command
        # line that names the session directory proves nothing). A Ctrl-C at the job's
        # terminal does not reach the head either.
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              start_new_session=True)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        _record_head(port, launched, head_record_path(work_dir))
    else:
        log.info("joining the Ray head already listening on %s (not started here: `make stop` "
                 "leaves it running)", address)
    os.environ["RAY_ADDRESS"] = address
    return address


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _gcs_server(port: int) -> psutil.Process | None:
    """The GCS listening on ``port``: the ``gcs_server`` executable given that port (its own
    arguments, compared whole; not a substring of some other command line)."""
    for proc in psutil.process_iter():
        cmd = cmdline(proc)
        if cmd and Path(cmd[0]).name == "gcs_server" and f"--gcs_server_port={port}" in cmd:
            return proc
    return None


def _session_members(sid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _sid(p.pid) == sid]


def _record_head(port: int, launched: float, path: Path) -> None:
    """Write ``path``: the head just started on ``port``, its session id and its processes
    (pid with start time, so that a recycled pid is never taken for one of them)."""
    gcs = _gcs_server(port)
    if gcs is None or gcs.create_time() < launched - CREATE_TIME_TOLERANCE_S:
        log.warning("`ray start` succeeded but no GCS it started listens on port %d: the head "
                    "is not recorded in %s and `make stop` will not stop it", port, path)
        return
    sid = os.getsid(gcs.pid)
    session_dir = next((a.split("=", 1)[1] for a in cmdline(gcs)
                        if a.startswith("--session-dir=")), None)
    record = {
        "address": f"{LOOPBACK}:{port}", "port": port, "session_id": sid,
        "session_dir": session_dir,
        "temp_dir": str(Path(session_dir).parent) if session_dir else None,
        "started": launched,
        "processes": [r for p in _session_members(sid) if (r := describe(p)) is not None],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    log.info("Ray head %s recorded in %s (%d processes, session %d)", record["address"], path,
             len(record["processes"]), sid)


def stop_local_head(work_dir: str | Path | None = None, timeout_s: float = 10.0) -> StopReport:
    """Stop the Ray head :func:`ensure_local_head` started (recorded in
    :func:`head_record_path`), and only it.

    ``ray stop`` ends every Ray process on the machine, a benchmark's or a test session's
    cluster too. Here: no record, nothing stopped (a head we joined or found is never ours).
    Each recorded process counts only while its pid still has the recorded start time (a
    recycled pid is skipped and reported). While one does, the head's session id is still in
    use and cannot have been recycled, so the head is every process of that session (the GCS,
    raylet, dashboard, the Ray client server, the workers, Serve's proxy and replicas) and all
    their descendants (job entrypoints, which Ray starts in sessions of their own). A process
    that merely names the session directory (``tail -f .../logs/raylet.out``) is not among
    them. SIGTERM, then SIGKILL after ``timeout_s``; permission errors are reported.
    """
    path = head_record_path(work_dir)
    report = StopReport("Ray head")
    if not path.exists():
        report.note = (f"no head started by us (no {path}): nothing stopped; a Ray cluster this "
                       "project joined or did not start is left running")
        return report
    try:
        record = json.loads(path.read_text())
        sid = int(record["session_id"])
        recorded = [(int(r["pid"]), float(r["create_time"]), str(r.get("name", "?")))
                    for r in record["processes"]]
        report.what = f"Ray head {record['address']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.failed.append(f"cannot read {path} ({type(e).__name__}: {e}); look at the pids "
                             "it names and remove it")
        return report
    alive = [p for pid, created, name in recorded
             if (p := find_recorded(pid, around(created), name, report)) is not None]
    if not alive:
        if report.failed:
            report.note = f"could not check the processes recorded in {path}: nothing stopped"
        else:
            path.unlink(missing_ok=True)
            report.note = f"not running (the processes {path} recorded are gone): nothing stopped"
        return report
    members = _session_members(sid) if sid != _sid(0) else []
    targets = with_descendants([*alive, *members])
    # `ray stop`'s order: the raylet first (agents that share its fate exit with it), the GCS
    # last. All at once, the GCS and the autoscaler monitor ignored SIGTERM for over 40 s;
    # in this order the head was gone in ~1 s.
    order = {"raylet": 0, "gcs_server": 2}
    for stage in range(3):
        terminate({p: n for p, n in targets.items() if order.get(n, 1) == stage}, report,
                  timeout_s)
    if not report.failed:
        path.unlink(missing_ok=True)
    log.info("stopped the Ray head %s: %d processes", record["address"], len(report.stopped))
    return report
