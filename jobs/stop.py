"""Stop what the demo leaves running: the Serve endpoint and the local Ray head it runs on,
and the detached MLflow server.

    python -m jobs.stop        # or: make stop
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from recsys.cluster import loopback_env
from recsys.settings import get_settings
from recsys.tracking.server import default_root, stop_detached


def main() -> int:
    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = {**os.environ, **loopback_env(), "RAY_AUTH_MODE": "token"}
    # `ray stop` stops every Ray process of this user on the machine, Serve included.
    subprocess.run([ray_cli, "stop"], env=env, check=False)
    stop_detached(default_root(get_settings()))
    print("stopped the local Ray cluster (and its Serve endpoint) and the MLflow server")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
