"""The production loop of issue 23: how fast drift is detected, what logging every served answer
costs, and how long a drift takes to reach the endpoint as a new champion.

Parts (``--parts``, each merged into ``bench/results/monitor.json`` under its own key, and
``monitor.md`` rendered from every part recorded so far):

* ``detect`` (``bench/monitor_detect.py``): new interactions until the drift monitor's
  ``check_platform`` flags a popularity shift injected into a synthetic shop's new logs, for
  shift strengths 100%, 50%, 25% and 0% (false alarms up to all held-back events), with the
  shipped config's thresholds. No training, about a minute.
* ``logging`` (``bench/monitor_logging.py``): /recommend p50/p95 and req/s with the impression
  log (``feedback.dir``) off and on, the same toy app and requests, interleaved rounds at 1 and
  8 closed-loop clients; the p50 ratio on/off (target <= 1.05) and rows written/dropped.
* ``loop`` (``bench/monitor_loop.py``): the end-to-end loop of ``tests/integration/
  test_trigger.py`` timed: from the check that flags the shift to the re-fine-tune registered,
  the canary's verdict and the first answer of the new champion; requests sent and failed.

    flock /tmp/recsys-ray.lock .venv/bin/python bench/monitor.py --parts detect,logging
    flock /tmp/recsys-ray.lock .venv/bin/python bench/monitor.py --parts loop   # ~5-8 min
    .venv/bin/python bench/monitor.py --render   # monitor.md from the recorded JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, machine_info, source_state, stderr_log, write_json
from monitor_detect import render_detect, run_detect
from monitor_logging import render_logging, run_logging
from monitor_loop import render_loop, run_loop

sys.path.insert(0, str(REPO))
log = stderr_log("monitor")

PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "detect": run_detect, "logging": run_logging, "loop": run_loop}
RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "detect": render_detect, "logging": render_logging, "loop": render_loop}


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Production loop benchmark (issue 23)", "",
             f"Machine: {m.get('cpu_count_logical')} CPUs ({m.get('cpu_model')}), "
             f"{m.get('date')}. Written by `bench/monitor.py`; the loop itself: "
             "`docs/monitoring.md`.", ""]
    for part in PARTS:
        block = results["parts"].get(part)
        if block is None:
            continue
        lines += RENDERERS[part](block)
        src = block.get("source") or {}
        if src.get("commit"):
            tree = "a clean tree" if src.get("dirty") is False else "local changes"
            lines += ["", f"_Part `{part}`: commit `{src['commit'][:10]}`, {tree}, "
                          f"{block.get('seconds', 0) / 60:.1f} min, load average at the end "
                          f"{block.get('loadavg_end')}._"]
        lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    p.add_argument("--scale", type=float, default=0.5, help="detect: synthetic shops' scale")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="logging: seconds per measurement (one arm, one round)")
    p.add_argument("--rounds", type=int, default=4,
                   help="logging: off/on rounds per level and placement")
    p.add_argument("--render", action="store_true", help="only rewrite monitor.md")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    path = a.out / "monitor.json"
    if a.render:
        (a.out / "monitor.md").write_text(render(json.loads(path.read_text())))
        return 0
    parts = a.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; known: {list(PARTS)}")
    os.chdir(REPO)
    logging.basicConfig(level=logging.WARNING)
    results = json.loads(path.read_text()) if path.exists() else {"parts": {}}
    results["machine"] = machine_info(["torch", "ray", "mlflow", "pyarrow"])
    for part in parts:
        log(f"part {part} ...")
        t0 = time.perf_counter()
        block = PARTS[part](a)
        block["seconds"] = round(time.perf_counter() - t0, 1)
        block["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        block["source"] = source_state()
        results["parts"][part] = block
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        (a.out / "monitor.md").write_text(render(results))
    print((a.out / "monitor.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
