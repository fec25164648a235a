"""Logging for jobs and the CLI: our lines at INFO, Ray's chatter at WARNING (bars stay)."""

from __future__ import annotations

import logging
import os

QUIET = ("ray", "ray.data", "ray.train", "ray.tune", "filelock", "urllib3", "transformers")


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("RECSYS_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
