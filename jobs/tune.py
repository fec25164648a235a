"""Run a hyperparameter sweep (Ray Tune + ASHA) and update the platform's registered model.

    python -m jobs.tune --config tune/sweeps/demo.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.tune --config tune/sweeps/demo.yaml
"""

from __future__ import annotations

from pathlib import Path

from recsys.job import run_job
from recsys.tuning.config import SweepConfig


def tune(cfg: SweepConfig, config: Path) -> int:
    from recsys.tuning.results import format_outcome
    from recsys.tuning.sweep import run_sweep

    print(format_outcome(run_sweep(cfg, source=str(config))))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(SweepConfig, tune, description=__doc__, argv=argv,
                   label=lambda cfg: f"sweep {cfg.name}")


if __name__ == "__main__":
    raise SystemExit(main())
