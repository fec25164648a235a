"""Pretrain one model on the pooled logs of several platforms.

    python -m jobs.pretrain --config configs/train/pretrain.yaml [key=value ...]
"""

from __future__ import annotations

from recsys.training.job import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("pretrain", __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
