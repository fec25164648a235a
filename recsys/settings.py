"""Environment settings (``RECSYS_*``): where things live, not how to train.

Hyperparameters go in job configs; addresses and storage paths go here, so the same job config
runs on a laptop and on a cluster with shared storage. Every field is read by some job:
``tests/unit/test_settings.py`` shows each one's effect.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Read from the environment each time `get_settings()` is called (no cache: a variable a
    test or a job sets is seen)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore",
                                      use_attribute_docstrings=True)

    work_dir: str = "runs"
    """Local root of project state outside job configs: the detached MLflow server's database,
    artifacts and logs live under ``<work_dir>/mlflow``."""
    ray_address: str | None = None
    """Ray cluster for ``init_ray`` to join when ``RAY_ADDRESS`` is unset (``ray job submit`` sets
    that one, and it wins); None: start a private local cluster."""
    ray_num_cpus: int | None = None
    """Logical CPUs of a locally started Ray cluster (``init_ray``, the demo's ``ray start``
    head) when the job does not set them (e.g. the pipeline's ``ray.num_cpus``); None: the
    machine's count."""
    storage_path: str | None = None
    """Shared run storage (local dir or ``s3://``, ``gs://``): sweeps keep their Ray Tune
    experiment in ``<storage_path>/<sweep name>/tune``, and the pipeline's training stages use
    ``<storage_path>/<pipeline name>/train`` as ``output_dir`` (Ray Train's checkpoints there;
    exports and reports under ``<work_dir>/train/<scheme>/<bucket>/<path>/<run name>``).
    None: the sweep's ``output_dir/name`` and the pipeline's ``<its work dir>/train``."""
    mlflow_tracking_uri: str | None = None
    """MLflow server; None: the project starts a local one (SQLite)."""


def get_settings() -> Settings:
    return Settings()
