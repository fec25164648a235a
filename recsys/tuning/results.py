"""What a finished sweep leaves: one :class:`TrialRow` per trial, read from Tune's result grid
(child MLflow runs get their final status there), the result table and plot, and the summary a
user reads. Driver-side only; ``run_sweep`` calls these after ``Tuner.fit``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.tuning.config import SweepConfig
from recsys.tuning.trial import STATUS_TAG, find_child_runs

log = logging.getLogger(__name__)

_TRIAL_ID = re.compile(r"([0-9a-f]{5}_\d{5})")


@dataclass
class TrialRow:
    trial_id: str
    name: str
    params: dict[str, Any]
    status: str  # completed | early_stopped | errored
    epochs: int
    best_metric: float | None
    best_epoch: int | None
    checkpoint: str | None
    run_id: str | None
    loop_seconds: float
    """Sum of the loop's per-epoch time (train + validation) as reported by rank 0."""
    error: str | None = None


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: Path
    metric: str
    rows: list[TrialRow]
    best: TrialRow | None
    restored: bool
    fit_seconds: float
    total_seconds: float
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    export_dir: Path | None = None
    registered: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    fit_started_at: float = 0.0
    """Wall-clock time ``Tuner.fit`` began (to line up with the trials' timelines)."""


def count(rows: list[TrialRow], status: str) -> int:
    return sum(r.status == status for r in rows)


def _trial_id(result: Any) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    m = _TRIAL_ID.search(Path(str(result.path)).name)
    if not m:
        raise RuntimeError(f"cannot tell the trial id of {result.path}")
    return m.group(1)


def collect_rows(grid: Any, metric: str, uri: str | None, parent: str | None,
                 max_epochs: int) -> list[TrialRow]:
    """One row per trial from the result grid; child runs get their final status and best
    checkpoint, and those Tune stopped early are ended here (their process was stopped).

    ``early_stopped`` means stopped by the scheduler before its last epoch: ASHA also "stops" a
    trial when it reaches ``max_t``, possibly before the trial function could tag it completed."""
    from recsys.tracking import runs

    children = find_child_runs(uri, parent) if uri and parent else {}
    rows = []
    for result in grid:
        tid = _trial_id(result)
        df = result.metrics_dataframe
        best_metric = best_epoch = checkpoint = None
        epochs, loop_seconds = 0, 0.0
        if df is not None and len(df) and metric in df:
            epochs = int(len(df))
            col = "epoch_seconds" if "epoch_seconds" in df else "train_seconds"
            loop_seconds = float(df[col].fillna(0).sum()) if col in df else 0.0
            ranked = df.sort_values(metric, ascending=False)
            top = ranked.iloc[0]
            best_metric, best_epoch = float(top[metric]), int(top.get("epoch", -1))
            if "checkpoint_path" in df:  # the best checkpoint that is still kept on storage
                for _, row in ranked.iterrows():
                    path = row.get("checkpoint_path")
                    if isinstance(path, str) and Path(path).exists():
                        checkpoint = path
                        if row[metric] < best_metric:
                            log.warning("trial %s: best epoch's checkpoint was not kept; using "
                                        "epoch %s", tid, row.get("epoch"))
                        break
        run_id = children.get(tid)
        tag_status = None
        if uri and run_id:
            tag_status = runs.client(uri).get_run(run_id).data.tags.get(STATUS_TAG)
        if result.error is not None or tag_status == "errored":
            status = "errored"
        elif tag_status == "completed" or epochs >= _trial_epochs(result, max_epochs):
            status = "completed"
        else:
            status = "early_stopped"
        row = TrialRow(trial_id=tid, name=Path(str(result.path)).name,
                       params=dict((result.config or {}).get("params", {})), status=status,
                       epochs=epochs, best_metric=best_metric, best_epoch=best_epoch,
                       checkpoint=checkpoint, run_id=run_id, loop_seconds=loop_seconds,
                       error=None if result.error is None else str(result.error)[:500])
        rows.append(row)
        if uri and run_id:
            _finish_child(uri, run_id, row, metric)
    return sorted(rows, key=lambda r: r.trial_id.split("_")[-1])


