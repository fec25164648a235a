"""The fixed cost of one Ray Train run on this machine: an empty ``TorchTrainer.fit``.

2 workers x 0.5 CPU over gloo, a train and a valid dataset (materialized, as the sweep passes
them), a train function that reads its shards and reports once. Measured per fit: from ``fit()``
to the train function's first line, the shard reads, and from the report to ``fit()`` returning;
plus which Ray processes the fit started and when they came up (polled from /proc), because on a
small machine the start-up is mostly process starts.

Two cluster set-ups in one run, each in a fresh private cluster (a child process):

* ``own``: ``recsys.cluster.init_ray``, whose processes get the cluster's own ``RAY_ADDRESS``;
* ``wrong``: the processes get the address of a cluster that is not there, which is what they
  found before that fix whenever ``/tmp/ray/ray_current_cluster`` was stale (after a
  ``ray stop``): Ray Train's placement-group cleaner then hangs on every state-API call.

    python bench/train_start.py            # -> bench/results/train_start.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, no_progress_bars, stderr_log, write_json

sys.path.insert(0, str(REPO))
log = stderr_log("train-start")


def _train_fn(config: dict[str, Any]) -> None:
    import ray.train

    entered = time.time()
    for name in ("train", "valid"):
        for _ in ray.train.get_dataset_shard(name).iter_batches(batch_size=256):
            pass
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["marks"]).write_text(json.dumps({"entered": entered,
                                                     "shards_done": time.time()}))
    ray.train.report({"x": 1})


class ProcessWatch:
    """First time each Ray worker process shows each title (``ray::IDLE``, ``ray::<Actor>...``)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[float, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
                if cmd.startswith("ray::"):
                    title = cmd.split()[0]
                    entries = self.seen.setdefault(int(pid), [])
                    if not entries or entries[-1][1] != title:
                        entries.append((now, title))
            time.sleep(0.1)

    def start(self) -> ProcessWatch:
        self._thread.start()
        return self

    def since(self, t0: float) -> list[dict[str, Any]]:
        """Processes that appeared after ``t0``, with their titles' times relative to it."""
        out = []
        for pid, entries in self.seen.items():
            if entries[0][0] < t0:
                continue
            titles = [(round(t - t0, 2), title) for t, title in entries]
            actor = next((title.split(".")[0].removeprefix("ray::") for _, title in titles
                          if title != "ray::IDLE"), "IDLE")
            ready = next((t for t, title in titles if title != "ray::IDLE"), None)
            out.append({"pid": pid, "actor": actor, "started_s": titles[0][0],
                        "ready_s": ready, "titles": titles})
        return sorted(out, key=lambda r: r["started_s"])

    def stop(self) -> None:
        self._stop.set()


def measure(setup: str, fits: int, workdir: Path) -> dict[str, Any]:
    """Runs in a child process: one private cluster, ``fits`` empty fits."""
    import ray
    import ray.data
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys.cluster import free_port, init_ray
    from recsys.data.feed import SPLIT_DATASETS
    from recsys.training.trainer import controller_env

    if setup == "wrong":
        # What the processes found before the fix: an address file naming a dead cluster.
        os.environ["RAY_GCS_SERVER_PORT"] = str(free_port())
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1",
                 dashboard_host="127.0.0.1", include_dashboard=True)
        for key in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
            os.environ.pop(key)
    else:
        init_ray(num_cpus=2)
    controller_env()
    no_progress_bars()
    datasets = {"train": ray.data.range(4000).materialize(),
                "valid": ray.data.range(1000).materialize()}
    watch = ProcessWatch().start()
    time.sleep(2)
    rows = []
    marks = workdir / f"marks-{setup}.json"
    for i in range(fits):
        trainer = TorchTrainer(
            _train_fn, train_loop_config={"marks": str(marks)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            torch_config=TorchConfig(backend="gloo"), datasets=datasets,
            dataset_config=DataConfig(datasets_to_split=list(SPLIT_DATASETS)),
            run_config=RunConfig(name=f"{setup}-{i}", storage_path=str(workdir / "storage")))
        t0 = time.time()
        trainer.fit()
        t1 = time.time()
        m = json.loads(marks.read_text())
        rows.append({"fit_s": round(t1 - t0, 2), "to_train_fn_s": round(m["entered"] - t0, 2),
                     "shards_s": round(m["shards_done"] - m["entered"], 2),
                     "report_to_return_s": round(t1 - m["shards_done"], 2),
                     "processes": watch.since(t0)})
        log(f"{setup} fit {i}: {rows[-1]['fit_s']} s (to train fn {rows[-1]['to_train_fn_s']}, "
            f"shards {rows[-1]['shards_s']}, end {rows[-1]['report_to_return_s']})")
        time.sleep(2)
    watch.stop()
    ray.shutdown()
    return {"setup": setup, "fits": rows}


def summary(res: dict[str, Any]) -> dict[str, float]:
    """Means over the fits after the first (the first also pays one-off imports and Ray Data)."""
    rows = res["fits"][1:] or res["fits"]
    keys = ("fit_s", "to_train_fn_s", "shards_s", "report_to_return_s")
    return {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in keys}


def render(results: dict[str, Any]) -> str:
    """``train_start.md`` from what ``train_start.json`` records."""
    lines = ["# Fixed cost of one Ray Train run (`bench/train_start.py`)", "",
             f"{results['created_at']}; {results['machine']}. An empty `TorchTrainer.fit`: 2 "
             "workers x 0.5 CPU (gloo), a train and a valid dataset, one report. Means over "
             f"fits 2..{results['fits']} of each set-up (the first pays one-off imports).", "",
             "| set-up | fit s | to train fn s | shard reads s | report to return s |",
             "|---|---|---|---|---|"]
    for setup, res in results["setups"].items():
        s = res["summary"]
        lines.append(f"| {setup} | {s['fit_s']} | {s['to_train_fn_s']} | {s['shards_s']} | "
                     f"{s['report_to_return_s']} |")
    own = results["setups"].get("own")
    if own:
        last = own["fits"][-1]
        lines += ["", "Processes the last `own` fit started (seconds after `fit()`: process start, "
                  "ready as its actor):", "", "| actor | started | ready |", "|---|---|---|"]
        for p in last["processes"]:
            lines.append(f"| {p['actor']} | {p['started_s']} | {p['ready_s']} |")
    lines += ["", "`own`: the cluster's processes know its address (`recsys.cluster.init_ray`). "
              "`wrong`: they are handed a dead cluster's address, as a stale "
              "`/tmp/ray/ray_current_cluster` did before that fix; Ray Train's placement-group "
              "cleaner then hangs on its state-API calls and `fit` waits for it at the end. "
              "One run on a shared 2-core machine: read the differences, not the seconds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--setups", default="own,wrong")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        (a.workdir / f"result-{a.child}.json").write_text(json.dumps(
            measure(a.child, a.fits, a.workdir)))
        return 0
    import tempfile

    results: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "fits": a.fits, "setups": {}}
    with tempfile.TemporaryDirectory(prefix="recsys-train-start-") as tmp:
        for setup in a.setups.split(","):
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            subprocess.run([sys.executable, __file__, "--child", setup, "--fits", str(a.fits),
                            "--workdir", tmp], env=env, cwd=REPO, check=True)
            res = json.loads((Path(tmp) / f"result-{setup}.json").read_text())
            res["summary"] = summary(res)
            results["setups"][setup] = res
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "train_start.json", results)
    (a.out / "train_start.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
