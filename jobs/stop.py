"""Stop what the demo started and left running: the local Ray head (with its Serve endpoint and
Ray client server) and the detached MLflow server. Only what this project started and recorded
under ``<work_dir>`` (``RECSYS_WORK_DIR``, default ``runs``) is stopped: a Ray cluster it joined,
another one on the machine (a benchmark's, a test session's), a process that merely names a Ray
session directory, or a pid a stale file names (start time differs) keeps running.

    python -m jobs.stop        # or: make stop

Prints one line per thing (what was stopped, what was skipped and why); exit code 1 if something
could not be stopped (e.g. permission denied: the line says which pid and what to do).
"""

from __future__ import annotations

import argparse

from recsys.cluster import stop_local_head
from recsys.settings import get_settings
from recsys.tracking.server import default_root, stop_detached_server


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    settings = get_settings()
    reports = [stop_local_head(settings.work_dir), stop_detached_server(default_root(settings))]
    for report in reports:
        print("\n".join(report.lines()), flush=True)
    return 1 if any(report.failed for report in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
