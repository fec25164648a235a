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
