"""Stopping processes we started, and only them: a pid counts while it still has the start
time recorded with it (a recycled pid is never signalled); SIGTERM, then SIGKILL; permission
errors reported per process, never raised. Used by ``make stop`` for the Ray head
(``recsys.cluster``) and the detached MLflow server (``recsys.tracking.server``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

# A process is the one recorded if it started within this of the recorded time (psutil derives
# start times from boot time + clock ticks: equal to the tick in practice; a pid is recycled
# only after the kernel has gone round the whole pid space).
CREATE_TIME_TOLERANCE_S = 0.5


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def describe(proc: psutil.Process) -> dict[str, Any] | None:
    try:
        return {"pid": proc.pid, "create_time": proc.create_time(), "name": process_label(proc)}
    except psutil.NoSuchProcess:
        return None



@dataclass
class StopReport:
    """What a stop did, for one thing (the Ray head, the MLflow server): one line each."""

    what: str
    stopped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    note: str = ""

    def lines(self) -> list[str]:
        if self.stopped:
            n = len(self.stopped)
            head = (f"{self.what}: stopped {n} process{'es' if n > 1 else ''} "
                    f"({', '.join(self.stopped)})")
        else:
            head = f"{self.what}: {self.note or 'nothing stopped'}"
        return [head, *(f"  skipped {s}" for s in self.skipped),
                *(f"  NOT stopped: {f}" for f in self.failed)]


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def process_label(proc: psutil.Process) -> str:
    """A short name for a report: ``gcs_server``, ``raylet``, ``dashboard``, ``ray::IDLE``,
    ``ray client server``..."""
    cmd = cmdline(proc)
    if "ray.util.client.server" in cmd:
        return "ray client server"
    if not cmd:
        try:
            return proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return "?"
    name = Path(cmd[0].split(" ")[0]).name  # Ray rewrites some titles to one long argv[0]
    if name.startswith("python"):
        if "-m" in cmd[:-1]:
            name = cmd[cmd.index("-m") + 1]
        else:
            name = next((Path(a).stem for a in cmd[1:] if a.endswith(".py")),
                        "python -c" if "-c" in cmd else name)
    return name[:40]


def find_recorded(pid: int, created: tuple[float, float], label: str,
                  report: StopReport) -> psutil.Process | None:
    """The running process ``pid`` if it started within ``created`` (earliest, latest): the one
    recorded. None if it has exited; None and reported as skipped if the pid now belongs to
    another process (a stale record: a recycled pid is never signalled)."""
    try:
        proc = psutil.Process(pid)
        started = proc.create_time()
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        report.failed.append(f"pid {pid} ({label}): cannot read its start time (permission "
                             f"denied); check it yourself (`ps -o lstart= -p {pid}`)")
        return None
    earliest, latest = created
    if not earliest <= started <= latest:
        report.skipped.append(
            f"pid {pid} ({label}): now another process ({process_label(proc)}, started "
            f"{_when(started)}; the recorded one started {_when(earliest)}); left alone")
        return None
    return proc


def around(create_time: float) -> tuple[float, float]:
    return create_time - CREATE_TIME_TOLERANCE_S, create_time + CREATE_TIME_TOLERANCE_S


def _denied(report: StopReport, proc: psutil.Process, label: str) -> None:
    try:
        owner = f"it runs as {proc.username()}"
    except (psutil.Error, KeyError):
        owner = "it belongs to another user"
    report.failed.append(
        f"pid {proc.pid} ({label}): permission denied ({owner}); stop it as that user or "
        f"root (`sudo kill {proc.pid}`), then run `make stop` again")


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after ``timeout_s``. Zombies count as gone: they hold
    no sockets, and a container's PID 1 may never reap them."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def terminate(procs: dict[psutil.Process, str], report: StopReport,
              timeout_s: float) -> None:
    """SIGTERM each process (value: its label), SIGKILL what is left after ``timeout_s``; each
    outcome goes to ``report``. A permission error is reported and the others still stopped.
    psutil signals a process only while it is the one looked up (same start time)."""
    signalled: dict[psutil.Process, str] = {}
    for proc, label in procs.items():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            report.stopped.append(f"{label} {proc.pid}")  # exited with its parent
            continue
        except (psutil.AccessDenied, PermissionError):
            _denied(report, proc, label)
            continue
        signalled[proc] = label
    left = _wait_gone(list(signalled), timeout_s)
    for proc in left:
        log.warning("pid %d (%s) ignored SIGTERM for %.0f s; killing it", proc.pid,
                    signalled[proc], timeout_s)
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
        except (psutil.AccessDenied, PermissionError):
            _denied(report, proc, signalled[proc])
    left = _wait_gone(left, 5.0)
    for proc, label in signalled.items():
        if proc in left:
            if not any(f.startswith(f"pid {proc.pid} ") for f in report.failed):
                report.failed.append(f"pid {proc.pid} ({label}): still running after SIGKILL")
        else:
            report.stopped.append(f"{label} {proc.pid}")


def with_descendants(procs: list[psutil.Process]) -> dict[psutil.Process, str]:
    """``procs`` and everything they started, labelled, without this process and its parents
    (a stop run from inside the cluster does not stop itself)."""
    me = psutil.Process()
    exclude = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        found.setdefault(proc.pid, proc)
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {p: process_label(p) for pid, p in sorted(found.items()) if pid not in exclude}
