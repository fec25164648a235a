"""Logging for jobs and the CLI: the console shows the job's own lines, a log file keeps the rest.

A job that calls :func:`log_to_file` gets a quiet console: ``recsys.*`` records at INFO, other
libraries' warnings only where a user must act, and the rank-0 lines that workers mark with
:data:`WORKER_CONSOLE` (one per epoch). Everything else (Ray/Serve/MLflow INFO, deprecation
warnings, library progress bars, every worker's stdout and stderr) goes to two files next to each
other, ``<job>-<time>.log`` (this process) and ``<job>-<time>.workers.log`` (Ray's workers),
whose paths :func:`log_files` returns for the job's summary. Without it (tests, small CLI
commands) logging is plain: our lines at INFO, Ray's chatter at WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

QUIET = ("ray", "ray.data", "ray.train", "ray.tune", "filelock", "urllib3", "transformers")
# Loggers whose records (warnings included) stay in the file: deprecations, MLflow's notes on
# signatures, tensorboardX's "illegal summary name" lines, Ray's internals.
FILE_ONLY = ("py.warnings", "mlflow", "alembic", "tensorboardX", "ray", "filelock", "urllib3",
             "transformers", "huggingface_hub", "asyncio", "torch", "deepspeed", "fsspec")
WORKER_CONSOLE = "recsys| "
"""Prefix of a worker's stdout line that belongs on the driver's console (the epoch line)."""
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_files: dict[str, Path] = {}
_last_workers_file: Path | None = None
_lock = threading.Lock()


class ConsoleFilter(logging.Filter):
    """What reaches the console once a log file takes the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "recsys" or record.name.startswith("recsys."):
            return True
        return record.levelno >= logging.WARNING and not any(
            record.name == p or record.name.startswith(p + ".") for p in FILE_ONLY)


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; the level and logger only where a user should look twice."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{self.formatTime(record, self.datefmt)} {record.levelname} {record.name}: " \
                + text.split(" ", 1)[1]
        return text


FILE_ONLY_RECORD = {"console": False}
"""``log.info(..., extra=FILE_ONLY_RECORD)``: in the log file, not on the console."""


def setup_logging(level: str | None = None) -> None:
    """Plain logging to stderr (no file): our lines at INFO, Ray's chatter at WARNING."""
    logging.basicConfig(
        level=(level or os.environ.get("RECSYS_LOG_LEVEL", "INFO")).upper(),
        format=FORMAT, datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def log_to_file(job: str, directory: Path) -> Path | None:
    """From now on: the console quiet (see the module docstring), everything in
    ``directory/<job>-<time>.log``. Returns that path; None with ``RECSYS_VERBOSE=1`` (all on
    the console, as before). Call it before Ray or MLflow start: their progress bars are
    turned off through the environment they read."""
    if os.environ.get("RECSYS_VERBOSE", "0") not in ("", "0"):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"{job}-{stamp}.log"
    global _last_workers_file
    _files.update(driver=path, workers=directory / f"{job}-{stamp}.workers.log")
    _last_workers_file = _files["workers"]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # its own stderr handler
    root = logging.getLogger()
    for h in list(root.handlers):  # basicConfig's stderr handler (pytest's capture stays)
        if type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    console.addFilter(ConsoleFilter())
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(console)
    root.addHandler(file)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> "py.warnings" -> the file
    route_library_loggers()  # those already configured at import (MLflow)
    return path


def log_files() -> dict[str, Path]:
    """The files :func:`log_to_file` opened (``driver``, ``workers``); {} if none."""
    return dict(_files)


def route_library_loggers() -> None:
    """Loggers that Ray, Ray Data and Serve give their own console handlers, sent to our file
    instead (a no-op without :func:`log_to_file`). Idempotent; call it after ``ray.init`` and
    after ``serve.start``, which (re)configure them."""
    if not _files:
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):  # their console handlers (MLflow's wraps its stream)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True  # to the root's file handler (and its console filter)


@contextmanager
def stdout_to_log() -> Iterator[None]:
    """Within the block, what libraries print to stdout (Tune's status tables) goes to the job's
    log file; a no-op without :func:`log_to_file`. The workers' console lines still show: they
    are written to the process's real stdout."""
    if not _files:
        yield
        return
    with _files["driver"].open("a", encoding="utf-8") as fh, redirect_stdout(fh):
        yield


def route_worker_output() -> bool:
    """Ray forwards every worker's stdout/stderr to the driver's console. Replace that printer
    with one that appends every line to the workers' log file and shows only the lines a worker
    marked with :data:`WORKER_CONSOLE`. Returns False (and leaves Ray's printer) without
    :func:`log_to_file` or where Ray's dispatcher is not where this Ray version keeps it."""
    if not _files:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if "recsys_worker_output" in names:
        return True
    if "ray_print_logs" not in names:  # log_to_driver=False, or another Ray version
        return False
    original = dict(dispatcher.handlers)["ray_print_logs"]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("recsys_worker_output", _WorkerOutput(original))
    return True


def close_log_file() -> None:
    """Back to plain logging (a job run in-process, as tests do, leaves no file handler behind).
    Worker output that arrives later (a Serve replica's request log) still goes to the last
    workers' file, not the console."""
    if not _files:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) or any(isinstance(f, ConsoleFilter)
                                                     for f in h.filters):
            root.removeHandler(h)
            h.close()
    _files.clear()  # worker output keeps going to the last workers' file (late Serve lines)
    logging.captureWarnings(False)
    setup_logging()


class _WorkerOutput:
    """A handler of Ray's worker-output batches (``{"pid", "lines", "is_err", ...}``): into
    the workers' log file while one is open, else to Ray's own printer (``original``)."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, data: dict[str, Any]) -> None:
        path = _files.get("workers") or _last_workers_file
        if path is None:
            return self.original(data)
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}{' stderr' if data.get('is_err') else ''}) "
        shown: list[str] = []
        with _lock, path.open("a", encoding="utf-8") as fh:
            for line in data.get("lines", []):
                fh.write(prefix + line + "\n")
                if line.startswith(WORKER_CONSOLE):
                    shown.append(line[len(WORKER_CONSOLE):])
        _print(shown, sys.__stdout__ or sys.stdout)


def _print(lines: list[str], sink: TextIO) -> None:
    for line in lines:
        print(f"{datetime.now():%H:%M:%S}   {line}", file=sink, flush=True)
