"""Environment settings (``RECSYS_*``): where things live, not how to train.

Hyperparameters go in job configs; addresses and storage paths go here, so the same job config
runs on a laptop and on a cluster with shared storage.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    work_dir: str = "runs"
    """Local root for lakes, examples, checkpoints when a config gives relative paths."""
    ray_address: str | None = None
    """Ray cluster address; None starts (or joins, under `ray job submit`) a local cluster."""
    ray_num_cpus: int | None = None
    """Logical CPUs of a local cluster (None: the machine's count)."""
    storage_path: str | None = None
    """Ray Train/Tune storage (local dir or s3://, gs://)."""
    mlflow_tracking_uri: str | None = None
    """MLflow server; None: the project starts a local one (SQLite)."""


def get_settings() -> Settings:
    return Settings()
