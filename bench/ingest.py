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
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform as pyplatform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
BENCH_KEY = "62656e63682d6b65792d6e6f742d7365637265742d2d2d2d2d2d2d2d2d2d2d21"  # fixed, public
SEED = 7
WARMUP_SCALE = 0.05
MB = 1024 * 1024
TARGET_RATIO = 0.5  # Ray pipeline >= 0.5x the single-process baseline on 2 cores


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$RECSYS_SHARED_DATA`` (as tests/conftest)."""
    return Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


# --------------------------------------------------------------------------------------------
# Resource monitor
# --------------------------------------------------------------------------------------------

RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # titled ray:: but not workers


def _is_ray_worker(cmdline: str) -> bool:
    """Task/actor worker processes (``ray::IDLE``, ``ray::MapBatches(...)``, Ray Data's
    ``ray::_StatsActor``...), by the process title Ray sets, or the worker script at start-up."""
    if cmdline.startswith(RAY_AGENTS):
        return False
    return cmdline.startswith("ray::") or "default_worker.py" in cmdline


class Monitor:
    """Samples RSS of this process and of its descendants (Ray workers vs Ray system processes)
    in a background thread; also CPU seconds of each group and of the whole machine."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self._stop = threading.Event()
        self._procs: dict[int, psutil.Process] = {}
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self.peak = {"driver": 0, "workers": 0, "system": 0, "driver_plus_workers": 0}
        self.samples = 0

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _scan(self, first: bool = False) -> tuple[int, int]:
        workers = system = 0
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            pid = child.pid
            proc = self._procs.setdefault(pid, child)
            try:
                with proc.oneshot():
                    cmd = " ".join(proc.cmdline())
                    rss = proc.memory_info().rss
                    cpu = self._cpu(proc)
            except psutil.Error:
                continue
            kind = "workers" if _is_ray_worker(cmd) else "system"
            self._kind[pid] = kind
            if first:
                self._cpu_start[pid] = cpu
            self._cpu_start.setdefault(pid, 0.0)  # born during the measurement
            self._cpu_last[pid] = cpu
            if kind == "workers":
                workers += rss
            else:
                system += rss
        return workers, system

    def _sample(self, first: bool = False) -> None:
        try:
            driver = self.me.memory_info().rss
        except psutil.Error:
            driver = 0
        workers, system = self._scan(first)
        pk = self.peak
        pk["driver"] = max(pk["driver"], driver)
        pk["workers"] = max(pk["workers"], workers)
        pk["system"] = max(pk["system"], system)
        pk["driver_plus_workers"] = max(pk["driver_plus_workers"], driver + workers)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Monitor:
        self.rss_start = self.me.memory_info().rss
        self.cpu_driver_start = self._cpu(self.me)
        self.sys_cpu_start = psutil.cpu_times()
        self._sample(first=True)
        self.workers_start = self.peak["workers"]
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu_driver = self._cpu(self.me) - self.cpu_driver_start
        by_kind = {"workers": 0.0, "system": 0.0}
        for pid, last in self._cpu_last.items():
            by_kind[self._kind[pid]] += max(0.0, last - self._cpu_start.get(pid, 0.0))
        end = psutil.cpu_times()
        busy = sum(getattr(end, f) - getattr(self.sys_cpu_start, f)
                   for f in ("user", "system", "nice", "irq", "softirq", "steal")
                   if hasattr(end, f))
        self.cpu = {"driver_s": round(cpu_driver, 3), "ray_workers_s": round(by_kind["workers"], 3),
                    "ray_system_s": round(by_kind["system"], 3),
                    "machine_busy_s": round(busy, 3),
                    "machine_cores": psutil.cpu_count()}
        own = cpu_driver + by_kind["workers"] + by_kind["system"]
        self.cpu["other_processes_s"] = round(max(0.0, busy - own), 3)

    def memory(self) -> dict[str, float]:
        out = {f"peak_{k}_mb": round(v / MB, 1) for k, v in self.peak.items()}
        out["driver_start_mb"] = round(self.rss_start / MB, 1)
        out["driver_growth_mb"] = round((self.peak["driver"] - self.rss_start) / MB, 1)
        out["workers_start_mb"] = round(self.workers_start / MB, 1)
        out["workers_growth_mb"] = round((self.peak["workers"] - self.workers_start) / MB, 1)
        out["samples"] = self.samples
        return out


