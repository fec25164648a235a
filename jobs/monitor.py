"""Drift and quality monitor: newest logs and served traffic vs each champion's training data.

    python -m jobs.monitor --config configs/monitor/monitor.yaml [key=value ...]  # one check
    python -m jobs.monitor --config configs/monitor/monitor.yaml --watch   # every interval_s

With ``trigger.enabled: true`` a drifted platform calls ``recsys.production.trigger.on_drift``.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.job import run_job
from recsys.monitoring.config import MonitorConfig

if TYPE_CHECKING:
    from recsys.monitoring.monitor import OnDrift


def monitor(cfg: MonitorConfig, config: Path, watching: bool = False) -> int:
    from recsys.monitoring.monitor import watch
    from recsys.monitoring.report import format_summary

    try:
        watch(cfg, _trigger() if cfg.trigger.enabled else None,
              max_checks=None if watching else 1,
              on_check=lambda reports: print(format_summary(reports), flush=True))
    except KeyboardInterrupt:
        print("monitor: stopped", flush=True)
    return 0


def _trigger() -> OnDrift:
    from recsys.production.trigger import on_drift

    return on_drift


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    watching = "--watch" in args
    return run_job(MonitorConfig, partial(monitor, watching=watching), description=__doc__,
                   argv=[a for a in args if a != "--watch"],
                   label=lambda cfg: f"monitor {cfg.name}")


if __name__ == "__main__":
    raise SystemExit(main())
