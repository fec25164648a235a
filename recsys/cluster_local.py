"""A multi-node Ray cluster and S3-compatible storage on one machine, for tests and rehearsals.

* :func:`start_local_s3`: moto's S3 server on 127.0.0.1 with one bucket, and the environment that
  points boto3, pyarrow (Ray Train's ``storage_path``) and MLflow (``--artifacts-destination
  s3://...``) at it.
* :func:`start_ray_node`: a head (``ray start --head --block``) or a node joining it
  (:func:`join`, ``python -m recsys.cluster_local join``: what ``ray start --address`` does,
  which Ray's CLI refuses on loopback; see there), each in a process session of its own, with
  its own resources and its own ``--temp-dir`` (Ray 2.60 allows one per node: ``ray start
  --help``, "Can be specified per node").
* :meth:`RayNode.kill` ends one node as a crash would (SIGKILL to every process of its session),
  the head and other nodes untouched; :meth:`RayNode.stop` shuts it down in ``ray stop``'s order.

Every listener binds 127.0.0.1 (``recsys.cluster.loopback_env``). Nothing here runs ``ray stop``,
which would end every Ray process on the machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from recsys.cluster import LOOPBACK, free_port, loopback_env
from recsys.processes import StopReport, cmdline, terminate, with_descendants

log = logging.getLogger(__name__)

DUMMY_KEY = "testing"  # moto accepts any credentials; boto3 and pyarrow want some
REGION = "us-east-1"


def _session(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid`` (a node or server started with ``start_new_session``)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _stop_session(popen: subprocess.Popen[bytes], what: str, *, graceful: bool,
                  timeout_s: float = 5.0) -> StopReport:
    """End every process of ``popen``'s session and their descendants (Ray starts some in
    sessions of their own). ``graceful``: SIGTERM in ``ray stop``'s order (raylets first, the
    GCS and the session leader last), SIGKILL to what outlives ``timeout_s`` at each stage;
    otherwise SIGKILL to all at once (a crash)."""
    report = StopReport(what)
    targets = with_descendants(_session(popen.pid))
    if graceful:
        order = {"raylet": 0, "gcs_server": 2}
        for stage in range(3):
            terminate({p: n for p, n in targets.items()
                       if (2 if p.pid == popen.pid else order.get(n, 1)) == stage},
                      report, timeout_s)
    else:
        for proc, label in targets.items():
            try:
                proc.kill()
                report.stopped.append(f"{label} {proc.pid}")
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                report.failed.append(f"pid {proc.pid} ({label}): permission denied")
    try:
        popen.wait(timeout=15)
    except subprocess.TimeoutExpired:
        report.failed.append(f"pid {popen.pid} (session leader) still running")
    return report


@dataclass
class LocalS3:
    """moto's S3 server: ``endpoint`` (``http://127.0.0.1:PORT``) holding ``bucket``."""

    endpoint: str
    bucket: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def env(self) -> dict[str, str]:
        """Environment for every process that reads or writes the bucket: boto3 (MLflow's S3
        artifact repository: ``MLFLOW_S3_ENDPOINT_URL``) and pyarrow's S3 filesystem (Ray
        Train's ``storage_path=s3://...``; pyarrow >= 16 reads ``AWS_ENDPOINT_URL``)."""
        return {"AWS_ACCESS_KEY_ID": DUMMY_KEY, "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):  # noqa: ANN201  (a boto3 S3 client; boto3 is a dev dependency)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> StopReport:
        return _stop_session(self.popen, f"moto S3 {self.endpoint}", graceful=True)


def start_local_s3(log_dir: str | Path, bucket: str = "recsys", port: int | None = None,
                   timeout_s: float = 60.0) -> LocalS3:
    """moto's server (``moto[server]``, a dev dependency) on 127.0.0.1 with ``bucket``
    created. Its state is in memory: it is gone when the server stops."""
    port = port or free_port()
    log_path = Path(log_dir) / "moto.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        popen = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK,
                                  "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    s3 = LocalS3(f"http://{LOOPBACK}:{port}", bucket, popen, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{s3.endpoint}/moto-api/", timeout=2).close()
            break
        except (urllib.error.URLError, OSError):
            if popen.poll() is not None or time.monotonic() > deadline:
                s3.stop()
                raise RuntimeError(f"moto server not ready on {s3.endpoint}:\n"
                                   + log_path.read_text(errors="replace")[-2000:]) from None
            time.sleep(0.3)
    s3.client().create_bucket(Bucket=bucket)
    log.info("local S3 %s, bucket %s", s3.endpoint, bucket)
    return s3


@dataclass
class RayNode:
    """One node started by :func:`start_ray_node`: its ``ray start --block`` process leads a
    session that every process of the node belongs to (or descends from)."""

    address: str
    """The cluster's GCS address (``127.0.0.1:PORT``): the head's, also for a worker node."""
    temp_dir: Path
    head: bool
    popen: subprocess.Popen[bytes]
    log_path: Path
    resources: dict[str, float] = field(default_factory=dict)
    dashboard_url: str | None = None
    """The head's dashboard (``http://127.0.0.1:PORT``: ``ray job submit``, the state API)."""
    _node_id: str | None = field(default=None, repr=False)

    @property
    def node_id(self) -> str | None:
        """Ray's id of this node (from its raylet's command line; kept once seen, so a killed
        node still has it; None: no raylet yet)."""
        if self._node_id is None:
            for proc in _session(self.popen.pid):
                cmd = cmdline(proc)
                if cmd and Path(cmd[0]).name == "raylet":
                    self._node_id = next((a.split("=", 1)[1] for a in cmd
                                          if a.startswith("--node_id=")), None)
        return self._node_id

    def kill(self) -> StopReport:
        """A crash: SIGKILL to every process of this node at once (raylet, workers, agents);
        the GCS notices the node is gone by its missed health checks."""
        return _stop_session(self.popen, f"Ray node {self.temp_dir}", graceful=False)

    def stop(self) -> StopReport:
        return _stop_session(self.popen, f"Ray node {self.temp_dir}", graceful=True)


def start_ray_node(temp_dir: str | Path, *, address: str | None = None, num_cpus: float = 1,
                   resources: dict[str, float] | None = None, dashboard: bool = True,
                   object_store_mb: int = 500, timeout_s: float = 180.0) -> RayNode:
    """A Ray node on 127.0.0.1 in a session of its own: a head (``address`` None: ``ray start
    --head --block`` on a free port) or a node joining the head at ``address`` (:func:`join`,
    what ``ray start --address`` does; see there why not the CLI). ``temp_dir``: this node's
    own ``--temp-dir`` (keep it short: Ray's socket paths live under it). Every port is chosen
    free, so several clusters (a test session's private one, the demo's head) can share the
    machine. Returns once the node's raylet has registered with the GCS."""
    temp_dir = Path(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **loopback_env()}
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "token" if (Path.home() / ".ray" / "auth_token").exists()
                   else "disabled")
    head = address is None
    dashboard_url = None
    store = str(object_store_mb * 1024 * 1024)
    if head:
        port = free_port()
        address = f"{LOOPBACK}:{port}"
        ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        cmd = [ray_cli, "start", "--head", "--block", "--node-ip-address", LOOPBACK,
               "--port", str(port), "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir),
               "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
               "--object-store-memory", store]
        if dashboard:
            dashboard_port = free_port()
            dashboard_url = f"http://{LOOPBACK}:{dashboard_port}"
            cmd += ["--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard_port)]
        else:
            cmd += ["--include-dashboard", "false"]
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port"):
            cmd += [flag, str(free_port())]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
    else:
        cmd = [sys.executable, "-m", "recsys.cluster_local", "join", "--address", str(address),
               "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir),
               "--resources", json.dumps(resources or {}), "--object-store-memory", store]
    log_path = temp_dir / "ray-start.log"
    with log_path.open("wb") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    node = RayNode(str(address), temp_dir, head, popen, log_path, dict(resources or {}),
                   dashboard_url)
    deadline = time.monotonic() + timeout_s
    # Both print this once the node's raylet has registered with the GCS.
    while STARTED not in log_path.read_text(errors="replace") or node.node_id is None:
        if popen.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"`{' '.join(cmd)}` did not bring a node up:\n"
                               + log_path.read_text(errors="replace")[-3000:])
        time.sleep(1.0)
    log.info("Ray %s node %s up (%s)", "head" if head else "worker", node.node_id, temp_dir)
    return node


