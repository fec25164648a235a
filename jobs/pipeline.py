"""The whole pipeline as one job.

    python -m jobs.pipeline --config configs/pipeline/demo.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from recsys.config import ConfigError, load_config, log_config, parse_job_args
from recsys.logs import setup_logging
from recsys.pipeline import PipelineConfig, run_pipeline


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(__doc__, argv)
    setup_logging()
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    log_config(cfg, f"pipeline {cfg.name}")
    run_pipeline(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
