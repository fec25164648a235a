"""Evaluate exported models on the test split (full ranking, per platform, cold-start subset)
and, given a ``scratch`` baseline among them, write the transfer report.

    python -m jobs.evaluate --config configs/eval/demo.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from recsys.config import ConfigError, load_config, log_config, parse_job_args
from recsys.logs import setup_logging
from recsys.evaluation.offline import EvaluateConfig, run_evaluation


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(__doc__, argv)
    setup_logging()
    try:
        cfg = load_config(EvaluateConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    log_config(cfg, f"evaluate {cfg.name}")
    for label, path in run_evaluation(cfg).items():
        print(f"{label}: {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