def release_memory() -> None:
    """Give freed memory back to the OS before a measurement, so that the driver's RSS at the
    start reflects live data, not what earlier stages left in the allocators' caches."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], Any], interval: float) -> tuple[Any, float, dict[str, Any],
                                                                 dict[str, Any]]:
    release_memory()
    with Monitor(interval) as mon:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, mon.memory(), mon.cpu


# --------------------------------------------------------------------------------------------
# The three stages
# --------------------------------------------------------------------------------------------

def run_ingest(spec: dict[str, Any], lake: Path) -> dict[str, Any]:
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.pseudonym import Pseudonymizer, load_key

    opts = IngestOptions(out=lake, **spec["ingest"])
    written = ingest(opts, Pseudonymizer(load_key(create_if_missing=False)[0]))
    return {
        "events_in": sum(w.report["events"]["rows_in"] for w in written),
        "events": sum(w.report["events"]["rows_out"] for w in written),
        "platforms": {w.platform: {"events": w.report["events"]["rows_out"],
                                   "buckets": w.num_buckets,
                                   "catalog_items": w.report["catalog_items"],
                                   "users": w.report["users"]} for w in written},
    }


def run_generate(spec: dict[str, Any]) -> int:
    from recsys.data.ingest.synthetic import generate

    ing = spec["ingest"]
    frames = generate(ing.get("num_platforms", 3), ing["scale"], ing["seed"])
    return sum(len(ev) for ev, _ in frames.values())


def data_config(lake: Path, examples: Path, seq: dict[str, Any]) -> Any:
    from recsys.data.examples import DataConfig

    return DataConfig(lake=str(lake), examples=str(examples), sequences=seq, tokenize=False)


def run_ray_seq(lake: Path, examples: Path, seq: dict[str, Any]) -> dict[str, Any]:
    from recsys.data.examples import build_example_set

    return build_example_set(data_config(lake, examples, seq)).manifest


def _require_non_null(events: pa.Table, path: str) -> None:
    """The pipeline's check that required columns have no nulls (same cost, same message)."""
    from recsys.data.schema import EVENTS_SCHEMA

    for field in EVENTS_SCHEMA:
        if not field.nullable and events[field.name].null_count:
            raise ValueError(f"{path}: null values in required column {field.name!r}")


def count_rows(examples: pa.Table) -> dict[str, dict[str, Any]]:
    """Rows per platform and split, users, mean history: the pipeline manifest's counts."""
    from recsys.data.sequences import SPLITS

    counts: dict[str, dict[str, Any]] = {}
    for p in pc.unique(examples["platform"]).to_pylist():
        part = examples.filter(pc.equal(examples["platform"], p))
        c = {f"{s}_rows": int(pc.sum(pc.equal(part["split"], s)).as_py() or 0) for s in SPLITS}
        test = part.filter(pc.equal(part["split"], "test"))
        hist = int(pc.sum(pc.list_value_length(test["history"])).as_py() or 0)
        c["users"] = c["test_rows"]
        c["mean_history"] = round(hist / max(c["users"], 1), 2)
        counts[p] = c
    return counts


