#!/usr/bin/env python
"""Benchmark: sweep throughput and the share of a sweep's wall time spent outside training.

Two kinds of sweep, both through ``run_sweep`` (the same code as ``recsys tune``), each in a
private Ray cluster with a private MLflow server, registry step included:

* the default, a fixed micro-sweep on a synthetic example set (3 shops; frozen text vectors from
  a random 1-layer BERT with MiniLM's tokenizer and width, so the one-off encoding takes
  seconds): pretraining on the 3 shops pooled, 4 trials of lr x dropout, ASHA; run in two layouts
  of the same 2 CPUs with the same global batch: ``sequential`` (one trial at a time, 2 DDP
  workers x 0.5 CPU) and ``concurrent`` (two single-worker trials at a time). Its trials train
  for well under a minute, so it shows the fixed cost per trial at its worst;
* ``--sweep FILE``: a shipped sweep file as users run it (e.g.
  ``tune/sweeps/scientific_scratch.yaml`` on the shared real data), with its own trials, epochs
  and early stopping.

Measured per layout:

* **trials per hour** = trials / ``Tuner.fit`` wall time x 3600 (and epochs per hour);
* **overhead share** = 1 - (sum over trials of the time inside the training loop) / (``Tuner.fit``
  wall time x concurrent trials), the share of trial-slot time not spent training. "Inside the
  loop" is the loop's own per-epoch ``epoch_seconds`` (train + validation, rank 0) summed over
  every epoch each trial ran. The rest is Ray/Tune/Train/MLflow: trial start-up, worker group and
  process group set-up, dataset splitting, checkpoint writes and reports, MLflow calls,
  teardown; the trials' wall-clock marks split it into phases. Target: < 15%.
* the driver's time after ``fit`` (result table, plot, export, registry) is reported apart.

Usage::

    python bench/tune.py             # scale 2.0, 6 epochs per trial, both layouts
    python bench/tune.py --layout concurrent
    python bench/tune.py --quick     # smoke: scale 0.3, 2 epochs
    python bench/tune.py --sweep tune/sweeps/scientific_scratch.yaml   # -> tune_<file stem>.*
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from common import (
    REPO,
    RESULTS,
    SYNTHETIC_PSEUDONYM_KEY,
    build_synthetic_examples,
    drop_ray_address,
    loadavg,
    no_progress_bars,
    package_versions,
    save_tiny_encoder,
    stderr_log,
    write_json,
)

if TYPE_CHECKING:
    from recsys.data.examples import ExampleSet
    from recsys.tuning.results import SweepOutcome

sys.path.insert(0, str(REPO))
TARGET = "shop_c"
OVERHEAD_TARGET = 0.15
log = stderr_log("tune-bench")


def machine() -> dict[str, Any]:
    """What ``tune.json`` records of the machine (the renderer reads these keys)."""
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(),
            **package_versions(("ray", "torch", "mlflow", "optuna"), missing="not installed")}


LAYOUTS = {
    # name: (concurrent trials, DDP workers per trial, CPUs per worker); same global batch (512)
    "sequential": (1, 2, 0.5),   # one trial at a time, data-parallel over both cores
    "concurrent": (2, 1, 0.9),   # two single-worker trials side by side
}
GLOBAL_BATCH = 512


def sweep_files(tmp: Path, es: ExampleSet, epochs: int, layout: str) -> Path:
    """The layout's base training config and sweep file under ``tmp``; the sweep's path."""
    concurrent, workers, cpus = LAYOUTS[layout]
    base = {
        "mode": "pretrain",  # all three shops: epochs long enough to measure against
        "data": {"examples": str(es.path), "sequences": {"max_seq_len": 50},
                 "text": es.manifest.config.text.model_dump(mode="json")},
        "model": {"dim": 64, "num_layers": 2, "num_heads": 2, "num_experts": 8},
        "optim": {"epochs": epochs, "micro_batch_size": GLOBAL_BATCH // workers,
                  "early_stopping_patience": 100},
        "encoder": {"cache_dir": str(tmp / "cache")},
        "scaling": {"engine": "ddp", "num_workers": workers, "cpus_per_worker": cpus,
                    "max_failures": 0},
        "tracking": {"experiment": "bench-tune"},
        "output_dir": str(tmp / "unused"),
    }
    (tmp / f"base-{layout}.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": f"bench-{layout}", "base_config": str(tmp / f"base-{layout}.yaml"),
        "search_space": {"optim.lr": {"kind": "loguniform", "low": 3e-4, "high": 3e-3},
                         "model.dropout": {"kind": "uniform", "low": 0.1, "high": 0.3}},
        "metric": {"name": "ndcg@10", "platform": None},  # mean over the shops
        "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
        "search": {"algorithm": "random", "seed": 0},
        "num_samples": 4, "max_concurrent_trials": concurrent,
        "resources": {"num_workers": workers, "cpus_per_worker": cpus},
        "registry": {"platform": TARGET, "model_name": f"bench-tune-{layout}-shop_c"},
        "experiment": "bench-tune", "output_dir": str(tmp / "tune"),
    }
    path = tmp / f"sweep-{layout}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def phase_breakdown(sweep_dir: Path, slot_seconds: float) -> dict[str, float]:
    """Split the sweep's trial-slot time (``Tuner.fit`` wall time x concurrent trials) into
    phases, from each trial's own wall-clock marks (trial_timeline.jsonl, trial_starts.jsonl and
    the per-epoch results). What no trial's marks cover (Tune scheduling, trial actor start,
    teardown, a slot idle while the other trial finishes) is the remainder."""
    from recsys.tuning.trial import STARTS_FILE, TIMELINE_FILE

    trials_dir = sweep_dir / "trials"
    marks: dict[str, dict[str, float]] = {}
    for name in (STARTS_FILE, TIMELINE_FILE):
        for line in (trials_dir / name).read_text().splitlines():
            rec = json.loads(line)
            marks.setdefault(rec["trial_id"], {})[rec.get("event", "start")] = rec["time"]
    epochs: dict[str, list[dict[str, float]]] = {}
    for path in (sweep_dir / "tune").glob("*/result.json"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "epoch_end_time" in rec:
                epochs.setdefault(rec["trial_id"], []).append(rec)
    keys = ["config, MLflow child run, build_trainer", "Train controller + worker group start",
            "worker setup (model, item tensors, shards)", "training loop",
            "between epochs (checkpoint, report)",
            "Train shutdown (last report to fit returning)"]
    phases = dict.fromkeys(keys, 0.0)
    for tid, m in marks.items():
        eps = sorted(epochs.get(tid, []), key=lambda r: r["epoch_end_time"])
        if not eps or "fit_start" not in m:
            continue
        first_epoch_start = eps[0]["epoch_end_time"] - eps[0]["epoch_seconds"]
        worker_entry = first_epoch_start - eps[0]["setup_seconds"]
        phases[keys[0]] += m["fit_start"] - m["start"]
        phases[keys[1]] += worker_entry - m["fit_start"]
        phases[keys[2]] += eps[0]["setup_seconds"]
        phases[keys[3]] += sum(r["epoch_seconds"] for r in eps)
        phases[keys[4]] += sum(b["epoch_end_time"] - b["epoch_seconds"] - a["epoch_end_time"]
                               for a, b in zip(eps, eps[1:]))
        if "fit_end" in m:
            phases[keys[5]] += m["fit_end"] - eps[-1]["epoch_end_time"]
    phases["Tune: scheduling, trial actor start, teardown (the rest)"] = (
        slot_seconds - sum(phases.values()))
    return {k: round(v, 1) for k, v in phases.items()}


def measure(out: SweepOutcome, concurrent: int, wall: float) -> dict[str, Any]:
    """The figures of one finished sweep (``run_sweep``'s outcome, ``wall``: the whole call)."""
    fit = out.fit_seconds
    loop = sum(r.loop_seconds for r in out.rows)
    slots = fit * concurrent
    epochs_run = sum(r.epochs for r in out.rows)
    return {
        "concurrent_trials": concurrent, "trials": len(out.rows), "epochs_run": epochs_run,
        "statuses": {s: sum(r.status == s for r in out.rows)
                     for s in ("completed", "early_stopped", "errored")},
        "fit_seconds": round(fit, 1), "slot_seconds": round(slots, 1),
        "loop_seconds": round(loop, 1),
        "overhead_share": round(1 - loop / slots, 4),
        "overhead_per_trial_seconds": round((slots - loop) / max(1, len(out.rows)), 1),
        "mean_trial_loop_seconds": round(loop / max(1, len(out.rows)), 1),
        "trials_per_hour": round(len(out.rows) / fit * 3600, 1),
        "epochs_per_hour": round(epochs_run / fit * 3600, 1),
        "after_fit_seconds": round(wall - fit, 1),
        "meets_target": 1 - loop / slots < OVERHEAD_TARGET,
        "registered": out.registered,
        "phases_seconds": phase_breakdown(out.sweep_dir, slots),
        "rows": [{"trial": r.trial_id, "status": r.status, "epochs": r.epochs,
                  "loop_seconds": round(r.loop_seconds, 1), "best_metric": r.best_metric,
                  "params": r.params} for r in out.rows],
    }


def run_layout(tmp: Path, es: ExampleSet, epochs: int, layout: str) -> dict[str, Any]:
    """The micro-sweep in one layout, measured."""
    from recsys.config import load_config
    from recsys.tuning.config import SweepConfig
    from recsys.tuning.sweep import run_sweep

    concurrent, workers, cpus = LAYOUTS[layout]
    path = sweep_files(tmp, es, epochs, layout)
    cfg = load_config(SweepConfig, path)
    log(f"{layout}: {concurrent} trial(s) at a time x {workers} worker(s) x {cpus} CPU")
    load0 = loadavg()
    t0 = time.perf_counter()
    out = run_sweep(cfg, str(path))
    return {"layout": layout, "workers_per_trial": workers, "cpus_per_worker": cpus,
            "micro_batch_size": GLOBAL_BATCH // workers, "loadavg_start": load0,
            "loadavg_end": loadavg(), **measure(out, concurrent, time.perf_counter() - t0)}


@contextlib.contextmanager
def private_stack(tmp: Path) -> Iterator[float]:
    """A private MLflow server and a private 2-CPU Ray cluster for the benchmark's sweeps;
    yields Ray's start-up seconds."""
    from recsys.cluster import init_ray
    from recsys.tracking.server import LocalMlflowServer

    drop_ray_address(log)  # a private local cluster, never another one on the machine
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", SYNTHETIC_PSEUDONYM_KEY.hex())
    server = LocalMlflowServer(tmp / "mlflow").start()
    os.environ["RECSYS_MLFLOW_TRACKING_URI"] = server.uri
    try:
        t0 = time.perf_counter()
        init_ray(num_cpus=2)
        no_progress_bars()
        yield time.perf_counter() - t0
    finally:
        import ray

        ray.shutdown()
        server.stop()


def run_shipped(path: Path, overrides: list[str]) -> dict[str, Any]:
    """A sweep file as users run it (``recsys tune --config PATH``), in a private stack: its
    own trials, epochs and early stopping, so the overhead share is that of a real sweep."""
    from recsys.config import load_config
    from recsys.tuning.config import SweepConfig
    from recsys.tuning.sweep import run_sweep

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as d, private_stack(Path(d)) as ray_s:
        cfg = load_config(SweepConfig, path, [*overrides, f"output_dir={d}/tune", "resume=false",
                                              f"registry.model_name=bench-tune-{path.stem}"])
        base = cfg.base_config
        log(f"{path}: {cfg.num_samples} trials, {cfg.max_concurrent_trials} at a time")
        load0 = loadavg()
        t0 = time.perf_counter()
        out = run_sweep(cfg, str(path))
        res = measure(out, cfg.max_concurrent_trials, time.perf_counter() - t0)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(), "sweep_file": str(path.relative_to(REPO)),
        "overrides": overrides, "base_config": base, "ray_start_seconds": round(ray_s, 1),
        "target_overhead_share": OVERHEAD_TARGET,
        "layouts": {cfg.name: {"layout": cfg.name, "loadavg_start": load0,
                               "loadavg_end": loadavg(),
                               "workers_per_trial": cfg.resources.num_workers,
                               "cpus_per_worker": cfg.resources.cpus_per_worker, **res}},
    }


