#!/usr/bin/env python
"""Benchmark: each stage's time and peak memory against events, items and platforms, with fits.

Three axes, each a series of measurements of the stages whose cost it drives (issue 24):

- ``events``: ingest of a synthetic generic event log written to files, streaming (bounded
  memory) and in memory (``bench/ingest_stream.py``), then the sequence build
  (``build_example_set``, Ray Data) on the streamed lake;
- ``items``: top-k at serve time, exact and with the faiss index (``bench/scale_serving.py``),
  full-ranking evaluation whole and chunked (``bench/scale_eval.py``), one training step with
  full and sampled softmax (``bench/scale_train.py``);
- ``platforms``: ingest and sequence build of the synthetic world split over 1..N platforms at
  a fixed total of events (so a trend is the platforms' own cost, not more data).

Each (stage, axis) series gets a power-law fit ``y = a * x^b`` (least squares in log-log; b ~ 0
flat, ~1 linear) and a linear fit ``y = c + d * x``, so the cost at other sizes can be read off.
Peak memory is the peak RSS of a fresh process per measurement (ingest), of the driver plus its
Ray workers (sequence build), or of the bench process (items: the sub-benches' own figures).

    .venv/bin/python bench/scale.py                              # every axis, full sizes
    .venv/bin/python bench/scale.py --parts items --items 10000 100000
    .venv/bin/python bench/scale.py --quick                      # small sizes: a smoke run

Writes bench/results/scale.{json,md}. Absolute seconds on this 2-core CPU machine only mean
something next to each other in one run; the slopes and the memory columns are the point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MB,
    RESULTS,
    SYNTHETIC_PSEUDONYM_KEY,
    Log,
    RayMemoryMonitor,
    fmt,
    loadavg,
    machine_info,
    save_results,
    start_private_ray,
    stderr_log,
)

log = stderr_log("scale")
PARTS = ("events", "items", "platforms")
EVENT_SIZES = (1_000_000, 10_000_000, 50_000_000)
SEQ_MAX_EVENTS = 10_000_000  # the sequence build is measured up to here (see events_axis)
ITEM_SIZES = (10_000, 100_000, 1_000_000)
PLATFORM_COUNTS = (1, 3, 9, 18)
PLATFORM_TOTAL_SCALE = 18.0  # synthetic scale summed over platforms (~360k events in all)
SEQ = {"max_seq_len": 50}


# -- fits ------------------------------------------------------------------------------------------

def fit(xs: Sequence[float], ys: Sequence[float | None]) -> dict[str, Any] | None:
    """Power-law exponent (log-log least squares) and linear fit of ``ys`` against ``xs``;
    None with fewer than two measured points. ``shape`` names the exponent in words."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    d, c = np.polyfit(x, y, 1)
    shape = ("flat" if b < 0.2 else "sub-linear" if b < 0.8 else "linear" if b < 1.25
             else "super-linear")
    return {"exponent": round(float(b), 3), "coefficient": float(f"{math.exp(log_a):.4g}"),
            "intercept": float(f"{c:.4g}"), "slope": float(f"{d:.4g}"), "shape": shape,
            "points": len(pts)}


def series(stage: str, axis: str, unit: str, xs: Sequence[int],
           seconds: Sequence[float | None], peak_mb: Sequence[float | None],
           note: str = "") -> dict[str, Any]:
    """One stage's measurements along one axis, with both fits."""
    return {"stage": stage, "axis": axis, "unit": unit, "x": list(xs),
            "seconds": list(seconds), "peak_mb": list(peak_mb),
            "fit_seconds": fit(xs, seconds), "fit_peak_mb": fit(xs, peak_mb), "note": note}


# -- a fresh process per ingest (its peak RSS is its own) ----------------------------------------

