"""Evaluate exported models on the test split (full ranking, per platform, cold-start subset)
and, given a ``scratch`` baseline among them, write the transfer report.

    python -m jobs.evaluate --config configs/eval/demo.yaml [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

from recsys.evaluation.offline import EvaluateConfig, run_evaluation
from recsys.job import run_job


def evaluate(cfg: EvaluateConfig, config: Path) -> int:
    for label, path in run_evaluation(cfg).items():
        print(f"{label}: {path.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(EvaluateConfig, evaluate, description=__doc__, argv=argv,
                   label=lambda cfg: f"evaluate {cfg.name}")


if __name__ == "__main__":
    raise SystemExit(main())
