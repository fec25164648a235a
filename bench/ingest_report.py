"""``bench/ingest.py``'s figures: each dataset's summary from its measurements, how stage times
grow with the synthetic scale, and the Markdown.

``write_markdown`` reads only what ``ingest.json`` records, so it can re-render a recorded result.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ingest_stages import DatasetSpec

TARGET_RATIO = 0.5  # Ray pipeline >= 0.5x the single-process baseline on 2 cores


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def dataset_summary(spec: DatasetSpec, info: dict[str, Any], times: dict[str, list[float]],
                    mems: dict[str, list[dict[str, Any]]], cpus: dict[str, list[dict[str, Any]]],
                    split_rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One dataset's entry of ``ingest.json`` from its measurements (per stage: seconds,
    memory and CPU of every repeat): medians, throughputs, ratios and peaks."""
    events = info["events"]
    med = {k: median(v) for k, v in times.items() if v}
    summary: dict[str, Any] = {
        "dataset": spec.name, "kind": spec.kind, "repeats": spec.repeats, "events": events,
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
        "split_rows": split_rows,
        "checksums_equal": True,
    }
    if "generated_rows" in info:
        summary["generated_rows"] = info["generated_rows"]
        summary["events_per_s"]["ingest_excl_generate"] = round(
            events / max(med["ingest"] - med["generate"], 1e-9), 1)
    return summary


def linearity(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage, from the smallest to the largest synthetic scale: seconds per million events,
    (time ratio) / (scale ratio), and a line fit t = a + b * Mev with its r2."""
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



def write_markdown(path: Path, result: dict[str, Any]) -> None:
    """``ingest.md``: one table row per dataset, the linearity lines, the target's verdict."""
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
