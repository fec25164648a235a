"""Stop what the demo leaves running: the local Ray head (port 6379) with its Serve endpoint, and
the detached MLflow server. Other Ray clusters on the machine (a benchmark's, a test session's)
keep running: unlike ``ray stop``, only the head's own processes are stopped.

    python -m jobs.stop        # or: make stop
"""

from __future__ import annotations

import argparse

from recsys.cluster import HEAD_PORT, stop_local_head
from recsys.settings import get_settings
from recsys.tracking.server import default_root, stop_detached


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    stopped = stop_local_head(HEAD_PORT)
    print(f"local Ray head on port {HEAD_PORT}: " + (
        f"stopped ({stopped} processes, Serve included)" if stopped else "not running"))
    mlflow = stop_detached(default_root(get_settings()))
    print("MLflow server: " + ("stopped" if mlflow else "not running"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