class RssSampler:
    """Peak RSS of this process while a ``with`` block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.me = interval, psutil.Process()
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.me.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.me.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.me.memory_info().rss)


def run_child(args: list[str], log: Log) -> dict[str, Any]:
    """``bench/scale.py --child ...`` in a fresh interpreter; its one JSON line back."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        raise RuntimeError(f"child {args} exited {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    """``--child synthetic-ingest LAKE PLATFORMS SCALE``: ingest the synthetic world, print
    seconds, events and peak RSS; ``--child seq LAKE EXAMPLES``: the sequence build on a private
    Ray, print seconds and the driver + workers peak."""
    kind, *rest = argv
    if kind == "synthetic-ingest":
        lake, platforms, scale = Path(rest[0]), int(rest[1]), float(rest[2])
        from recsys.data.ingest.runner import IngestOptions, ingest
        from recsys.data.pseudonym import Pseudonymizer

        # The imports' own peak can exceed the ingest's: sample RSS while it runs instead.
        with RssSampler() as rss:
            t0 = time.perf_counter()
            written = ingest(IngestOptions(source="synthetic", out=lake,
                                           num_platforms=platforms, scale=scale, seed=7),
                             Pseudonymizer(SYNTHETIC_PSEUDONYM_KEY))
            secs = time.perf_counter() - t0
        out = {"seconds": round(secs, 3), "peak_mb": round(rss.peak / MB, 1),
               "start_mb": round(rss.start / MB, 1),
               "events": sum(w.report["events"]["rows_out"] for w in written),
               "items": sum(w.report["catalog_items"] for w in written)}
    elif kind == "seq":
        from ingest_stages import run_ray_seq

        start_private_ray(log)
        with RayMemoryMonitor(interval=0.2) as mon:
            t0 = time.perf_counter()
            manifest = run_ray_seq(Path(rest[0]), Path(rest[1]), SEQ)
            secs = time.perf_counter() - t0
        mem = mon.memory()
        out = {"seconds": round(secs, 3), "peak_mb": mem["peak_driver_plus_workers_mb"],
               "memory": mem, "rows": sum(p.get("train_rows", 0)
                                          for p in manifest["platforms"].values())}
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(json.dumps(out))


# -- the axes --------------------------------------------------------------------------------------

def events_axis(sizes: Sequence[int], chunk_rows: int, workdir: Path, log: Log,
                seq_max: int = SEQ_MAX_EVENTS) -> dict[str, Any]:
    """Streaming and in-memory ingest against events (``bench/ingest_stream.py``), then the
    sequence build on each streamed lake up to ``seq_max`` events (beyond it the example set,
    one row per target with its history, outgrows this machine's disk and memory budget)."""
    from ingest_stream import run_ingest_stream

    res = run_ingest_stream(list(sizes), chunk_rows, workdir, log, keep_lakes=True)
    rows = res["rows"]
    xs = [r["events"] for r in rows]
    seq_s: list[float | None] = []
    seq_mb: list[float | None] = []
    for r in rows:
        lake = r.get("lake")
        if lake is None or r["events"] > seq_max:
            seq_s.append(None)
            seq_mb.append(None)
            continue
        examples = workdir / f"examples-{r['events']}"
        got = run_child(["seq", str(lake), str(examples)], log)
        log(f"sequence build at {r['events']:,} events: {got['seconds']:.1f} s, "
            f"peak {got['peak_mb']:.0f} MB (driver + workers)")
        r["seq"] = got
        seq_s.append(got["seconds"])
        seq_mb.append(got["peak_mb"])
        subprocess.run(["rm", "-rf", str(examples)], check=False)
    stream = [r["stream"] for r in rows]
    memory = [r.get("memory") for r in rows]
    skipped = ", ".join(f"not run at {r['events']:,} events (its fit: "
                        f"{r['memory_skipped']['extrapolated_peak_gb']} GB)"
                        for r in rows if r.get("memory_skipped"))
    return {"detail": res, "series": [
        series("ingest, streaming", "events", "events", xs,
               [s["seconds"] for s in stream], [s["peak_mb"] for s in stream],
               f"chunks of {chunk_rows:,} rows"),
        series("ingest, in memory", "events", "events", xs,
               [m["seconds"] if m else None for m in memory],
               [m["peak_mb"] if m else None for m in memory],
               "today's path; " + (skipped or "run at every size")),
        series("sequence build (Ray Data)", "events", "events", xs, seq_s, seq_mb,
               f"on the streamed lake, up to {seq_max:,} events"),
    ]}


def items_axis(sizes: Sequence[int], log: Log, users: int = 256) -> dict[str, Any]:
    """Serving top-k, evaluation and one training step against the catalog size."""
    from scale_eval import run_scale_eval
    from scale_serving import run_scale_serving
    from scale_train import run_scale_train

    log(f"serving top-k at {list(sizes)} items")
    serving = run_scale_serving(tuple(sizes), export=None)
    evals = []
    for n in sizes:
        log(f"full-ranking evaluation of {users} users at {n:,} items")
        evals.append(run_scale_eval(items=n, users=users))
    log(f"training step at {list(sizes)} items")
    train = run_scale_train(frozen_sizes=tuple(sizes), encoder_sizes=(), log=log)
    cat = serving["catalogs"]
    frozen = [r for r in train["rows"] if r["path"] == "frozen"]
    xs = list(sizes)
    ms = 1e-3
    return {"detail": {"serving": serving, "eval": evals, "train": train}, "series": [
        series("serve top-10, exact", "items", "items", xs,
               [r["exact"]["p50_ms"] * ms for r in cat], [None] * len(xs),
               "p50 seconds per query, one thread"),
        series("serve top-10, faiss index", "items", "items", xs,
               [r["ann"]["p50_ms"] * ms for r in cat], [r["index_mb"] for r in cat],
               "p50 seconds per query; memory column: the index's MiB"),
        series("index build at export", "items", "items", xs,
               [r["build_seconds"] for r in cat], [r["peak_rss_mb"] for r in cat],
               "memory column: the bench process's peak RSS so far"),
        series("evaluation, whole-catalog scores", "items", "items", xs,
               [e["whole"]["seconds"] for e in evals],
               [e["whole"]["peak_extra_mb"] for e in evals],
               f"{users} users; memory column: extra MiB while it runs"),
        series("evaluation, chunked top-k", "items", "items", xs,
               [e["chunked"]["seconds"] for e in evals],
               [e["chunked"]["peak_extra_mb"] for e in evals],
               f"{users} users; memory column: extra MiB while it runs"),
        series("train step, full softmax", "items", "items", xs,
               [r["full_softmax"]["median_s"] for r in frozen], [None] * len(xs),
               "cached text vectors (freeze_encoder)"),
        series("train step, sampled softmax", "items", "items", xs,
               [r["sampled_uniform"]["median_s"] for r in frozen], [None] * len(xs),
               "in-batch + uniform negatives, logQ"),
    ]}


def platforms_axis(counts: Sequence[int], total_scale: float, workdir: Path,
                   log: Log) -> dict[str, Any]:
    """The synthetic world over ``counts`` platforms at a fixed summed scale: ingest (a fresh
    process each) and the sequence build (Ray Data, a fresh private cluster each)."""
    rows = []
    for p in counts:
        lake, examples = workdir / f"lake-p{p}", workdir / f"examples-p{p}"
        ing = run_child(["synthetic-ingest", str(lake), str(p), str(total_scale / p)], log)
        seq = run_child(["seq", str(lake), str(examples)], log)
        rows.append({"platforms": p, "scale_per_platform": round(total_scale / p, 3),
                     "ingest": ing, "seq": seq})
        log(f"{p} platform(s): {ing['events']:,} events, {ing['items']:,} items; ingest "
            f"{ing['seconds']:.1f} s / {ing['peak_mb']:.0f} MB, sequences {seq['seconds']:.1f} s "
            f"/ {seq['peak_mb']:.0f} MB")
        subprocess.run(["rm", "-rf", str(lake), str(examples)], check=False)
    xs = [r["platforms"] for r in rows]
    return {"detail": rows, "series": [
        series("ingest (synthetic, in memory)", "platforms", "platforms", xs,
               [r["ingest"]["seconds"] for r in rows], [r["ingest"]["peak_mb"] for r in rows],
               f"total scale {total_scale} split evenly (events per row in detail)"),
        series("sequence build (Ray Data)", "platforms", "platforms", xs,
               [r["seq"]["seconds"] for r in rows], [r["seq"]["peak_mb"] for r in rows],
               "one Ray Data task per (platform, bucket)"),
    ]}


# -- report ----------------------------------------------------------------------------------------

PER = {"events": (1e6, "M events"), "items": (1e6, "M items"), "platforms": (1, "platform")}


def _fit_text(f: dict[str, Any] | None, unit: str) -> str:
    """``x^b (shape); c + d per unit``, the slope per million for events and items."""
    if f is None:
        return "n/a"
    per, label = PER.get(unit, (1, unit))
    return (f"x^{f['exponent']:.2f} ({f['shape']}); {f['intercept']:.3g} + "
            f"{f['slope'] * per:.3g} per {label}")


def markdown(path: Path, result: dict[str, Any]) -> None:
    m = result["machine"]
    lines = ["# Scale: each stage's time and peak memory against events, items and platforms",
             "", f"{m['date']}, {m['cpu_count_logical']} CPUs, {m['memory_total_gb']} GB; "
             f"load average at start/end {result['loadavg_start']} / {result['loadavg_end']}; "
             f"{result['total_seconds']:.0f} s in all. Commit {m['source'].get('commit')} "
             f"(local changes: {m['source'].get('dirty')}). Regenerate: "
             f"`{result['command']}`.", "",
             "Fits: `y = a x^b` in log-log (b: 0 flat, 1 linear) and `y = c + d x` per unit of "
             "the axis. Peak MB: a fresh process's peak RSS (ingest), driver + Ray workers "
             "(sequence build), or the sub-bench's own column (items; see each note).", ""]
    for axis in PARTS:
        part = result["axes"].get(axis)
        if part is None:
            continue
        lines += [f"## Against {axis}", ""]
        if "skipped" in part:
            lines += [f"Not measured: {part['skipped']}", ""]
            continue
        xs = part["series"][0]["x"]
        lines += ["| stage | " + " | ".join(f"{x:,}" for x in xs) + " | fit of seconds "
                  "| fit of peak MB | note |", "|---" * (len(xs) + 4) + "|"]
        for s in part["series"]:
            cells = ["not run" if t is None and mb is None
                     else f"{fmt(t, '.3g')} s / {fmt(mb, '.0f')} MB" if mb is not None
                     else f"{fmt(t, '.3g')} s" for t, mb in zip(s["seconds"], s["peak_mb"])]
            lines.append(f"| {s['stage']} | " + " | ".join(cells)
                         + f" | {_fit_text(s['fit_seconds'], s['unit'])} "
                         f"| {_fit_text(s['fit_peak_mb'], s['unit'])} | {s['note']} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    ap.add_argument("--events", type=int, nargs="+", default=list(EVENT_SIZES))
    ap.add_argument("--chunk-rows", type=int, default=500_000)
    ap.add_argument("--items", type=int, nargs="+", default=list(ITEM_SIZES))
    ap.add_argument("--platforms", type=int, nargs="+", default=list(PLATFORM_COUNTS))
    ap.add_argument("--platform-scale", type=float, default=PLATFORM_TOTAL_SCALE)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp "
                    "dir; the 50M-event log needs a few GB)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    opts = ap.parse_args(argv)
    parts = [p for p in opts.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if opts.quick:
        opts.events, opts.items, opts.platforms = [100_000, 300_000], [10_000, 30_000], [1, 3]
        opts.platform_scale, opts.chunk_rows = 3.0, 50_000
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine_info(["ray", "pyarrow", "torch", "faiss-cpu", "numpy"]),
        "command": "python bench/scale.py " + " ".join(argv), "loadavg_start": loadavg(),
        "axes": {}}
    with tempfile.TemporaryDirectory(prefix="scale-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        if "events" in parts:
            result["axes"]["events"] = events_axis(opts.events, opts.chunk_rows,
                                                   work / "events", log)
        if "platforms" in parts:
            (work / "platforms").mkdir()
            result["axes"]["platforms"] = platforms_axis(opts.platforms, opts.platform_scale,
                                                         work / "platforms", log)
        if "items" in parts:
            result["axes"]["items"] = items_axis(opts.items, log)
    result["loadavg_end"] = loadavg()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    save_results(opts.out, "scale", result, markdown, log)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

