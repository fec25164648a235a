"""Federated pretraining: one client per platform, only model updates reach the server.

    python -m jobs.federated --config configs/federated/federated.yaml [key=value ...]

The export (``output_dir/name/export``) has pooled pretraining's format: start a transfer
from it with ``python -m jobs.transfer ... transfer.init_from=<export>``.
"""

from __future__ import annotations

from pathlib import Path

from recsys.federated.config import FederatedJobConfig
from recsys.job import run_job


def federate(cfg: FederatedJobConfig, config: Path) -> int:
    """Connect to Ray, run the rounds, print the report table and where everything went."""
    from recsys.cluster import init_ray
    from recsys.evaluation.report import metrics_table
    from recsys.federated.server import run_federated

    init_ray()
    out = run_federated(cfg)
    if out.report is not None:
        print("\n".join(metrics_table(out.report)))
    print(f"best round {out.best_round} (valid NDCG@10 {out.best_metric:.4f}); "
          f"{out.bytes_up_per_round / 1e6:.2f} MB up per round; export {out.export_dir}; "
          f"{out.seconds:.0f}s" + (f"; MLflow run {out.run_id}" if out.run_id else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(FederatedJobConfig, federate, description=__doc__ or "",
                   argv=argv, label=lambda cfg: f"federated {cfg.name}")


if __name__ == "__main__":
    raise SystemExit(main())
