"""The whole pipeline as one job.

    python -m jobs.pipeline --config configs/pipeline/demo.yaml [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

from recsys.job import run_job
from recsys.pipeline import PipelineConfig, run_pipeline


def pipeline(cfg: PipelineConfig, config: Path) -> int:
    run_pipeline(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(PipelineConfig, pipeline, description=__doc__, argv=argv,
                   label=lambda cfg: f"pipeline {cfg.name}")


if __name__ == "__main__":
    raise SystemExit(main())