def run_base_seq(lake: Path, examples: Path, seq: dict[str, Any]) -> dict[str, Any]:
    """Single-process baseline: the pipeline's work with pyarrow + numpy, no Ray."""
    from recsys.data.catalog import build_catalog, unique_texts
    from recsys.data.lake import list_platforms, read_events, read_items, read_report
    from recsys.data.examples import input_fingerprint
    from recsys.data.sequences import SPLITS, build_examples, item_index

    cfg = data_config(lake, examples, seq)
    platforms = list_platforms(lake)
    (examples / "catalog").mkdir(parents=True)
    catalogs, tables = {}, []
    for p in platforms:
        items = read_items(lake, p)
        catalogs[p] = build_catalog(items, cfg.text.fields)
        pq.write_table(catalogs[p], examples / "catalog" / f"{p}.parquet")
        events = read_events(lake, p)  # every bucket file, schema-checked, concatenated
        _require_non_null(events, f"{lake}/{p}")
        table, _ = build_examples(events, item_index(items["item_id"]), cfg.sequences, p)
        tables.append(table)
    texts = unique_texts(list(catalogs.values()))
    examples_table = pa.concat_tables(tables)
    for split in SPLITS:
        (examples / split).mkdir()
        pq.write_table(examples_table.filter(pc.equal(examples_table["split"], split)),
                       examples / split / "part-00000.parquet")
    counts = count_rows(examples_table)
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "input_fingerprint": input_fingerprint(lake, platforms, cfg),
        "config": cfg.model_dump(mode="json"),
        "platforms": {p: {"catalog_items": catalogs[p].num_rows,
                          "lake_users": read_report(lake, p)["users"],
                          "users_too_short": read_report(lake, p)["users"]
                          - counts.get(p, {}).get("users", 0),
                          **counts.get(p, {})}
                      for p in platforms},
        "text": {"distinct_texts": texts.num_rows,
                 "catalog_rows": sum(c.num_rows for c in catalogs.values())},
    }
    (examples / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def checksum(examples: Path) -> dict[str, dict[str, int]]:
    """Per (platform, split): rows, sum of targets, sum of history lengths (read back)."""
    from recsys.data.sequences import EXAMPLES_SCHEMA, SPLITS

    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        files = sorted((examples / split).glob("*.parquet"))
        if not files:
            continue
        t = pa.concat_tables([pq.read_table(f, schema=EXAMPLES_SCHEMA) for f in files])
        for p in pc.unique(t["platform"]).to_pylist():
            part = t.filter(pc.equal(t["platform"], p))
            out[f"{p}/{split}"] = {
                "rows": part.num_rows,
                "target_sum": int(pc.sum(part["target"].cast(pa.int64())).as_py() or 0),
                "history_items": int(pc.sum(pc.list_value_length(part["history"])).as_py()
                                     or 0)}
    return dict(sorted(out.items()))


COMPARED = ("train_rows", "valid_rows", "test_rows", "users", "mean_history")


def split_rows(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest counts both implementations must agree on."""
    return {p: {k: c[k] for k in COMPARED if k in c}
            for p, c in sorted(manifest["platforms"].items())}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def datasets(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    if not args.no_retail:
        src = shared_data_dir() / "online_retail_uci" / "Online_Retail.parquet"
        if src.is_file():
            out.append({"name": "online-retail", "kind": "uci-online-retail",
                        "source_file": "online_retail_uci/Online_Retail.parquet",
                        "ingest": {"source": "uci-online-retail", "path": src,
                                   "platform": "or", "recipe": "unisrec-or"},
                        "repeats": args.repeats or 3})
        else:
            log(f"SKIP online-retail: {src.name} not found under the shared data dir "
                "(set RECSYS_SHARED_DATA or put ../shared/data beside the checkout)")
            out.append({"name": "online-retail", "skipped": "shared data absent"})
    for s in args.scales:
        out.append({"name": f"synthetic-x{s:g}", "kind": "synthetic", "scale": s,
                    "ingest": {"source": "synthetic", "scale": s, "seed": SEED},
                    "repeats": args.repeats or (3 if s <= 16 else 1)})
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def bench_dataset(spec: dict[str, Any], tmp: Path, seq: dict[str, Any], interval: float,
                  records: list[dict[str, Any]]) -> dict[str, Any]:
    name, reps = spec["name"], spec["repeats"]
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
               "memory": mem, "cpu": cpu, "loadavg": [round(x, 2) for x in os.getloadavg()]}
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
    if spec["kind"] == "synthetic":
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

    med = {k: median(v) for k, v in times.items() if v}
    summary: dict[str, Any] = {
        "dataset": name, "kind": spec["kind"], "repeats": reps, "events": events,
        "events_in": info["events_in"], "platforms": info["platforms"],
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "min_seconds": {k: round(min(v), 4) for k, v in times.items() if v},
        "events_per_s": {k: round(events / v, 1) for k, v in med.items()},
        "ratio_seq_ray_over_base": round(med["base_seq"] / med["ray_seq"], 3),
        "ratio_total_ray_over_base": round((med["ingest"] + med["base_seq"])
                                           / (med["ingest"] + med["ray_seq"]), 3),
        "total_events_per_s": {
            "ingest+ray_seq": round(events / (med["ingest"] + med["ray_seq"]), 1),
            "ingest+base_seq": round(events / (med["ingest"] + med["base_seq"]), 1)},
        "peak_mb": {
            "ingest_driver": max(m["peak_driver_mb"] for m in mems["ingest"]),
            "ray_seq_driver_plus_workers": max(m["peak_driver_plus_workers_mb"]
                                               for m in mems["ray_seq"]),
            "ray_seq_driver": max(m["peak_driver_mb"] for m in mems["ray_seq"]),
            "ray_seq_workers": max(m["peak_workers_mb"] for m in mems["ray_seq"]),
            "ray_seq_ray_system": max(m["peak_system_mb"] for m in mems["ray_seq"]),
            "base_seq_driver": max(m["peak_driver_mb"] for m in mems["base_seq"]),
            "growth_over_start": {  # peak minus RSS at the start of the measurement
                "ingest_driver": max(m["driver_growth_mb"] for m in mems["ingest"]),
                "ray_seq_driver": max(m["driver_growth_mb"] for m in mems["ray_seq"]),
                "ray_seq_workers": max(m["workers_growth_mb"] for m in mems["ray_seq"]),
                "base_seq_driver": max(m["driver_growth_mb"] for m in mems["base_seq"]),
            },
        },
        "median_cpu_s": {k: {f: round(median([c[f] for c in v]), 3) for f in v[0]
                             if f != "machine_cores"} for k, v in cpus.items() if v},
        # load-robust view: events per CPU-second of this benchmark's own processes
        "events_per_own_cpu_s": {
            k: round(events / max(median([c["driver_s"] + c["ray_workers_s"] + c["ray_system_s"]
                                          for c in v]), 1e-9), 1)
            for k, v in cpus.items() if v and k != "generate"},
        "split_rows": ray_counts,
        "checksums_equal": True,
    }
    if "generated_rows" in info:
        summary["generated_rows"] = info["generated_rows"]
        summary["events_per_s"]["ingest_excl_generate"] = round(
            events / max(med["ingest"] - med["generate"], 1e-9), 1)
    return summary


def linearity(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    syn = sorted((s for s in summaries if s.get("kind") == "synthetic"), key=lambda s: s["events"])
    if len(syn) < 2:
        return {"note": "needs at least two synthetic scales"}
    n = np.array([s["events"] for s in syn], float)
    lo, hi = syn[0], syn[-1]
    nominal = hi["dataset"].split("-x")[1] + "/" + lo["dataset"].split("-x")[1]
    scale_ratio = float(hi["dataset"].split("-x")[1]) / float(lo["dataset"].split("-x")[1])
    out: dict[str, Any] = {"datasets": [s["dataset"] for s in syn],
                           "events": n.astype(int).tolist(),
                           "scale_ratio": f"x{nominal} = {scale_ratio:g}",
                           "event_ratio": round(float(n[-1] / n[0]), 3), "stages": {}}
    for stage in ("ingest", "generate", "ray_seq", "base_seq"):
        t = np.array([s["median_seconds"][stage] for s in syn], float)
        b, a = np.polyfit(n / 1e6, t, 1)  # t = a + b * Mev
        pred = a + b * n / 1e6
        ss = float(((t - t.mean()) ** 2).sum())
        r2 = 1 - float(((t - pred) ** 2).sum()) / ss if ss > 0 else 1.0
        out["stages"][stage] = {
            "seconds_per_million_events": {s["dataset"]: round(ti / (ni / 1e6), 3)
                                           for s, ti, ni in zip(syn, t, n)},
            "time_ratio_over_scale_ratio": round(float(t[-1] / t[0]) / scale_ratio, 3),
            "time_ratio_over_event_ratio": round(float(t[-1] / t[0]) / float(n[-1] / n[0]), 3),
            "fit_fixed_seconds": round(float(a), 3),
            "fit_seconds_per_million_events": round(float(b), 3),
            "fit_r2": round(r2, 4),
        }
        r = out["stages"][stage]["time_ratio_over_scale_ratio"]
        out["stages"][stage]["verdict"] = (
            "sub-linear: fixed cost amortised" if r < 0.75 else
            "linear" if r <= 1.25 else "super-linear")
    return out


def machine_info() -> dict[str, Any]:
    import pandas
    import ray

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_model": _cpu_model(),
        "memory_total_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": pyplatform.python_version(),
        "platform": pyplatform.platform(),
        "versions": {"ray": ray.__version__, "pyarrow": pa.__version__,
                     "pandas": pandas.__version__, "numpy": np.__version__,
                     "psutil": psutil.__version__},
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    rows = []
    for s in result["datasets"]:
        if "skipped" in s:
            rows.append(f"| {s['dataset']} | skipped: {s['skipped']} | | | | | | | |")
            continue
        e, pk = s["events_per_s"], s["peak_mb"]
        rows.append(
            f"| {s['dataset']} | {s['events']:,} | {e['ingest']:,.0f} | {e['ray_seq']:,.0f} | "
            f"{e['base_seq']:,.0f} | {s['ratio_seq_ray_over_base']:.2f} | "
            f"{s['ratio_total_ray_over_base']:.2f} | {pk['ingest_driver']:,.0f} | "
            f"{pk['ray_seq_driver_plus_workers']:,.0f} / {pk['base_seq_driver']:,.0f} |")
    m = result["machine"]
    lin = result["linearity"]
    lines = [
        "# Ingest and sequence-building benchmark",
        "",
        f"{m['date']}, {m['cpu_count_logical']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"Ray {m['versions']['ray']}, pyarrow {m['versions']['pyarrow']}; local Ray with "
        f"`init_ray(num_cpus=2)`; load average at start/end "
        f"{result['loadavg_start'][0]:.2f} / {result['loadavg_end'][0]:.2f} (other work was "
        "running; see `cpu.other_processes_s` in the JSON). Medians of "
        f"{', '.join(sorted({str(s['repeats']) for s in result['datasets'] if 'repeats' in s}))}"
        " repeat(s).",
        "",
        "Events = lake events (after quarantine/filters). ray seq = `build_example_set` "
        "(tokenize off); baseline seq = same `build_examples` on each whole platform table in "
        "one process (pyarrow/numpy, no Ray). Ratio = Ray throughput / baseline throughput "
        "(seq: stage 2 alone; total: ingest + stage 2). Peak MB: RSS of the driver (ingest, "
        "baseline) or driver + Ray workers sampled together (Ray system processes excluded).",
        "",
        "| dataset | events | ingest ev/s | ray seq ev/s | baseline seq ev/s | ratio seq | "
        "ratio total | peak MB ingest | peak MB seq ray / base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    if "stages" in lin:
        def per_m(stage: str) -> str:
            d = lin["stages"][stage]
            spm = ", ".join(f"{k.split('-x')[1]}x {v:.2f}"
                            for k, v in d["seconds_per_million_events"].items())
            ratio = lin["scale_ratio"].split("= ")[1]
            return (f"{stage}: s per M events {spm}; (t_hi/t_lo)/{ratio} = "
                    f"{d['time_ratio_over_scale_ratio']:.2f}; fit {d['fit_fixed_seconds']:.2f} s"
                    f" + {d['fit_seconds_per_million_events']:.2f} s/M ev: {d['verdict']}")
        lines += ["Linearity (synthetic, " + lin["scale_ratio"] + " in scale, "
                  f"{lin['event_ratio']:.2f}x in events):", ""]
        lines += [f"- {per_m(st)}" for st in ("ingest", "ray_seq", "base_seq")]
        lines.append("")
    tgt = result["target"]
    lines.append(f"Target Ray seq >= {TARGET_RATIO}x baseline on 2 cores: "
                 f"**{'met' if tgt['met'] else 'NOT met'}** "
                 f"({', '.join(f'{k} {v:.2f}' for k, v in tgt['ratios'].items())}).")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 4, 16],
                    help="synthetic scales (1.0 ~ 60k events)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per stage (default: 3, or 1 for scales > 16); median")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                    help="directory for ingest.json and ingest.md")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: scales 0.25 1, one repeat")
    ap.add_argument("--no-retail", action="store_true", help="skip the Online Retail dataset")
    ap.add_argument("--sample-interval", type=float, default=0.1,
                    help="memory sampling period in seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.scales, args.repeats = [0.25, 1], 1

    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", BENCH_KEY)  # never create a key file
    for var in ("RAY_ADDRESS", "RECSYS_RAY_ADDRESS"):  # always a private 2-CPU local cluster
        if os.environ.pop(var, None):
            log(f"ignoring ${var}: the benchmark starts its own local Ray")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import ray

    from recsys.cluster import init_ray
    from recsys.data.sequences import SequenceConfig

    seq = SequenceConfig().model_dump()
    info = machine_info()
    load_start = os.getloadavg()
    log(f"{info['cpu_count_logical']} CPUs, Ray {info['versions']['ray']}, "
        f"load {load_start[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-"))
    records: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        init_ray(num_cpus=2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_init_s = time.perf_counter() - t0
        # Warm-up (untimed): worker start-up, imports in workers, first Ray Data execution.
        t0 = time.perf_counter()
        warm = tmp / "warmup"
        run_ingest({"ingest": {"source": "synthetic", "scale": WARMUP_SCALE, "seed": SEED}},
                   warm / "lake")
        run_ray_seq(warm / "lake", warm / "ex-ray", seq)
        run_base_seq(warm / "lake", warm / "ex-base", seq)
        shutil.rmtree(warm)
        warmup_s = time.perf_counter() - t0
        log(f"ray.init {ray_init_s:.1f} s, warm-up {warmup_s:.1f} s")
        for spec in datasets(args):
            if "skipped" in spec:
                summaries.append({"dataset": spec["name"], "skipped": spec["skipped"]})
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
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / "ingest.md", result)
    log(f"wrote {args.out / 'ingest.json'} and {args.out / 'ingest.md'} "
        f"in {result['total_seconds']:.0f} s")
    print((args.out / "ingest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
