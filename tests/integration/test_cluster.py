"""The private local cluster: loopback only, and its processes can find it by themselves."""

from __future__ import annotations

import os


def test_cluster_processes_get_this_clusters_address(ray_cluster) -> None:
    """Ray code that auto-detects the cluster inside a task or actor (Ray Train's placement
    group cleaner calls the state API with no address) must reach this cluster, not whatever a
    stale /tmp/ray/ray_current_cluster names."""
    ray = ray_cluster
    gcs = ray.get_runtime_context().gcs_address

    @ray.remote(num_cpus=0)
    def seen() -> tuple[str | None, str]:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)

    env_address, detected = ray.get(seen.remote())
    assert env_address == gcs
    assert detected == gcs
    assert gcs.startswith("127.0.0.1:")


def test_stop_leaves_a_head_it_did_not_start(ray_cluster, tmp_path) -> None:
    """`make stop` stops only a head it started and recorded (tests/integration/
    test_make_stop.py): a head started by hand (`ray start`) is someone else's and keeps
    running, as does this session's private cluster."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import psutil

    from recsys.cluster import free_port, loopback_env, stop_local_head

    port = free_port()
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must stay short
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
           "--temp-dir", temp]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port",
                 "--ray-client-server-port"):
        cmd += [flag, str(free_port())]
    env = {**os.environ, **loopback_env()}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                             start_new_session=True)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        report = stop_local_head(tmp_path / "work")  # no record there: nothing is ours
        assert report.stopped == [] and "nothing" in report.lines()[0]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == 0, "the foreign head was stopped"
    finally:  # stop it ourselves: every process under its temp dir
        for proc in psutil.process_iter():
            try:
                if any(temp in a for a in proc.cmdline()):
                    proc.kill()
            except psutil.Error:
                continue
        shutil.rmtree(temp, ignore_errors=True)

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def alive() -> int:
        return 42

    assert ray.get(alive.remote(), timeout=60) == 42


def test_private_cluster_leaves_the_heads_dashboard_port(ray_cluster) -> None:
    """A private cluster's dashboard gets a port of its own, so a `ray start --head` started
    later (the demo's) still gets 8265, `ray job submit`'s address, and with it a dashboard:
    without one Ray Train's placement-group cleaner waited 12 s at the end of every fit."""
    from recsys.cluster import DASHBOARD_PORT

    url = ray_cluster._private.worker.global_worker.node.address_info.get("webui_url")
    assert url and url.startswith("127.0.0.1:")
    assert int(url.rsplit(":", 1)[1]) != DASHBOARD_PORT
