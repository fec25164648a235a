"""The monitor's report: one HTML page with its figures embedded, the PNGs beside it, a JSON of
every signal, and (tracking on) an MLflow run with the metrics and those files.

    <out>/report.html       signal table per platform (value, threshold, breached) + figures
    <out>/report.json       DriftReport.to_dict() of every platform
    <out>/<platform>.png    popularity before/after, history lengths, served scores

MLflow metrics: ``monitor_<signal>/<platform>`` (``monitor_popularity_js/shop_c``), plus
``monitor_drifted/<platform>`` (1/0) and ``monitor_new_events/<platform>``, the spelling of
``recsys.tracking.metric_names``. Figures use matplotlib's object API (no pyplot, no display).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.monitoring.schema import DriftReport, Samples


def figure(samples: Samples, platform: str, path: Path) -> Path | None:
    """Popularity bars (reference vs current shares of the top items and other), histograms of
    prior interactions and of served scores; None when there is nothing to draw."""
    if not len(samples.labels):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6), dpi=100, layout="constrained")
    ax_pop, ax_hist, ax_score = fig.subplots(1, 3)
    ref = samples.reference_counts / max(samples.reference_counts.sum(), 1)
    cur = samples.current_counts / max(samples.current_counts.sum(), 1)
    x = np.arange(len(ref))
    ax_pop.bar(x - 0.2, ref, width=0.4, label="reference")
    ax_pop.bar(x + 0.2, cur, width=0.4, label="current")
    ax_pop.set_title(f"{platform}: events by reference popularity bin")
    ax_pop.set_xlabel("bin of the reference's events, head first (last bar: new items)")
    ax_pop.set_ylabel("share of events")
    ax_pop.legend(loc="upper right")
    _hist(ax_hist, samples.reference_history, samples.current_history,
          "prior interactions per event", integer=True)
    if len(samples.reference_scores) or len(samples.current_scores):
        _hist(ax_score, samples.reference_scores, samples.current_scores, "served scores")
    else:
        ax_score.text(0.5, 0.5, "no feedback", ha="center", va="center")
        ax_score.set_axis_off()
    fig.savefig(path)
    return path


def _hist(ax: Any, reference: np.ndarray, current: np.ndarray, title: str,
          integer: bool = False) -> None:
    both = np.concatenate([reference, current])
    if not len(both):
        ax.set_axis_off()
        return
    bins = (np.arange(both.min(), both.max() + 2) - 0.5 if integer and both.max() - both.min()
            < 80 else 30)
    for values, label in ((reference, "reference"), (current, "current")):
        if len(values):
            ax.hist(values, bins=bins, density=True, alpha=0.5, label=label)
    ax.set_title(title)
    ax.legend(loc="upper right")


def _fmt(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _platform_html(r: DriftReport, png: Path | None) -> str:
    state = ("DRIFTED" if r.drifted else "no drift") if r.judged else "not judged"
    cutoff = r.cutoff.isoformat() if r.cutoff else "-"
    rows = "".join(
        f"<tr class={'breach' if s.breached else 'ok'}><td>{s.name}</td><td>{_fmt(s.value)}</td>"
        f"<td>{s.breach_when} {_fmt(s.threshold)}</td><td>{'yes' if s.breached else 'no'}</td>"
        f"<td>{html.escape(s.detail)}</td></tr>" for s in r.signals)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes)
    img = "" if png is None else (
        f'<img alt="{r.platform} figures" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}">')
    return (f"<h2>{r.platform}: {state}</h2><p>champion: {r.champion or 'none'}; reference: "
            f"{r.reference_events} interactions up to {cutoff} ({r.cutoff_source}); new: "
            f"{r.new_events}, judged: {r.current_events}</p><ul>{notes}</ul>"
            "<table><tr><th>signal</th><th>value</th><th>breaches</th><th>breached</th>"
            f"<th>detail</th></tr>{rows}</table>{img}")


STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px}tr.breach{background:#fdd}"
         "img{max-width:100%}")


def write_report(reports: Sequence[DriftReport], out: Path) -> Path:
    """Write ``report.html``, ``report.json`` and a PNG per platform under ``out``; returns
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for r in reports:
        png = figure(r.samples, r.platform, out / f"{r.platform}.png")
        parts.append(_platform_html(r, png))
    drifted = [r.platform for r in reports if r.drifted]
    when = reports[0].checked_at.isoformat() if reports else "-"
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>drift monitor {when}</title>"
            f"<style>{STYLE}</style></head><body><h1>Drift monitor, {when}</h1>"
            f"<p>drifted: {', '.join(drifted) or 'none'}</p>{''.join(parts)}</body></html>")
    (out / "report.html").write_text(page)
    (out / "report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return out


def metrics(reports: Sequence[DriftReport]) -> dict[str, float]:
    """The check's MLflow metrics (project names; ``log_metrics`` maps them to MLflow's)."""
    out: dict[str, float] = {}
    for r in reports:
        p = r.platform
        out[f"monitor_drifted/{p}"] = float(r.drifted)
        out[f"monitor_new_events/{p}"] = float(r.new_events)
        for s in r.signals:
            if s.value is not None and np.isfinite(s.value):
                out[f"monitor_{s.name}/{p}"] = float(s.value)
    return out


def log_check(uri: str, experiment: str, run_name: str, reports: Sequence[DriftReport],
              out: Path) -> str:
    """One MLflow run per check: metrics, the report files, drifted platforms as a tag."""
    from recsys.tracking.runs import log_artifacts, log_metrics, tracked_run

    tags = {"recsys.job": "monitor",
            "drifted": ",".join(r.platform for r in reports if r.drifted) or "none"}
    with tracked_run(uri, experiment, run_name, tags=tags) as run:
        log_metrics(uri, run.run_id, metrics(reports), step=0)
        log_artifacts(uri, run.run_id, out, "monitor")
    return run.run_id


def format_summary(reports: Sequence[DriftReport]) -> str:
    """What the job prints: one line per platform and signal, and where the report is."""
    lines = []
    for r in reports:
        state = ("DRIFTED" if r.drifted else "no drift") if r.judged else "not judged"
        lines.append(f"{r.platform}: {state} (champion {r.champion or 'none'}, "
                     f"{r.new_events} new interactions, cutoff {r.cutoff_source})")
        lines += [f"  {s.name:<18}{_fmt(s.value):>8}  {s.breach_when} {_fmt(s.threshold):<8}"
                  f"{'  BREACHED' if s.breached else ''}" for s in r.signals]
    if reports and reports[0].report_dir:
        lines.append(f"report: {Path(reports[0].report_dir) / 'report.html'}")
    return "\n".join(lines)
