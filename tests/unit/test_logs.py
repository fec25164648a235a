"""The job console (``recsys.logs``): our lines and the workers' epoch lines on the console,
library chatter, warnings and every worker line in the log files, nothing left behind."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys import logs


@pytest.fixture
def job_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("RECSYS_VERBOSE", raising=False)
    for var in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "HF_HUB_DISABLE_PROGRESS_BARS",
                "MLFLOW_CONFIGURE_LOGGING"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    path = logs.log_to_file("job-x", tmp_path / "logs")
    assert path is not None
    yield path
    logs.close_log_file()
    monkeypatch.setattr(logs, "_last_workers_file", None)


def _record(name: str, level: int, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, "msg", None, None)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize(("name", "level", "extra", "shown"), [
    ("recsys.pipeline.context", logging.INFO, {}, True),
    ("recsys", logging.WARNING, {}, True),
    ("recsys.config", logging.INFO, {"console": False}, False),
    ("ray.serve", logging.INFO, {}, False),
    ("ray.data", logging.WARNING, {}, False),          # "Progress bars disabled"
    ("py.warnings", logging.WARNING, {}, False),       # deprecation warnings
    ("tensorboardX.summary", logging.INFO, {}, False),
    ("mlflow.pyfunc", logging.WARNING, {}, False),
    ("somelib", logging.WARNING, {}, True),            # a warning nobody classified
    ("ray.train", logging.ERROR, {}, True),            # errors always
])
def test_console_filter(name: str, level: int, extra: dict, shown: bool) -> None:
    assert logs.ConsoleFilter().filter(_record(name, level, **extra)) is shown


def test_console_keeps_our_lines_and_the_file_keeps_everything(
        job_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # log_to_file made its console handler before capsys could swap stderr in this test's
    # body, so re-open it here to capture what the console would show.
    logs.close_log_file()
    job_log = logs.log_to_file("job-y", job_log.parent)
    assert job_log is not None and job_log.name.startswith("job-y-")
    logging.getLogger("recsys.stage").info("stage one running")
    logging.getLogger("ray.serve").info("Started Serve in namespace")
    logging.getLogger("recsys.config").info("{ full config }", extra=logs.FILE_ONLY_RECORD)
    with warnings.catch_warnings():  # pytest records warnings; let them reach logging here
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    logging.getLogger("somelib").warning("disk almost full")
    err = capsys.readouterr().err
    assert "stage one running" in err and "WARNING somelib: disk almost full" in err
    assert "Started Serve" not in err and "full config" not in err and "old API" not in err
    text = job_log.read_text()
    for line in ("stage one running", "Started Serve", "full config", "old API",
                 "disk almost full"):
        assert line in text


def test_worker_output_goes_to_the_file_and_only_marked_lines_to_the_console(
        job_log: Path, capfd: pytest.CaptureFixture[str]) -> None:
    fallback: list[dict] = []
    handler = logs._WorkerOutput(fallback.append)
    handler({"pid": 42, "actor_name": "RayTrainWorker", "is_err": False,
             "lines": ["Dataset valid_1 execution finished", f"{logs.WORKER_CONSOLE}run-a  "
                       "epoch   0  loss 5.1"]})
    handler({"pid": 43, "is_err": True, "lines": ["RayDeprecationWarning: old"]})
    out = capfd.readouterr().out
    assert "run-a  epoch   0  loss 5.1" in out and "execution finished" not in out
    assert "RayDeprecationWarning" not in out
    workers = logs.log_files()["workers"]
    text = workers.read_text()
    assert "(RayTrainWorker pid=42) Dataset valid_1 execution finished" in text
    assert "(worker pid=43 stderr) RayDeprecationWarning: old" in text
    assert not fallback
    logs.close_log_file()  # the job ended: late lines (Serve's request log) stay in the file
    handler({"pid": 44, "lines": ["GET /readyz 200"]})
    assert "GET /readyz 200" in workers.read_text() and not fallback


def test_library_stdout_goes_to_the_log_file(job_log: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with logs.stdout_to_log():
        print("Trial status: 1 RUNNING")
    assert "Trial status" not in capsys.readouterr().out
    assert "Trial status: 1 RUNNING" in job_log.read_text()


def test_close_leaves_plain_logging_and_verbose_keeps_the_console(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = logs.log_to_file("job-z", tmp_path)
    assert path is not None and logs.log_files()["driver"] == path
    logs.close_log_file()
    monkeypatch.setattr(logs, "_last_workers_file", None)
    root = logging.getLogger()
    assert logs.log_files() == {}
    assert not any(isinstance(h, logging.FileHandler) for h in root.handlers)
    assert not any(isinstance(f, logs.ConsoleFilter) for h in root.handlers for f in h.filters)
    with logs.stdout_to_log():  # a no-op without a file
        pass
    monkeypatch.setenv("RECSYS_VERBOSE", "1")
    assert logs.log_to_file("job-v", tmp_path) is None and logs.log_files() == {}
