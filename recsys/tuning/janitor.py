"""Removes the placement groups of training runs whose trial Tune stopped.

When the scheduler stops a trial, Tune ends the trial's actor, and with it the Ray Train
controller it owns. Ray Train V2 then relies on its ``PlacementGroupCleaner`` to remove the
worker group's placement group; that cleaner finds the cluster through address auto-detection
(``RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster``), which picks another cluster when a machine
runs several or has a stale file from a ``ray start`` (seen here: "Found multiple active Ray
instances ... Connecting to latest cluster at <a dead address>"). The reserved CPUs then stay
reserved and the next trial waits forever for Ray Data or its workers. A private cluster from
``recsys.cluster.init_ray`` hands its processes its own ``RAY_ADDRESS``, so there the cleaner
finds it; on a cluster the sweep joined, the environment is whatever it was started with, so the
janitor stays as the safety net. It runs on the
sweep driver, which knows its cluster's address, and removes a placement group of *this job*
that no live actor uses, once it has seen it orphaned on two checks in a row (a new trial's
group is briefly empty before its workers start; it is not touched unless that lasts).
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

log = logging.getLogger(__name__)


class PlacementGroupJanitor:
    """A daemon thread while ``Tuner.fit`` runs (``with PlacementGroupJanitor(): ...``)."""

    def __init__(self, trial_cpu: float, interval_s: float = 10.0) -> None:
        self.trial_cpu = trial_cpu
        self.interval_s = interval_s
        self.removed: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._suspects: set[str] = set()

    def __enter__(self) -> PlacementGroupJanitor:
        import ray

        ctx = ray.get_runtime_context()
        self._address = ctx.gcs_address
        self._job_id = ctx.get_job_id()
        self._thread = threading.Thread(target=self._run, name="pg-janitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sweep_once(final=True)  # trials are over: nothing of this job should hold a group

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep_once()
            except Exception as exc:  # the state API can be briefly unavailable; try again
                log.warning("placement group janitor: %s", exc)

    def orphans(self) -> set[str]:
        """Created placement groups of this job that no live actor is placed in."""
        from ray.util.state import list_actors, list_placement_groups

        groups = list_placement_groups(address=self._address, limit=10_000,
                                       filters=[("state", "=", "CREATED")])
        mine = {g.placement_group_id for g in groups if g.creator_job_id == self._job_id}
        if not mine:
            return set()
        actors = list_actors(address=self._address, limit=10_000, detail=True,
                             filters=[("state", "!=", "DEAD")])
        used = {a.placement_group_id for a in actors if a.placement_group_id}
        return {pg for pg in mine - used if not self._is_trial_group(pg)}

    def _is_trial_group(self, pg_id: str) -> bool:
        """Tune's own group of a trial ({"CPU": trial_cpu}): Tune removes it, and may stage it
        before the trial's actor exists; never ours to remove."""
        import ray

        bundles = ray.util.placement_group_table().get(pg_id, {}).get("bundles", {})
        return all(b == {"CPU": self.trial_cpu} for b in bundles.values())

    def sweep_once(self, final: bool = False) -> None:
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            orphans = self.orphans()
        except Exception as exc:
            log.warning("placement group janitor could not list groups: %s", exc)
            return
        doomed = orphans if final else orphans & self._suspects
        self._suspects = orphans - doomed
        for pg_id in doomed:
            log.warning("removing placement group %s left by a stopped trial's training run",
                        pg_id)
            remove_placement_group(PlacementGroup(_pg_id_from_hex(pg_id)))
            self.removed.append(pg_id)


def _pg_id_from_hex(pg_id: str):  # noqa: ANN202 - a ray._raylet.PlacementGroupID
    from ray._raylet import PlacementGroupID

    return PlacementGroupID(bytes.fromhex(pg_id))
