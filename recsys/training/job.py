"""The training jobs (``jobs.pretrain``, ``jobs.transfer``, ``jobs.scratch``): one body, the mode
set by the job (``mode=...`` after the user's overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from recsys.job import run_job
from recsys.training.config import TrainJobConfig

Mode = Literal["pretrain", "transfer", "scratch"]


def train(cfg: TrainJobConfig, config: Path) -> int:
    """Connect to Ray, train, print the report table and where everything went."""
    from recsys.cluster import init_ray
    from recsys.evaluation.report import metrics_table
    from recsys.training.run import run_training

    init_ray()
    out = run_training(cfg)
    print("\n".join(metrics_table(out.report)))
    print(f"best valid NDCG@10 {out.best_metric:.4f}; export {out.export_dir}; "
          f"report {out.export_dir.parent / 'report'}; {out.seconds:.0f}s"
          + (f"; MLflow run {out.run_id} at {out.tracking_uri}" if out.run_id else ""))
    return 0


def run_training_job(mode: Mode, description: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<mode>``: the shared job runner with ``mode`` fixed."""
    return run_job(TrainJobConfig, train, description=description, argv=argv,
                   label=lambda cfg: f"{mode} {cfg.name}", fixed=[f"mode={mode}"])
