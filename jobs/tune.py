"""Run a hyperparameter sweep (Ray Tune + ASHA) and update the platform's registered model.

    python -m jobs.tune --config tune/sweeps/demo.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.tune --config tune/sweeps/demo.yaml
"""

from __future__ import annotations

import sys

from recsys.config import ConfigError, load_config, log_config, parse_job_args
from recsys.logs import setup_logging
from recsys.tuning.config import SweepConfig


def main(argv: list[str] | None = None) -> int:
    from recsys.tuning.sweep import format_outcome, run_sweep

    args = parse_job_args(__doc__, argv)
    setup_logging()
    try:
        cfg = load_config(SweepConfig, args.config, args.overrides)
        log_config(cfg, f"sweep {cfg.name}")
        out = run_sweep(cfg, source=str(args.config))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(format_outcome(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