STARTED = "Ray runtime started"


def join(address: str, temp_dir: str, num_cpus: float, resources: dict[str, float],
         object_store_memory: int | None = None) -> None:
    """Run a Ray node that joins the head at ``address``, until SIGTERM (then its processes
    are stopped): ``ray start --address ... --block`` for a node on the head's own machine.

    Not the CLI itself: ``ray start --address`` refuses to run under
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what keeps Ray on loopback), and with it set to 1
    the CLI rewrites 127.0.0.1 (the head's address and the node's own) to the machine's
    external address; a node IP such as 127.0.0.2 is not rewritten, but then the raylet
    listens on every interface (Ray binds loopback only for a node IP of 127.0.0.1). So the
    node is started as ``ray start`` starts it after those checks, and as Ray's own
    multi-node test clusters (``ray.cluster_utils.Cluster.add_node``) do: a
    ``ray._private.node.Node`` with ``head=False``, every listener on 127.0.0.1, ports free."""
    import signal as sig

    import ray._private.node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=address, node_ip_address=LOOPBACK, num_cpus=num_cpus,
        resources=resources, temp_dir=temp_dir, node_manager_port=0,
        object_store_memory=object_store_memory,
        object_manager_port=free_port(), dashboard_agent_listen_port=free_port(),
        metrics_agent_port=free_port(), runtime_env_agent_port=free_port(),
        metrics_export_port=free_port())
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True,
                                  spawn_reaper=True)
    print(f"{STARTED}: node {node.node_id} at {node.node_ip_address}, joined {address}",
          flush=True)
    sig.signal(sig.SIGTERM, lambda *_: sys.exit(0))  # exit hooks stop the node's processes
    try:
        while True:
            time.sleep(1.0)
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m recsys.cluster_local",
                                     description="Join a local Ray head as a second node.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("join", help="run a node that joins the head at --address")
    p.add_argument("--address", required=True)
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--num-cpus", type=float, default=1)
    p.add_argument("--resources", default="{}", help="JSON, e.g. '{\"node_b\": 1}'")
    p.add_argument("--object-store-memory", type=int, default=None, help="bytes")
    args = parser.parse_args(argv)
    for key, value in loopback_env().items():
        os.environ[key] = value
    join(args.address, args.temp_dir, args.num_cpus, json.loads(args.resources),
         args.object_store_memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
