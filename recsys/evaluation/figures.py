"""Figures of the evaluation reports: grouped bars per platform, learning curves, transfer gains.

matplotlib's object API (``Figure`` + ``savefig``): no pyplot, no global backend, no display, safe
to call from worker processes. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.evaluation.schema import EvalReport, TransferReport, metric_title

if TYPE_CHECKING:
    from matplotlib.axes import Axes

def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _yerr(heights: np.ndarray, intervals: Sequence[tuple[float, float] | None]) -> np.ndarray:
    """``(2, n)`` distances from each bar to its interval ends (0 where there is none)."""
    err = np.zeros((2, len(heights)))
    for j, (h, iv) in enumerate(zip(heights, intervals)):
        if iv is not None and not np.isnan(h):
            err[:, j] = (max(0.0, h - iv[0]), max(0.0, iv[1] - h))
    return err


def _grouped_bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
                  errors: Mapping[str, Sequence[tuple[float, float] | None]] | None = None,
                  ylabel: str = "") -> None:
    """Bars grouped by ``groups``, one bar per series; missing values leave a gap."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        yerr = _yerr(heights, errors[label]) if errors and label in errors else None
        bars = ax.bar(pos, np.nan_to_num(heights), width, label=label, yerr=yerr, capsize=3,
                      error_kw={"ecolor": "0.35", "elinewidth": 1})
        crowded = len(series) > 3  # side-by-side labels would overlap: write them upright
        for bar, h in zip(bars, heights):
            if not np.isnan(h):
                ax.annotate(f"{h:.3f}", (bar.get_x() + bar.get_width() / 2, h),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=6 if crowded else 7, rotation=90 if crowded else 0)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 5 else 0,
                  ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plot_platform_metrics(report: EvalReport, path: str | Path,
                          metrics: Sequence[str] = ("ndcg@10", "recall@10")) -> Path:
    """Grouped bars per platform (one bar per metric), bootstrap intervals as error bars."""
    names = sorted(report.platforms)
    fig, (ax,) = _new_figure(max(5.0, 1.4 * len(names) * len(metrics) / 2 + 2), 4.0)
    series = {metric_title(m): [report.platforms[p].metrics.get(m) for p in names] for m in metrics}
    errors = {metric_title(m): [report.platforms[p].ci.get(m) for p in names] for m in metrics}
    _grouped_bars(ax, [f"{p}\n(n={report.platforms[p].users})" for p in names], series, errors,
                  ylabel="metric value")
    ax.set_title(f"{report.run} — {report.split}, full ranking (history not masked)", fontsize=10)
    fig.legend(loc="outside lower center", ncols=len(metrics), fontsize=8, frameon=False)
    out = Path(path)
    fig.savefig(out)
    return out


def plot_learning_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                         metrics: Sequence[str] = ("train_loss", "valid_ndcg@10")) -> Path:
    """One panel per metric vs epoch, one line per run; a metric no run recorded says so."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _new_figure(5.0 * len(metrics), 3.8, ncols=len(metrics))
    for ax, metric in zip(axes, metrics):
        drawn = False
        for run, points in curves.items():
            pts = sorted((p["epoch"], p[metric]) for p in points if metric in p)
            if pts:
                ex, ey = zip(*pts)
                ax.plot(ex, ey, marker="o", markersize=3, label=run)
                drawn = True
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    if handles:  # one legend for all panels, outside the plots so it never hides a line
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 5), fontsize=8, frameon=False)
    out = Path(path)
    fig.savefig(out)
    return out


def plot_transfer(tr: TransferReport, path: str | Path) -> Path:
    """One panel per metric: bars grouped by platform, one bar per strategy."""
    platforms, strategies = tr.platforms, tr.strategies
    value = {(r.platform, r.strategy): r.values for r in tr.rows}
    width = max(5.0, 0.45 * len(platforms) * len(strategies) + 2)
    fig, axes = _new_figure(width, 4.0, ncols=len(tr.metrics))
    for ax, m in zip(axes, tr.metrics):
        series = {s: [value[(p, s)].get(m) if (p, s) in value else None for p in platforms]
                  for s in strategies}
        _grouped_bars(ax, platforms, series, ylabel=metric_title(m))
        ax.set_title(f"{metric_title(m)} ({tr.split})", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncols=min(len(strategies), 6), fontsize=8, frameon=False)
    out = Path(path)
    fig.savefig(out)
    return out
