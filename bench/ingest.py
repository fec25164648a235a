#!/usr/bin/env python
"""Benchmark: ingest (source -> lake) and sequence building, Ray Data pipeline vs plain Python.

Per dataset (UCI Online Retail under the ``unisrec-or`` recipe, when the shared data is present,
and the synthetic world at several scales) three stages are timed:

1. ``ingest``    -- ``recsys.data.ingest.runner.ingest``: source -> canonical lake (for synthetic
   this includes generating the world; generation alone is timed too, as ``generate``);
2. ``ray_seq``   -- ``recsys.data.examples.build_example_set`` on a private local Ray started
   with ``init_ray(num_cpus=2)``: one Ray Data task per (platform, bucket file), materialise,
   one ``write_parquet`` per split, catalogs and manifest;
3. ``base_seq``  -- the same work in one process with pyarrow/numpy only: read every event file
   of a platform, build its catalog and item index, run the *same* ``build_examples`` on the whole
   platform table, write train/valid/test Parquet, catalogs and manifest.

Both sequence stages use the same ``SequenceConfig`` and ``tokenize=False``, and the row counts
per (platform, split) -- plus target and history-length checksums -- are asserted equal.

Throughput is lake events per second (rows written by ingest, i.e. after quarantine, filters and
k-core) for every stage, so the numbers of one dataset are comparable. Memory is the peak RSS,
sampled by a background thread: of this (driver) process, and for Ray also the sum over this
process's descendant Ray *workers* (process title ``ray::...``: idle and task workers and Ray
Data's own actors, or ``default_worker.py`` while starting), taken at the same instant; Ray's
system processes (raylet, GCS, dashboard, its agents) are reported separately, not included.
RSS sums over-count pages shared between processes (shared libraries, the /dev/shm object
store).

Usage::

    python bench/ingest.py                      # OR + synthetic x1, x4, x16
    python bench/ingest.py --quick              # smoke: OR + synthetic x0.25, x1, 1 repeat
    python bench/ingest.py --scales 1 4 --repeats 5 --out bench/results

The stages are in ``ingest_stages.py``, the linearity fit and the Markdown in
``ingest_report.py``, the memory sampler (``RayMemoryMonitor``) in ``common.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from common import (
    REPO,
    RESULTS,
    SEED,
    RayMemoryMonitor,
    drop_ray_address,
    loadavg,
    machine_info,
    no_progress_bars,
    save_results,
    stderr_log,
)
from ingest_report import TARGET_RATIO, dataset_summary, linearity, write_markdown
from ingest_stages import (
    DatasetSpec,
    checksum,
    run_base_seq,
    run_generate,
    run_ingest,
    run_ray_seq,
    split_rows,
)

BENCH_KEY = "62656e63682d6b65792d6e6f742d7365637265742d2d2d2d2d2d2d2d2d2d2d21"  # fixed, public
WARMUP_SCALE = 0.05

log = stderr_log("bench")


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$RECSYS_SHARED_DATA`` (as tests/conftest)."""
    return Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------

