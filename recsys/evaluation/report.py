"""Evaluation reports: build from accumulated ranks, save as JSON + Markdown + PNG, compare runs.

A report is data first (``EvalReport``, a pydantic model that round-trips through ``report.json``);
Markdown and figures are rendered from it, so a benchmark can be re-rendered without re-evaluating.
The primary numbers follow the published protocol (full ranking over all items of the platform,
history items not masked); history-excluded numbers are kept in their own, labelled field.

Figures use matplotlib's object API (``Figure`` + ``savefig``): no pyplot, no global backend, no
display, safe to call from worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recsys.evaluation.metrics import ALL, COLD_START, RankingAccumulator, bootstrap_ci, per_user

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Metrics = dict[str, float | None]

PROTOCOL = ("full ranking over all items of the platform; items in the user's history are NOT "
            "masked (RecBole full-sort, the protocol of the published numbers); ties count half")
HISTORY_EXCLUDED_LABEL = "history excluded (items in the user's history masked; reads higher)"

PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "scientific": {
        "VQ-Rec": {"recall@10": 0.1211, "ndcg@10": 0.0643, "recall@50": 0.2369, "ndcg@50": 0.0897},
        "VQ-Rec (0315)": {"recall@10": 0.1238, "ndcg@10": 0.0645, "recall@50": 0.2409,
                          "ndcg@50": 0.0901},
    },
    "online_retail": {
        "VQ-Rec": {"recall@10": 0.1557, "ndcg@10": 0.0730, "recall@50": 0.3994, "ndcg@50": 0.1263},
        "VQ-Rec (0315)": {"recall@10": 0.1559, "ndcg@10": 0.0704, "recall@50": 0.4009,
                          "ndcg@50": 0.1240},
    },
}
PUBLISHED_SOURCE = (
    "VQ-Rec README, Results table (github.com/RUCAIBox/VQ-Rec @ 29818450): full-ranking test "
    "results on the UniSRec/VQ-Rec splits of Amazon 2018 Scientific and UCI Online Retail "
    "(leave-one-out, RecBole full-sort, history not masked). `VQ-Rec` is the paper's checkpoint, "
    "`VQ-Rec (0315)` the March 2023 re-trained one; each row is copied whole "
    "(shared/data/README.md mixes the two rows' @10 and @50 numbers)."
)


def _nan_to_none(value: Any) -> Any:
    """NaN (an empty subset) is stored as None, so that ``report.json`` is standard JSON."""
    if isinstance(value, Mapping):
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in value.items()}
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlatformResult(_Model):
    """Numbers of one platform in one run and split."""

    metrics: Metrics = Field(description="Primary protocol (history not masked); has `count`.")
    history_excluded: Metrics | None = Field(
        None, description="Same metrics with history items masked; labelled, never primary.")
    subsets: dict[str, Metrics] = Field(
        default_factory=dict, description=f"Named user subsets, e.g. `{COLD_START}`; have `count`.")
    auc: float | None = Field(None, description="CTR AUC on this platform, where measured.")
    ci: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Seeded bootstrap 95% intervals of primary metrics.")

    @field_validator("metrics", "history_excluded", mode="before")
    @classmethod
    def _metrics_nan(cls, value: Any) -> Any:
        return _nan_to_none(value)

    @field_validator("subsets", mode="before")
    @classmethod
    def _subsets_nan(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: _nan_to_none(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _has_counts(self) -> PlatformResult:
        named = {"metrics": self.metrics, **{f"subsets.{k}": v for k, v in self.subsets.items()}}
        if self.history_excluded is not None:
            named["history_excluded"] = self.history_excluded
        missing = [k for k, v in named.items() if v.get("count") is None]
        if missing:
            raise ValueError(f"metrics without `count`: {missing} (use ranking_metrics)")
        return self

    @property
    def users(self) -> int:
        return int(self.metrics["count"] or 0)


class EvalReport(_Model):
    """One run evaluated on one split, per platform; ``report.json`` is this model."""

    run: str
    split: str
    protocol: str = PROTOCOL
    platforms: dict[str, PlatformResult]
    curves: list[dict[str, float]] = Field(
        default_factory=list,
        description="Learning curve points, e.g. {epoch, train_loss, valid_ndcg@10}.")
    meta: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Free-form provenance: model, checkpoint, seed, ...")

    @field_validator("curves")
    @classmethod
    def _epochs(cls, value: list[dict[str, float]]) -> list[dict[str, float]]:
        missing = [i for i, point in enumerate(value) if "epoch" not in point]
        if missing:
            raise ValueError(f"curves points {missing[:5]} have no `epoch`")
        return value


def build_report(
    run: str,
    split: str,
    ranks: RankingAccumulator,
    *,
    history_excluded: RankingAccumulator | None = None,
    auc: Mapping[str, float] | None = None,
    curves: Sequence[Mapping[str, float]] = (),
    ci_metrics: Sequence[str] = ("ndcg@10", "recall@10"),
    n_boot: int = 1000,
    seed: int = 0,
    meta: Mapping[str, str | int | float | bool | None] | None = None,
) -> EvalReport:
    """An ``EvalReport`` from accumulated ranks; intervals from the same per-user formulas."""
    primary = ranks.result()
    excluded = history_excluded.result() if history_excluded is not None else {}
    auc = dict(auc or {})
    unknown = sorted((set(excluded) | set(auc)) - set(primary))
    if unknown:
        raise ValueError(f"platforms {unknown} have history-excluded ranks or AUC but no primary "
                         f"ranks; primary has {sorted(primary)}")
    platforms: dict[str, PlatformResult] = {}
    for name, by_subset in primary.items():
        r = ranks.ranks(name)
        ci = {m: bootstrap_ci(per_user(r, m), n=n_boot, seed=seed) for m in ci_metrics} if r.size \
            else {}
        platforms[name] = PlatformResult(
            metrics=by_subset[ALL],
            history_excluded=excluded[name][ALL] if name in excluded else None,
            subsets={k: v for k, v in by_subset.items() if k != ALL},
            auc=auc.get(name),
            ci=ci,
        )
    return EvalReport(run=run, split=split, platforms=platforms,
                      curves=[dict(p) for p in curves], meta=dict(meta or {}))


def read_report(path: str | Path) -> EvalReport:
    """Load ``report.json`` (or the directory that holds it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    return EvalReport.model_validate_json(p.read_text())


# --------------------------------------------------------------------------- Markdown


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


MAIN_COLUMNS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")
_TITLES = {"recall@10": "Recall@10", "ndcg@10": "NDCG@10", "recall@50": "Recall@50",
           "ndcg@50": "NDCG@50", "mrr": "MRR"}


def _title(metric: str) -> str:
    return _TITLES.get(metric, metric)


def metrics_table(report: EvalReport) -> list[str]:
    """The main table: one row per platform, primary protocol."""
    header = ["platform", "users", *(_title(m) for m in MAIN_COLUMNS),
              "cold-start NDCG@10 (n)", "AUC"]
    rows = []
    for name, res in sorted(report.platforms.items()):
        cold = res.subsets.get(COLD_START)
        cold_cell = f"{_fmt(cold.get('ndcg@10'))} ({int(cold['count'] or 0)})" if cold else "–"
        rows.append([name, str(res.users), *(_fmt(res.metrics.get(m)) for m in MAIN_COLUMNS),
                     cold_cell, _fmt(res.auc)])
    return _table(header, rows)


def compare_to_published(report: EvalReport) -> list[str]:
    """Markdown table lines (header included): ours vs each published anchor, and the ratio.

    Empty when no platform of the report has an anchor. Anchors are test-split numbers; the
    split of ours is in the header so that a validation run is not mistaken for a test result.
    """
    rows = []
    for name in sorted(set(report.platforms) & set(PUBLISHED)):
        ours = report.platforms[name].metrics
        for model, anchor in PUBLISHED[name].items():
            for metric, value in anchor.items():
                mine = ours.get(metric)
                ratio = f"{mine / value:.2f}" if mine is not None and value else "–"
                rows.append([name, model, _title(metric), _fmt(mine), _fmt(value), ratio])
    if not rows:
        return []
    return _table(["platform", "anchor", "metric", f"ours ({report.split})", "published",
                   "ours / published"], rows)


def render_markdown(report: EvalReport) -> str:
    """``report.md``: protocol, main table, labelled extras, published anchors."""
    lines = [f"# Evaluation: {report.run} ({report.split})", "",
             f"Protocol: {report.protocol}.", ""]
    lines += metrics_table(report)
    excluded = {k: v.history_excluded for k, v in report.platforms.items() if v.history_excluded}
    if excluded:
        lines += ["", f"## {HISTORY_EXCLUDED_LABEL[0].upper()}{HISTORY_EXCLUDED_LABEL[1:]}", "",
                  "Not the protocol of the published numbers; shown for reference.", ""]
        lines += _table(["platform", "users", *(_title(m) for m in MAIN_COLUMNS)],
                        [[k, str(int(v["count"] or 0)), *(_fmt(v.get(m)) for m in MAIN_COLUMNS)]
                         for k, v in sorted(excluded.items())])
    ci_rows = [[k, _title(m), _fmt(v.metrics.get(m)), f"[{lo:.4f}, {hi:.4f}]"]
               for k, v in sorted(report.platforms.items()) for m, (lo, hi) in v.ci.items()]
    if ci_rows:
        lines += ["", "## Uncertainty", "", "Seeded percentile bootstrap over users, 95%.", ""]
        lines += _table(["platform", "metric", "value", "95% interval"], ci_rows)
    other = [(k, s, v) for k, r in sorted(report.platforms.items())
             for s, v in sorted(r.subsets.items()) if s != COLD_START]
    if other:
        lines += ["", "## Subsets", ""]
        lines += _table(["platform", "subset", "users", *(_title(m) for m in MAIN_COLUMNS)],
                        [[k, s, str(int(v["count"] or 0)), *(_fmt(v.get(m)) for m in MAIN_COLUMNS)]
                         for k, s, v in other])
    published = compare_to_published(report)
    if published:
        lines += ["", "## Published anchors", "", PUBLISHED_SOURCE, ""] + published
    if report.meta:
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in sorted(report.meta.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


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
    series = {_title(m): [report.platforms[p].metrics.get(m) for p in names] for m in metrics}
    errors = {_title(m): [report.platforms[p].ci.get(m) for p in names] for m in metrics}
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


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``metrics_by_platform.png`` and, when the report has
    learning curves, ``learning_curves.png``. Returns ``{"json", "markdown", "metrics_png",
    "curves_png"?: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(report.model_dump_json(indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    paths["metrics_png"] = plot_platform_metrics(report, out / "metrics_by_platform.png")
    if report.curves:
        paths["curves_png"] = plot_learning_curves({report.run: report.curves},
                                                   out / "learning_curves.png")
    return paths


# --------------------------------------------------------------------------- transfer


class TransferRow(_Model):
    """One strategy on one platform, against the baseline run on the same platform and split."""

    platform: str
    strategy: str
    users: int
    values: Metrics
    gain_abs: Metrics = Field(description="value - baseline; None where there is no baseline.")
    gain_rel_pct: Metrics = Field(description="100 * gain / baseline; None if baseline is 0.")

    @field_validator("values", "gain_abs", "gain_rel_pct", mode="before")
    @classmethod
    def _nan(cls, value: Any) -> Any:
        return _nan_to_none(value)


class TransferReport(_Model):
    """Scratch vs transfer strategies (full, freeze_encoder, lora, adapter_only...) per platform."""

    baseline: str
    split: str
    metrics: list[str]
    strategies: list[str] = Field(description="Baseline first, then the runs in given order.")
    rows: list[TransferRow]

    @property
    def platforms(self) -> list[str]:
        return sorted({r.platform for r in self.rows})


def build_transfer_report(runs: Mapping[str, EvalReport], baseline: str = "scratch",
                          metrics: Sequence[str] = ("ndcg@10", "recall@10")) -> TransferReport:
    """Gains of every run over ``baseline``, per platform (primary protocol).

    Runs must share the split, and on a platform they share, the same number of users: a gain
    measured on different users is not a gain.
    """
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} not among runs {sorted(runs)}")
    splits = {name: r.split for name, r in runs.items()}
    if len(set(splits.values())) != 1:
        raise ValueError(f"runs were evaluated on different splits: {splits}")
    base = runs[baseline].platforms
    order = [baseline, *(n for n in runs if n != baseline)]
    rows: list[TransferRow] = []
    problems: list[str] = []
    for platform in sorted({p for r in runs.values() for p in r.platforms}):
        ref = base.get(platform)
        for strategy in order:
            res = runs[strategy].platforms.get(platform)
            if res is None:
                continue
            if ref is not None and res.users != ref.users:
                problems.append(f"{platform}: {strategy} has {res.users} users, "
                                f"{baseline} {ref.users}")
            values = {m: res.metrics.get(m) for m in metrics}
            gain: Metrics = {}
            rel: Metrics = {}
            for m in metrics:
                b = ref.metrics.get(m) if ref is not None else None
                v = values[m]
                gain[m] = v - b if v is not None and b is not None else None
                rel[m] = 100.0 * (v - b) / b if v is not None and b else None
            rows.append(TransferRow(platform=platform, strategy=strategy, users=res.users,
                                    values=values, gain_abs=gain, gain_rel_pct=rel))
    if problems:
        raise ValueError("runs disagree on evaluated users: " + "; ".join(problems))
    return TransferReport(baseline=baseline, split=splits[baseline], metrics=list(metrics),
                          strategies=order, rows=rows)


def _gain_cell(row: TransferRow, metric: str, baseline: str) -> str:
    if row.strategy == baseline:
        return "baseline"
    g, rel = row.gain_abs.get(metric), row.gain_rel_pct.get(metric)
    if g is None:
        return "no baseline"
    return f"{g:+.4f} ({rel:+.1f}%)" if rel is not None else f"{g:+.4f}"


def render_transfer_markdown(tr: TransferReport) -> str:
    header = ["platform", "strategy", "users"]
    for m in tr.metrics:
        header += [_title(m), f"Δ{_title(m)} vs {tr.baseline}"]
    rows = []
    for r in tr.rows:
        row = [r.platform, r.strategy, str(r.users)]
        for m in tr.metrics:
            row += [_fmt(r.values.get(m)), _gain_cell(r, m, tr.baseline)]
        rows.append(row)
    lines = [f"# Transfer: strategies vs {tr.baseline} ({tr.split})", "",
             f"Protocol: {PROTOCOL}. Gains are absolute (relative %) over `{tr.baseline}` "
             "on the same platform and users.", "", *_table(header, rows)]
    return "\n".join(lines) + "\n"


def plot_transfer(tr: TransferReport, path: str | Path) -> Path:
    """One panel per metric: bars grouped by platform, one bar per strategy."""
    platforms, strategies = tr.platforms, tr.strategies
    value = {(r.platform, r.strategy): r.values for r in tr.rows}
    width = max(5.0, 0.45 * len(platforms) * len(strategies) + 2)
    fig, axes = _new_figure(width, 4.0, ncols=len(tr.metrics))
    for ax, m in zip(axes, tr.metrics):
        series = {s: [value[(p, s)].get(m) if (p, s) in value else None for p in platforms]
                  for s in strategies}
        _grouped_bars(ax, platforms, series, ylabel=_title(m))
        ax.set_title(f"{_title(m)} ({tr.split})", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncols=min(len(strategies), 6), fontsize=8, frameon=False)
    out = Path(path)
    fig.savefig(out)
    return out


def write_transfer_report(runs: Mapping[str, EvalReport], out_dir: str | Path,
                          baseline: str = "scratch") -> dict[str, Path]:
    """Write ``transfer_report.json``, ``transfer_report.md``, ``transfer.png`` and, when any run
    has learning curves, ``learning_curves.png`` (one line per run)."""
    tr = build_transfer_report(runs, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "transfer_report.json", "markdown": out / "transfer_report.md"}
    paths["json"].write_text(tr.model_dump_json(indent=2) + "\n")
    paths["markdown"].write_text(render_transfer_markdown(tr))
    paths["png"] = plot_transfer(tr, out / "transfer.png")
    curves = {name: r.curves for name, r in runs.items() if r.curves}
    if curves:
        paths["curves_png"] = plot_learning_curves(curves, out / "learning_curves.png")
    return paths
