"""Shared body of the training jobs: parse, validate, connect, run, summarise."""

from __future__ import annotations

import sys

from recsys.config import ConfigError, load_config, log_config, parse_job_args
from recsys.logs import setup_logging
from recsys.training.config import TrainJobConfig


def run_job(mode: str, description: str, argv: list[str] | None = None) -> int:
    from recsys.cluster import init_ray
    from recsys.evaluation.report import metrics_table
    from recsys.training.run import run_training

    args = parse_job_args(description, argv)
    setup_logging()
    try:
        cfg = load_config(TrainJobConfig, args.config, [*args.overrides, f"mode={mode}"])
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    log_config(cfg, f"{mode} {cfg.name}")
    init_ray()
    out = run_training(cfg)
    print("\n".join(metrics_table(out.report)))
    print(f"best valid NDCG@10 {out.best_metric:.4f}; export {out.export_dir}; "
          f"report {out.export_dir.parent / 'report'}; {out.seconds:.0f}s"
          + (f"; MLflow run {out.run_id} at {out.tracking_uri}" if out.run_id else ""))
    return 0
