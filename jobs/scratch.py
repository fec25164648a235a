"""Train on one platform from scratch: the baseline transfer must beat.

    python -m jobs.scratch --config configs/train/scratch.yaml [key=value ...]
"""

from __future__ import annotations

from recsys.training.job import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("scratch", __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
