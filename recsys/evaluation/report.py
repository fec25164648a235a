"""Evaluation reports: build from accumulated ranks, save as JSON + Markdown + PNG, compare runs.

A report is data first (``EvalReport`` in ``schema``, a pydantic model that round-trips through
``report.json``); Markdown and figures are rendered from it, so a benchmark can be re-rendered
without re-evaluating.
The primary numbers follow the published protocol (full ranking over all items of the platform,
history items not masked); history-excluded numbers are kept in their own, labelled field.

Figures are drawn by ``recsys.evaluation.figures`` (matplotlib is imported only when one is drawn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from recsys.evaluation.figures import plot_learning_curves, plot_platform_metrics, plot_transfer
from recsys.evaluation.metrics import ALL, COLD_START, RankingAccumulator, bootstrap_ci, per_user
from recsys.evaluation.schema import (
    HISTORY_EXCLUDED_LABEL,
    MAIN_COLUMNS,
    PROTOCOL,
    EvalReport,
    Metrics,
    PlatformResult,
    TransferReport,
    TransferRow,
    metric_title,
)

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


def metrics_table(report: EvalReport) -> list[str]:
    """The main table: one row per platform, primary protocol."""
    header = ["platform", "users", *(metric_title(m) for m in MAIN_COLUMNS),
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
                rows.append([name, model, metric_title(metric), _fmt(mine), _fmt(value), ratio])
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
        lines += _table(["platform", "users", *(metric_title(m) for m in MAIN_COLUMNS)],
                        [[k, str(int(v["count"] or 0)), *(_fmt(v.get(m)) for m in MAIN_COLUMNS)]
                         for k, v in sorted(excluded.items())])
    ci_rows = [[k, metric_title(m), _fmt(v.metrics.get(m)), f"[{lo:.4f}, {hi:.4f}]"]
               for k, v in sorted(report.platforms.items()) for m, (lo, hi) in v.ci.items()]
    if ci_rows:
        lines += ["", "## Uncertainty", "", "Seeded percentile bootstrap over users, 95%.", ""]
        lines += _table(["platform", "metric", "value", "95% interval"], ci_rows)
    other = [(k, s, v) for k, r in sorted(report.platforms.items())
             for s, v in sorted(r.subsets.items()) if s != COLD_START]
    if other:
        lines += ["", "## Subsets", ""]
        lines += _table(["platform", "subset", "users", *(metric_title(m) for m in MAIN_COLUMNS)],
                        [[k, s, str(int(v["count"] or 0)), *(_fmt(v.get(m)) for m in MAIN_COLUMNS)]
                         for k, s, v in other])
    published = compare_to_published(report)
    if published:
        lines += ["", "## Published anchors", "", PUBLISHED_SOURCE, ""] + published
    if report.meta:
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in sorted(report.meta.items())]
    return "\n".join(lines) + "\n"


def _write_json_markdown(model: BaseModel, markdown: str, out_dir: str | Path,
                         stem: str) -> tuple[Path, dict[str, Path]]:
    """``<stem>.json`` (the model, round-trips) and ``<stem>.md`` in ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(model.model_dump_json(indent=2) + "\n")
    paths["markdown"].write_text(markdown)
    return out, paths


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``metrics_by_platform.png`` and, when the report has
    learning curves, ``learning_curves.png``. Returns ``{"json", "markdown", "metrics_png",
    "curves_png"?: path}``."""
    out, paths = _write_json_markdown(report, render_markdown(report), out_dir, "report")
    paths["metrics_png"] = plot_platform_metrics(report, out / "metrics_by_platform.png")
    if report.curves:
        paths["curves_png"] = plot_learning_curves({report.run: report.curves},
                                                   out / "learning_curves.png")
    return paths


# --------------------------------------------------------------------------- transfer


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
        header += [metric_title(m), f"Δ{metric_title(m)} vs {tr.baseline}"]
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


def write_transfer_report(runs: Mapping[str, EvalReport], out_dir: str | Path,
                          baseline: str = "scratch") -> dict[str, Path]:
    """Write ``transfer_report.json``, ``transfer_report.md``, ``transfer.png`` and, when any run
    has learning curves, ``learning_curves.png`` (one line per run)."""
    tr = build_transfer_report(runs, baseline)
    out, paths = _write_json_markdown(tr, render_transfer_markdown(tr), out_dir,
                                      "transfer_report")
    paths["png"] = plot_transfer(tr, out / "transfer.png")
    curves = {name: r.curves for name, r in runs.items() if r.curves}
    if curves:
        paths["curves_png"] = plot_learning_curves(curves, out / "learning_curves.png")
    return paths
