"""``bench/train_speed.py``, parts 1b-3: Ray Train runs of the benchmark's job, instrumented.

``ray_run`` fits ``build_trainer(cfg)`` with ``_probed_loop`` as the workers' function and a
metrics sink in the controller. Ray pickles ``_probed_loop`` by reference: its workers import
this module from ``bench/``, which Ray puts on their path because the driver script lives there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import loadavg, stderr_log
from train_speed_plain import summarise_epochs

if TYPE_CHECKING:
    from ray.train import UserCallback

    from recsys.training.config import TrainJobConfig
    from recsys.training.trainer import TrainSetup

log = stderr_log("train_speed")


def _probed_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` preceded by a record of the worker's thread settings (read in
    the worker that then trains), with the training epochs' CPU time recorded: the loop imports
    ``iter_batches`` from ``recsys.data.feed`` when it starts, so a wrapper put there notes the
    worker process's CPU seconds (all its threads: Ray Data prefetching included) from the first
    batch request to the end of each training epoch's batches. Timing is unchanged."""
    import ray.train
    import torch

    import recsys.data.feed as feed
    from recsys.training.loop import train_loop_per_worker

    probe = config.get("_bench_probe")
    if probe:
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        original = feed.iter_batches
        epoch = {"i": 0}

        def timed_iter_batches(shard: Any, batch_size: int, max_len: int, **kw: Any) -> Any:
            if not kw.get("shuffle_buffer"):  # evaluation: not timed
                yield from original(shard, batch_size, max_len, **kw)
                return
            c0, w0, n = time.process_time(), time.perf_counter(), 0
            for b in original(shard, batch_size, max_len, **kw):
                n += len(b["target"])
                yield b
            rec = {"kind": "epoch", "rank": rank, "epoch": epoch["i"], "sequences": n,
                   "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}
            epoch["i"] += 1
            with open(probe, "a") as f:
                f.write(json.dumps(rec) + "\n")

        feed.iter_batches = timed_iter_batches
        info = {"kind": "threads", "rank": rank, "pid": os.getpid(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "torch_num_threads": torch.get_num_threads(),
                "torch_num_interop_threads": torch.get_num_interop_threads(),
                "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "cpu_affinity": sorted(os.sched_getaffinity(0))}
        with open(probe, "a") as f:
            f.write(json.dumps(info) + "\n")
    train_loop_per_worker(config)


def _metrics_sink(path: str) -> UserCallback:
    """A ``ray.train.UserCallback`` (runs in the Ray Train controller) that appends every
    report's per-worker metrics to a JSON-lines file."""
    from ray.train import UserCallback

    class MetricsSink(UserCallback):
        def __init__(self, out: str) -> None:
            self.out = out

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            clean = [{k: v for k, v in m.items() if isinstance(v, (int, float, str))}
                     for m in metrics]
            with open(self.out, "a") as f:
                f.write(json.dumps({"time": time.time(), "metrics": clean}) + "\n")

    return MetricsSink(path)


def ray_run(cfg: TrainJobConfig, setup: TrainSetup, tmp: Path) -> dict[str, Any]:
    """One ``build_trainer(cfg)`` fit with the probed loop and the metrics sink; its per-epoch
    figures (rank 0's, the loop's own), the workers' thread settings, or the error."""
    from recsys.training.trainer import build_trainer

    sink = tmp / f"{cfg.name}.metrics.jsonl"
    probe = tmp / f"{cfg.name}.threads.jsonl"
    trainer = build_trainer(cfg, setup)
    trainer.train_loop_per_worker = _probed_loop
    trainer.train_loop_config["_bench_probe"] = str(probe)
    trainer.run_config.callbacks.append(_metrics_sink(str(sink)))
    t0 = time.perf_counter()
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # record and go on with the other measurements
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"  {cfg.name} FAILED: {error[:300]}")
    fit_s = time.perf_counter() - t0
    reports = ([json.loads(x) for x in sink.read_text().splitlines()] if sink.exists() else [])
    lines = ([json.loads(x) for x in probe.read_text().splitlines()] if probe.exists() else [])
    threads = [x for x in lines if x.get("kind") == "threads"]
    cpu = [x for x in lines if x.get("kind") == "epoch"]
    epochs = []
    for r in reports:
        m0 = r["metrics"][0]  # rank 0: the loop's printed/logged value (seen summed over ranks)
        mine = [x for x in cpu if x["epoch"] == int(m0["epoch"])]
        extra = ({"worker_cpu_seconds": round(sum(x["cpu_s"] for x in mine), 3),
                  "sequences_per_cpu_s": (sum(x["sequences"] for x in mine)
                                          / sum(x["cpu_s"] for x in mine))}
                 if mine and sum(x["cpu_s"] for x in mine) > 0 else {})
        epochs.append({**extra,
            "epoch": int(m0["epoch"]),
            "sequences": round(m0["sequences_per_s"] * m0["train_seconds"]),
            "train_seconds": round(m0["train_seconds"], 3),
            "sequences_per_s": m0["sequences_per_s"],
            "train_seconds_by_rank": [round(m["train_seconds"], 3) for m in r["metrics"]],
            "train_loss": m0.get("train_loss"), "valid_ndcg@10": m0.get("valid_ndcg@10"),
        })
        log(f"  {cfg.name} epoch {epochs[-1]['epoch']}: {m0['sequences_per_s']:,.0f} seq/s "
            f"(train {m0['train_seconds']:.1f} s, load {loadavg()[0]})")
    return {"name": cfg.name, "engine": cfg.scaling.engine,
            "num_workers": cfg.scaling.num_workers,
            "cpus_per_worker": cfg.scaling.cpus_per_worker,
            "worker_threads": threads, "fit_seconds": round(fit_s, 1), "error": error,
            "epochs": epochs, **summarise_epochs(epochs)}