def release_memory() -> None:
    """Give freed memory back to the OS before a measurement, so that the driver's RSS at the
    start reflects live data, not what earlier stages left in the allocators' caches."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, RSS is then less exact
        return


def measure(fn: Callable[[], Any], interval: float) -> tuple[Any, float, dict[str, Any],
                                                                 dict[str, Any]]:
    """``fn()``'s result, its seconds, and the monitor's memory and CPU figures."""
    release_memory()
    with RayMemoryMonitor(interval) as mon:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, mon.memory(), mon.cpu


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def datasets(args: argparse.Namespace) -> list[DatasetSpec]:
    """Online Retail (when the shared data is there) and the synthetic world per scale."""
    out = []
    if not args.no_retail:
        src = shared_data_dir() / "online_retail_uci" / "Online_Retail.parquet"
        if src.is_file():
            out.append(DatasetSpec(name="online-retail", kind="uci-online-retail",
                                   ingest={"source": "uci-online-retail", "path": src,
                                           "platform": "or", "recipe": "unisrec-or"},
                                   repeats=args.repeats or 3))
        else:
            log(f"SKIP online-retail: {src.name} not found under the shared data dir "
                "(set RECSYS_SHARED_DATA or put ../shared/data beside the checkout)")
            out.append(DatasetSpec(name="online-retail", skipped="shared data absent"))
    for s in args.scales:
        out.append(DatasetSpec(name=f"synthetic-x{s:g}", kind="synthetic",
                               ingest={"source": "synthetic", "scale": s, "seed": SEED},
                               repeats=args.repeats or (3 if s <= 16 else 1)))
    return out


def bench_dataset(spec: DatasetSpec, tmp: Path, seq: dict[str, Any], interval: float,
                  records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every stage of one dataset ``spec.repeats`` times (each measurement appended to
    ``records``); the dataset's summary for ``ingest.json``. Asserts that the Ray pipeline and
    the baseline wrote the same rows."""
    name, reps = spec.name, spec.repeats
    root = tmp / name
    root.mkdir()
    times: dict[str, list[float]] = {"ingest": [], "ray_seq": [], "base_seq": [], "generate": []}
    mems: dict[str, list[dict[str, Any]]] = {k: [] for k in times}
    cpus: dict[str, list[dict[str, Any]]] = {k: [] for k in times}
    lake = root / "lake-0"
    info: dict[str, Any] = {}

    def record(stage: str, rep: int, seconds: float, events: int, mem: dict[str, Any],
               cpu: dict[str, Any]) -> None:
        times[stage].append(seconds)
        mems[stage].append(mem)
        cpus[stage].append(cpu)
        rec = {"dataset": name, "stage": stage, "repeat": rep, "seconds": round(seconds, 4),
               "events": events, "events_per_s": round(events / seconds, 1),
               "memory": mem, "cpu": cpu, "loadavg": loadavg()}
        records.append(rec)
        peak = mem["peak_driver_plus_workers_mb"] if stage == "ray_seq" else \
            mem["peak_driver_mb"]
        log(f"{name:<18} {stage:<8} rep {rep + 1}/{reps}: {events:,} ev in {seconds:7.2f} s "
            f"= {events / seconds:>11,.0f} ev/s, peak {peak:,.0f} MB, "
            f"load {os.getloadavg()[0]:.2f}")

    # 1. ingest, into a fresh lake each time (the last one is kept for stage 2/3)
    for rep in range(reps):
        lake = root / f"lake-{rep}"
        res, sec, mem, cpu = measure(lambda lake=lake: run_ingest(spec, lake), interval)
        info = res
        record("ingest", rep, sec, res["events"], mem, cpu)
        if rep:
            shutil.rmtree(root / f"lake-{rep - 1}")
    events = info["events"]
    if spec.kind == "synthetic":
        for rep in range(reps):
            n, sec, mem, cpu = measure(lambda: run_generate(spec), interval)
            record("generate", rep, sec, events, mem, cpu)
            info["generated_rows"] = n

    # 2 + 3. Ray pipeline and baseline, alternating which goes first (spreads drift and noise)
    ray_counts = base_counts = None
    for rep in range(reps):
        order = ("ray_seq", "base_seq") if rep % 2 == 0 else ("base_seq", "ray_seq")
        for stage in order:
            out = root / f"{stage}-{rep}" / "examples"
            out.parent.mkdir()
            fn = run_ray_seq if stage == "ray_seq" else run_base_seq
            manifest, sec, mem, cpu = measure(lambda fn=fn, out=out: fn(lake, out, seq), interval)
            record(stage, rep, sec, events, mem, cpu)
            counts = split_rows(manifest)
            if rep == 0:  # read back both outputs once, outside the timed region
                check = checksum(out)
                if stage == "ray_seq":
                    ray_counts, ray_check = counts, check
                else:
                    base_counts, base_check = counts, check
            shutil.rmtree(out.parent)
    assert ray_counts == base_counts, f"{name}: split rows differ: {ray_counts} != {base_counts}"
    assert ray_check == base_check, f"{name}: checksums differ: {ray_check} != {base_check}"
    for p, c in ray_counts.items():  # manifest counts == rows actually on disk
        for split in ("train", "valid", "test"):
            on_disk = ray_check.get(f"{p}/{split}", {}).get("rows", 0)
            assert c.get(f"{split}_rows", 0) == on_disk, (name, p, split)
    shutil.rmtree(root)

    return dataset_summary(spec, info, times, mems, cpus, ray_counts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 4, 16],
                    help="synthetic scales (1.0 ~ 60k events)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per stage (default: 3, or 1 for scales > 16); median")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="directory for ingest.json and ingest.md")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: scales 0.25 1, one repeat")
    ap.add_argument("--no-retail", action="store_true", help="skip the Online Retail dataset")
    ap.add_argument("--sample-interval", type=float, default=0.1,
                    help="memory sampling period in seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.scales, args.repeats = [0.25, 1], 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", BENCH_KEY)  # never create a key file
    drop_ray_address(log)  # always a private 2-CPU local cluster
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import ray

    from recsys.cluster import init_ray
    from recsys.data.sequences import SequenceConfig

    seq = SequenceConfig().model_dump()
    info = machine_info(("ray", "pyarrow", "pandas", "numpy", "psutil"))
    load_start = loadavg()
    log(f"{info['cpu_count_logical']} CPUs, Ray {info['versions']['ray']}, "
        f"load {load_start[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-"))
    records: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        init_ray(num_cpus=2)
        no_progress_bars()
        ray_init_s = time.perf_counter() - t0
        # Warm-up (untimed): worker start-up, imports in workers, first Ray Data execution.
        t0 = time.perf_counter()
        warm = tmp / "warmup"
        run_ingest(DatasetSpec(name="warm-up", kind="synthetic", ingest={
            "source": "synthetic", "scale": WARMUP_SCALE, "seed": SEED}), warm / "lake")
        run_ray_seq(warm / "lake", warm / "ex-ray", seq)
        run_base_seq(warm / "lake", warm / "ex-base", seq)
        shutil.rmtree(warm)
        warmup_s = time.perf_counter() - t0
        log(f"ray.init {ray_init_s:.1f} s, warm-up {warmup_s:.1f} s")
        for spec in datasets(args):
            if spec.skipped:
                summaries.append({"dataset": spec.name, "skipped": spec.skipped})
                continue
            summaries.append(bench_dataset(spec, tmp, seq, args.sample_interval, records))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()

    done = [s for s in summaries if "skipped" not in s]
    ratios = {s["dataset"]: s["ratio_seq_ray_over_base"] for s in done}
    result = {
        "benchmark": "bench/ingest.py",
        "machine": info,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "out"},
        "ray": {"init": "recsys.cluster.init_ray(num_cpus=2)", "init_seconds": round(ray_init_s, 2),
                "warmup_seconds": round(warmup_s, 2), "warmup_scale": WARMUP_SCALE,
                "progress_bars": False},
        "sequence_config": seq,
        "tokenize": False,
        "baseline": "same recsys.data.sequences.build_examples on each whole platform table, "
                    "single process, pyarrow + numpy (no pandas, no Ray); one Parquet file per "
                    "split",
        "measured": {
            "events": "lake events (ingest rows_out summed over platforms); every stage's "
                      "events_per_s uses this count",
            "memory": ("peak RSS sampled every --sample-interval s by a thread: driver = this "
                       "process; workers = sum over descendant processes titled 'ray::...' "
                       "(task/idle workers, Ray Data actors; not ray::DashboardAgent or "
                       "ray::RuntimeEnvAgent) or running default_worker.py; system = other "
                       "descendants (raylet, GCS, dashboard, agents); driver_plus_workers is "
                       "sampled at one instant. RSS sums count shared pages (libraries, "
                       "/dev/shm object store) once per process. Before each measurement: "
                       "gc, Arrow pool release_unused, malloc_trim"),
            "cpu": "CPU seconds (user+system) during the measurement: driver, Ray workers, "
                   "Ray system processes, whole machine, and the rest (other_processes_s = "
                   "load from other work on the machine)",
        },
        "datasets": summaries,
        "linearity": linearity(done),
        "target": {"rule": f"ray_seq events/s >= {TARGET_RATIO} x base_seq events/s",
                   "ratios": ratios, "met": bool(ratios) and min(ratios.values()) >= TARGET_RATIO},
        "total_seconds": round(time.perf_counter() - started, 1),
        "measurements": records,
    }
    save_results(args.out, "ingest", result, write_markdown, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
