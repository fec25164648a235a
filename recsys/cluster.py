"""Connecting to Ray: a local single-machine cluster bound to 127.0.0.1, or an existing one.

Under ``ray job submit`` (``RAY_ADDRESS`` set) or with ``RECSYS_RAY_ADDRESS`` the job joins that
cluster; otherwise it starts a private local cluster whose listeners bind and advertise loopback
only (STACK_NOTES: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does that on Linux).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recsys.settings import get_settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def loopback_env() -> dict[str, str]:
    """Environment that keeps a locally started Ray on 127.0.0.1 (also for `ray start`)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


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
    keys = (GCS_PORT_ENV, "RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    port = os.environ.get(GCS_PORT_ENV) or str(free_port())
    os.environ[GCS_PORT_ENV] = port
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
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


def ensure_local_head(num_cpus: int | None = None) -> str:
    """A ``ray start --head`` cluster on 127.0.0.1 that outlives this process (so a deployed
    Serve app keeps answering after the job ends); joins the one already there if any.

    Returns its address, also exported as ``RAY_ADDRESS`` so :func:`init_ray` joins it. Stop it
    with ``make stop`` (:func:`stop_local_head`). ``num_cpus`` defaults to the settings'
    ``RECSYS_RAY_NUM_CPUS`` (only a head started here gets it).
    """
    import shutil
    import subprocess
    import sys

    address = f"{LOOPBACK}:{HEAD_PORT}"
    if num_cpus is None:
        num_cpus = get_settings().ray_num_cpus
    # One explicit auth mode for the head and this driver. Ray's default ("token" when
    # ~/.ray/auth_token exists) is applied by `ray start` but not by a joining ray.init.
    os.environ.setdefault("RAY_AUTH_MODE", "token" if (Path.home() / ".ray" / "auth_token")
                          .exists() else "disabled")
    if not _port_open(HEAD_PORT):
        ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        cmd = [ray_cli, "start", "--head", "--node-ip-address", LOOPBACK,
               "--port", str(HEAD_PORT), "--dashboard-host", LOOPBACK,
               "--dashboard-port", str(DASHBOARD_PORT), "--disable-usage-stats"]
        # Agent and metrics ports off their defaults: a private `ray.init` cluster (a test
        # session, another job) on the same machine would otherwise collide on 52365.
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port"):
            cmd += [flag, str(free_port())]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        env = {**os.environ, **loopback_env()}
        env.pop("RAY_ADDRESS", None)
        log.info("starting a local Ray head: %s", " ".join(cmd))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start --head` failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    else:
        log.info("joining the Ray head already listening on %s", address)
    os.environ["RAY_ADDRESS"] = address
    return address


def stop_local_head(port: int = HEAD_PORT, timeout_s: float = 10.0) -> int:
    """Stop the Ray cluster whose GCS listens on ``port`` (the demo's head), and only it.

    ``ray stop`` ends every Ray process of the user on the machine: a benchmark's or a test
    session's private cluster too. Here the cluster is found by its GCS port, its processes by
    the session directory in their command lines, plus all their descendants (the raylet's
    workers, Serve's proxy and replicas, the agents, whose titles Ray rewrites). SIGTERM, then
    SIGKILL after ``timeout_s``. Returns how many processes were stopped (0: none listening).
    """
    import psutil

    def cmdline(p: psutil.Process) -> list[str]:
        try:
            return p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return []

    session = None
    for p in psutil.process_iter():
        cmd = cmdline(p)
        if cmd and cmd[0].endswith("gcs_server") and f"--gcs_server_port={port}" in cmd:
            session = next((a.split("=", 1)[1] for a in cmd if a.startswith("--session-dir=")),
                           None)
            break
    if not session:
        return 0
    roots = [p for p in psutil.process_iter() if any(session in a for a in cmdline(p))]
    targets: dict[int, psutil.Process] = {}
    for p in roots:
        targets[p.pid] = p
        try:
            targets.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    targets.pop(os.getpid(), None)
    procs = list(targets.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    log.info("stopped the Ray cluster on port %d (%s): %d processes", port, session, len(procs))
    return len(procs)