def run(scale: float, epochs: int, layouts: list[str]) -> dict[str, Any]:
    """The micro-sweep on the synthetic world (``scale``) in each of ``layouts``."""
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as d, private_stack(Path(d)) as ray_s:
        tmp = Path(d)
        es = build_synthetic_examples(tmp, scale, save_tiny_encoder(tmp / "encoder"))
        counts = {p: c.train_rows for p, c in es.manifest.platforms.items()}
        results = {name: run_layout(tmp, es, epochs, name) for name in layouts}
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(), "scale": scale, "epochs_per_trial": epochs,
        "train_rows": counts, "ray_start_seconds": round(ray_s, 1),
        "target_overhead_share": OVERHEAD_TARGET, "layouts": results,
    }


def render(res: dict[str, Any]) -> str:
    """``tune*.md`` from what ``tune*.json`` records."""
    m = res["machine"]
    layouts = res["layouts"]
    if "sweep_file" in res:
        what = (f"The shipped sweep `{res['sweep_file']}` as `recsys tune` runs it (its own "
                f"trials, epochs, ASHA and early stopping; base `{res['base_config']}`"
                + (f", overrides {res['overrides']}" if res["overrides"] else "")
                + "), in a private Ray cluster and MLflow server, registry step included.")
    else:
        what = (f"A fixed micro-sweep: 4 trials (lr x dropout, random search, ASHA grace 2), "
                f"pretraining on 3 synthetic shops (x{res['scale']}, train rows "
                f"{res['train_rows']}), up to {res['epochs_per_trial']} epochs per trial, global "
                f"batch {GLOBAL_BATCH}, MLflow parent/child runs, registry step at the end; run in "
                "two layouts of the same 2 CPUs, in the same process.")
    lines = [
        "# Sweep benchmark (`bench/tune.py`)", "",
        f"{res['created']}; {m['cpus']} CPUs, Python {m['python']}, ray {m['ray']}, torch "
        f"{m['torch']}, mlflow {m['mlflow']}. One run.", "", what, "",
        "Overhead share = 1 - (sum over trials of the time inside the training loop) / "
        "(`Tuner.fit` wall time x concurrent trials): the share of trial-slot time not spent "
        "training (Ray/Tune/Train/MLflow). \"Inside the loop\" is the loop's own per-epoch "
        "`epoch_seconds` (train + validation). Target < "
        f"{100 * res['target_overhead_share']:.0f}%.", "",
        "| layout | trials at once x workers | trials/h | epochs/h | `fit` s | loop s | "
        "loop s per trial | overhead | overhead s per trial | target | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in layouts.items():
        per_trial_loop = r.get("mean_trial_loop_seconds",
                               round(r["loop_seconds"] / max(1, r["trials"]), 1))
        lines.append(
            f"| {name} | {r['concurrent_trials']} x {r['workers_per_trial']} "
            f"({r['cpus_per_worker']} CPU) | **{r['trials_per_hour']}** | {r['epochs_per_hour']} "
            f"| {r['fit_seconds']} | {r['loop_seconds']} | {per_trial_loop} "
            f"| **{100 * r['overhead_share']:.1f}%** | {r['overhead_per_trial_seconds']} "
            f"| {'met' if r['meets_target'] else 'NOT met'} | {r['statuses']} |")
    if {"sequential", "concurrent"} <= set(layouts):
        a, b = layouts["sequential"], layouts["concurrent"]
        gain = b["epochs_per_hour"] / a["epochs_per_hour"]
        lines += ["", f"Concurrent vs sequential in this run: **{gain:.2f}x** epochs per hour, "
                  f" {b['trials_per_hour'] / a['trials_per_hour']:.2f}x trials "
                  "per hour (ASHA may stop different trials at different points, so epochs/h "
                  "is the like-for-like figure)."]
    for name, r in layouts.items():
        lines += ["", f"## {name}: where the trial-slot time went ({r['slot_seconds']} s)", "",
                  "| phase | seconds | share |", "|---|---|---|",
                  *[f"| {k} | {v} | {100 * v / r['slot_seconds']:.1f}% |"
                    for k, v in r["phases_seconds"].items()], "",
                  "| trial | status | epochs | loop s | best valid NDCG@10 |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            metric = "-" if row["best_metric"] is None else f"{row['best_metric']:.4f}"
            lines.append(f"| {row['trial']} | {row['status']} | {row['epochs']} | "
                         f"{row['loop_seconds']} | {metric} |")
    lines += ["", "The overhead is mostly a fixed cost per trial (trial actor, Train controller "
              "and worker processes, process group, dataset shards), so its share is that cost "
              "over the mean trial's training time: it falls as trials train longer. Two "
              "single-worker trials side by side overlap one trial's start-up with the other's "
              "training and skip the all-reduce. ASHA's stop decisions differ from run to run "
              "(CPU training is not bit-identical), and with them the mean trial length and the "
              "overhead share; the seconds of overhead per trial are the figure that compares "
              "across runs and sweeps. One run: read the ratios, not the seconds."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: scale 0.3, 2 epochs")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    p.add_argument("--sweep", type=Path, help="run this sweep file instead of the micro-sweep")
    p.add_argument("overrides", nargs="*", help="dotted overrides of --sweep's file")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.sweep:
        res = run_shipped(a.sweep.resolve(), a.overrides)
        name = f"tune_{a.sweep.stem}"
    else:
        scale, epochs = (0.3, 2) if a.quick else (a.scale, a.epochs)
        res = run(scale, epochs, list(LAYOUTS) if a.layout == "both" else [a.layout])
        name = "tune_quick" if a.quick else "tune"
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"{name}.json", res)
    (a.out / f"{name}.md").write_text(render(res))
    for layout, r in res["layouts"].items():
        log(f"{layout}: trials/h {r['trials_per_hour']}, epochs/h {r['epochs_per_hour']}, "
            f"overhead {100 * r['overhead_share']:.1f}%")
    log(f"-> {a.out / name}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
