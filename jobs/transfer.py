"""Transfer a pretrained model to a platform (full | freeze_encoder | lora | adapter_only).

    python -m jobs.transfer --config configs/train/transfer.yaml [key=value ...]
"""

from __future__ import annotations

from recsys.training.job import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("transfer", __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