def _trial_epochs(result: Any, default: int) -> int:
    return int((result.config or {}).get("params", {}).get("optim.epochs", default))


def _finish_child(uri: str, run_id: str, row: TrialRow, metric: str) -> None:
    from recsys.tracking import runs

    c = runs.client(uri)
    tags = {STATUS_TAG: row.status, "tune.epochs": str(row.epochs)}
    if row.checkpoint:
        tags["tune.best_checkpoint"] = row.checkpoint
    if row.best_epoch is not None:
        tags["tune.best_epoch"] = str(row.best_epoch)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)
    if row.best_metric is not None:
        # The spelling the loop logs its best score under (``best_valid_ndcg_at_10``), at the
        # trial's last epoch: one name per metric (recsys.tracking.metric_names).
        runs.log_metrics(uri, run_id, {f"best_{metric}": row.best_metric},
                         step=max(row.epochs - 1, 0))
    if c.get_run(run_id).info.status == "RUNNING":
        runs.end_run(uri, run_id, "FAILED" if row.status == "errored" else "FINISHED")


def write_results(cfg: SweepConfig, rows: list[TrialRow], out: Path) -> dict[str, Path]:
    """The result table (CSV, JSON, Markdown) and the plot."""
    from recsys.tuning.plots import plot_sweep

    out.mkdir(parents=True, exist_ok=True)
    keys = list(cfg.search_space)
    metric = cfg.metric.key
    files = {"csv": out / "trials.csv", "json": out / "trials.json", "md": out / "trials.md",
             "png": out / "sweep.png"}
    with files["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "status", *keys, metric, "best_epoch", "epochs", "loop_seconds",
                    "checkpoint"])
        for r in rows:
            w.writerow([r.trial_id, r.status, *[r.params.get(k) for k in keys], r.best_metric,
                        r.best_epoch, r.epochs, round(r.loop_seconds, 2), r.checkpoint])
    files["json"].write_text(json.dumps({"sweep": cfg.name, "metric": metric,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
    lines = [f"# Sweep `{cfg.name}`: {metric} (max)", "",
             "| trial | status | " + " | ".join(keys) + f" | {metric} | best epoch | epochs |",
             "|---|---|" + "---|" * len(keys) + "---|---|---|"]
    for r in rows:
        vals = " | ".join(_fmt(r.params.get(k)) for k in keys)
        lines.append(f"| {r.trial_id} | {r.status} | {vals} | {_fmt(r.best_metric)} | "
                     f"{r.best_epoch} | {r.epochs} |")
    files["md"].write_text("\n".join(lines) + "\n")
    log_keys = [k for k, s in cfg.search_space.items() if s.kind == "loguniform"]
    plot_sweep([asdict(r) for r in rows], keys, metric, files["png"], log_keys=log_keys)
    return files


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_outcome(out: SweepOutcome) -> str:
    """The summary a user reads at the end of ``recsys tune``."""
    lines = [f"sweep {out.name}: {len(out.rows)} trials ({count(out.rows, 'completed')} "
             f"completed, {count(out.rows, 'early_stopped')} early-stopped, "
             f"{count(out.rows, 'errored')} errored) in {out.fit_seconds:.0f}s"
             + (" (restored)" if out.restored else "")]
    lines.append(f"{'trial':<14}{'status':<15}{out.metric:>24}  params")
    for r in out.rows:
        metric = "-" if r.best_metric is None else f"{r.best_metric:.4f}"
        lines.append(f"{r.trial_id:<14}{r.status:<15}{metric:>24}  "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in r.params.items()))
    if out.best is not None:
        lines.append(f"best: {out.best.trial_id} {out.metric}={out.best.best_metric:.4f}; "
                     f"export {out.export_dir}")
    if out.registered:
        d = out.registered
        lines.append(f"registry: {d['name']} v{d['version']} "
                     + ("is @champion" if d["promoted"] else "stays a challenger")
                     + f" ({d['reason']})")
    lines.append(f"results: {out.files.get('md')}, plot {out.files.get('png')}"
                 + (f"; MLflow parent run {out.parent_run_id} at {out.tracking_uri}"
                    if out.parent_run_id else ""))
    return "\n".join(lines)
