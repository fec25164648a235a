"""The body every config-driven job shares (``jobs/*.py`` and the ``recsys`` subcommands):
parse ``--config FILE key=value ...``, load and validate the config, send the job's log to
``<work_dir>/logs/`` (the console keeps the job's own lines; ``recsys.logs``), log the config, run,
and name the log files at the end.

A :class:`~recsys.config.ConfigError` (an unknown key, a bad value, a sweep that does not fit the
cluster) is printed without a traceback and the job exits 2, the same for every job and for
``python -m jobs.X`` and ``recsys X`` alike.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from recsys.config import ConfigError, load_config, log_config, parse_job_args
from recsys.logs import close_log_file, log_files, log_to_file, setup_logging
from recsys.settings import get_settings

C = TypeVar("C", bound=BaseModel)


def run_job(schema: type[C], run: Callable[[C, Path], int], *, description: str,
            label: Callable[[C], str], argv: list[str] | None = None,
            fixed: Sequence[str] = ()) -> int:
    """Run one job; returns its exit code.

    ``run(cfg, config_path)`` does the work; ``label(cfg)`` titles the logged config (e.g.
    ``evaluate demo``); ``fixed`` are overrides the job itself sets after the user's (the
    training jobs' ``mode=...``), so the user cannot contradict them.
    """
    args = parse_job_args(description, argv)
    setup_logging()
    try:
        cfg = load_config(schema, args.config, [*args.overrides, *fixed])
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    title = label(cfg)
    log_to_file(title.replace(" ", "-").replace("/", "-"),
                Path(get_settings().work_dir) / "logs")
    log_config(cfg, title)
    try:
        return run(cfg, args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        files = log_files()
        if files:
            workers = f", Ray workers' output: {files['workers']}" \
                if files["workers"].exists() else ""
            print(f"logs: {files['driver']}{workers}", flush=True)
        close_log_file()
