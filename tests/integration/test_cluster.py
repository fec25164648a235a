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


def test_stop_local_head_stops_that_head_only(ray_cluster) -> None:
    """`make stop` stops the demo's head, not every Ray cluster on the machine (`ray stop` did,
    and once killed a benchmark's cluster): a second head is stopped by its GCS port while this
    session's private cluster keeps running tasks."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from recsys.cluster import loopback_env, stop_local_head

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port",
                 "--ray-client-server-port"):
        cmd += [flag, str(free_port())]
    env = {**os.environ, **loopback_env()}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]

    assert stop_local_head(port) >= 2  # at least its GCS and raylet
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the head's GCS still listens"
    assert stop_local_head(port) == 0  # nothing left to stop

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
