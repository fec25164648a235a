"""``run_sweep(cfg)``: a Ray Tune sweep of training runs, tracked in MLflow, ending in the registry.

Driver-side, in order: validate and budget resources; open (or, on restore, reopen) the sweep's
parent MLflow run; prepare the data once; ``Tuner.fit`` (or ``Tuner.restore`` of an interrupted
sweep: finished trials are not run again); then, from the result grid, the per-trial bookkeeping
(status, best checkpoint, child-run tags), the result table and plot, and the registry step: the
best trial's best checkpoint is exported, logged as a pyfunc model, registered as a new version
of the platform's model, and promoted to ``@champion`` only if it beats the champion on the same
validation data (``recsys.tracking.registry.promote_if_better``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.config import ConfigError
from recsys.training.config import TrainJobConfig
from recsys.tuning.config import ParamSpec, SweepConfig, trial_config, validate_sweep
from recsys.tuning.janitor import PlacementGroupJanitor
from recsys.tuning.trial import (
    STATUS_TAG,
    TrialContext,
    build_trial_config,
    find_child_runs,
    prepare_signature,
    run_trial,
    setup_for,
    trial_name,
)

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
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


def registry_platform(cfg: SweepConfig, base: TrainJobConfig) -> str:
    """The platform whose registered model the sweep updates."""
    if cfg.registry.platform:
        return cfg.registry.platform
    if cfg.metric.platform:
        return cfg.metric.platform
    evals = base.eval_platforms or base.train_platforms or []
    if len(evals) == 1:
        return evals[0]
    raise ConfigError(f"sweep {cfg.name!r}: set registry.platform or metric.platform (the base "
                      f"config evaluates {evals or 'every platform'})")


def trial_resources(cfg: SweepConfig, base: TrainJobConfig) -> dict[str, float]:
    """What one trial's training run holds: workers x (CPU, GPU)."""
    probe = trial_config(base, {}, name="probe", output_dir=cfg.output_dir,
                         resources=cfg.resources, resume=False)
    s = probe.scaling
    per_worker_cpu = 1.0 if s.use_gpu else s.cpus_per_worker  # build_trainer's GPU default
    return {"CPU": s.num_workers * per_worker_cpu, "GPU": float(s.num_workers if s.use_gpu else 0)}


def check_fits(cfg: SweepConfig, base: TrainJobConfig, cluster: dict[str, float]) -> None:
    """Concurrent trials must fit the cluster at once, or trials deadlock waiting for workers
    (``WorkerGroupStartupTimeoutError``, STACK_NOTES); fail before starting with the numbers."""
    need = trial_resources(cfg, base)
    concurrent = min(cfg.max_concurrent_trials, cfg.num_samples * _grid_size(cfg))
    cpu = concurrent * (need["CPU"] + cfg.resources.trial_cpu) + cfg.resources.cpu_reserve
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    problems = []
    if cpu > have_cpu + 1e-9:
        problems.append(
            f"{concurrent} concurrent trial(s) x ({need['CPU']:g} worker CPUs + "
            f"{cfg.resources.trial_cpu:g} trial CPU) + {cfg.resources.cpu_reserve:g} reserved "
            f"= {cpu:g} CPUs, the cluster has {have_cpu:g}: lower max_concurrent_trials, "
            "resources.num_workers or resources.cpus_per_worker")
    if concurrent * need["GPU"] > have_gpu:
        problems.append(f"{concurrent} concurrent trial(s) x {need['GPU']:g} GPUs, the cluster "
                        f"has {have_gpu:g}")
    if problems:
        raise ConfigError(f"sweep {cfg.name!r} does not fit: " + "; ".join(problems))


def _grid_size(cfg: SweepConfig) -> int:
    return math.prod(len(s.values or []) for s in cfg.search_space.values() if s.kind == "grid")


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    def dim(spec: ParamSpec) -> Any:
        if spec.kind == "loguniform":
            return tune.loguniform(spec.low, spec.high)
        if spec.kind == "uniform":
            return tune.uniform(spec.low, spec.high)
        if spec.kind == "randint":
            return tune.randint(int(spec.low or 0), int(spec.high or 0))
        if spec.kind == "choice":
            return tune.choice(list(spec.values or []))
        return tune.grid_search(list(spec.values or []))

    return {"params": {key: dim(spec) for key, spec in cfg.search_space.items()}}


def _max_epochs(cfg: SweepConfig, base: TrainJobConfig) -> int:
    spec = cfg.search_space.get("optim.epochs")
    if spec is None:
        return base.optim.epochs
    return int(max(spec.probe_values()))


def _tune_config(cfg: SweepConfig, base: TrainJobConfig) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler: Any = FIFOScheduler()
    if cfg.scheduler.kind == "asha":
        # max_t one past the last epoch: ASHA "stops" a trial at max_t, which would end the
        # trial's actor (and its Train controller) just as the run finishes on its own.
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=_max_epochs(cfg, base) + 1,
                                  grace_period=cfg.scheduler.grace_period,
                                  reduction_factor=cfg.scheduler.reduction_factor)
    search_alg = None
    if cfg.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - optuna is in the project's deps
            raise ConfigError("search.algorithm=optuna needs `pip install optuna`") from exc
        search_alg = OptunaSearch(seed=cfg.search.seed)
    return tune.TuneConfig(metric=cfg.metric.key, mode="max", num_samples=cfg.num_samples,
                           max_concurrent_trials=cfg.max_concurrent_trials, scheduler=scheduler,
                           search_alg=search_alg,
                           # Reusing trial actors saved ~3 s per trial in a smoke run, but the
                           # full bench sweep then hung after its last trial's last epoch.
                           reuse_actors=False)


def _read_state(sweep_dir: Path) -> dict[str, Any] | None:
    path = sweep_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(sweep_dir / STATE_FILE)


def run_sweep(cfg: SweepConfig, source: str = "<sweep>") -> SweepOutcome:
    """Run (or continue) the sweep and update the registry; see the module docstring."""
    from ray import tune

    from recsys.cluster import init_ray
    from recsys.settings import get_settings
    from recsys.tracking import runs
    from recsys.tracking.server import ensure_experiment, ensure_tracking
    from recsys.training.trainer import prepare, training_datasets

    started = time.perf_counter()
    base = validate_sweep(cfg, source)
    platform = registry_platform(cfg, base) if cfg.registry.enabled else None
    sweep_dir = cfg.sweep_dir().resolve()
    exp_dir = sweep_dir / TUNE_DIR
    trials_dir = sweep_dir / TRIALS_DIR
    state = _read_state(sweep_dir)
    if not cfg.resume and sweep_dir.exists():
        log.warning("resume=false: removing the previous sweep at %s", sweep_dir)
        shutil.rmtree(sweep_dir)
        state = None
    if state and state.get("status") == "completed":
        raise ConfigError(f"sweep {cfg.name!r} already completed at {sweep_dir}; use another "
                          "name, or resume=false to run it again from scratch")
    init_ray()
    import ray

    check_fits(cfg, base, ray.cluster_resources())
    restoring = exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir))

    uri = parent = None
    if base.tracking.enabled:
        uri = ensure_tracking(get_settings())
        ensure_experiment(uri, cfg.experiment)  # once on the driver, before trials race on it
        if restoring and state and state.get("uri") == uri and state.get("parent_run_id"):
            parent = str(state["parent_run_id"])
            runs.client(uri).update_run(parent, status="RUNNING")
        else:
            parent = runs.start_run(uri, cfg.experiment, cfg.name,
                                    tags={"kind": "sweep", "sweep": cfg.name,
                                          "scheduler": cfg.scheduler.kind,
                                          "search": cfg.search.algorithm})
            runs.log_config(uri, parent, {"sweep": cfg.model_dump(mode="json"),
                                          "base": base.model_dump(mode="json")})
            runs.log_system_info(uri, parent)
    _write_state(sweep_dir, {"name": cfg.name, "status": "running", "uri": uri,
                             "parent_run_id": parent, "source": source})

    probe = trial_config(base, {}, name=trial_name(cfg.name, "shared"),
                         output_dir=str(trials_dir), resources=cfg.resources, resume=False)
    # Once: trials with the same data inputs reuse the prepared items and the datasets read
    # into the object store (a read is ~10-20 s of Ray Data start-up per trial on 2 cores).
    shared = prepare(probe)
    shared = dataclasses.replace(shared, datasets=training_datasets(shared))
    ctx = TrialContext(sweep_name=cfg.name, base=base.model_dump(mode="json"),
                       resources=cfg.resources.model_dump(mode="json"),
                       trials_dir=str(trials_dir), prepare_signature=prepare_signature(probe),
                       uri=uri, experiment=cfg.experiment, parent_run_id=parent)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, shared=shared),
                                    {"CPU": cfg.resources.trial_cpu})
    if restoring:
        log.info("restoring the interrupted sweep at %s (finished trials are kept)", exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(cfg),
                           tune_config=_tune_config(cfg, base),
                           run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir),
                                                     failure_config=tune.FailureConfig(
                                                         max_failures=0),
                                                     verbose=1))
    t0, fit_started_at = time.perf_counter(), time.time()
    with PlacementGroupJanitor(cfg.resources.trial_cpu):
        grid = tuner.fit()
    fit_seconds = time.perf_counter() - t0

    rows = collect_rows(grid, cfg.metric.key, uri, parent, base.optim.epochs)
    outcome = SweepOutcome(cfg.name, sweep_dir, cfg.metric.key, rows, None, restoring,
                           fit_seconds, 0.0, uri, parent, fit_started_at=fit_started_at)
    scored = [r for r in rows if r.best_metric is not None and r.checkpoint]
    outcome.best = max(scored, key=lambda r: r.best_metric or 0.0) if scored else None
    outcome.files = write_results(cfg, rows, sweep_dir / "results")
    if uri and parent:
        runs.log_artifacts(uri, parent, sweep_dir / "results", "results")
    if outcome.best is not None and cfg.registry.enabled and platform:
        outcome.export_dir, outcome.registered = register_best(cfg, ctx, shared, outcome.best,
                                                               platform, uri, parent)
    outcome.total_seconds = time.perf_counter() - started
    if uri and parent:
        summary = {"trials": len(rows), "trials_completed": _count(rows, "completed"),
                   "trials_early_stopped": _count(rows, "early_stopped"),
                   "trials_errored": _count(rows, "errored"), "sweep_fit_seconds": fit_seconds,
                   "sweep_total_seconds": outcome.total_seconds}
        if outcome.best is not None:
            summary[f"best_{cfg.metric.key}"] = float(outcome.best.best_metric or 0.0)
            runs.client(uri).set_tag(parent, "best_trial", outcome.best.trial_id)
        runs.log_metrics(uri, parent, summary, step=0)
        runs.end_run(uri, parent, "FINISHED" if scored else "FAILED")
    _write_state(sweep_dir, {"name": cfg.name, "status": "completed" if scored else "failed",
                             "uri": uri, "parent_run_id": parent, "source": source,
                             "best_trial": outcome.best.trial_id if outcome.best else None,
                             "registered": outcome.registered})
    if not scored:
        raise RuntimeError(f"sweep {cfg.name!r}: no trial reported a checkpoint; see "
                           f"{outcome.files.get('md')} and the trial errors")
    return outcome


def _count(rows: list[TrialRow], status: str) -> int:
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
        row = TrialRow(trial_id=tid, name=trial_name_from(result, tid),
                       params=dict((result.config or {}).get("params", {})), status=status,
                       epochs=epochs, best_metric=best_metric, best_epoch=best_epoch,
                       checkpoint=checkpoint, run_id=run_id, loop_seconds=loop_seconds,
                       error=None if result.error is None else str(result.error)[:500])
        rows.append(row)
        if uri and run_id:
            _finish_child(uri, run_id, row)
    return sorted(rows, key=lambda r: r.trial_id.split("_")[-1])


def _trial_epochs(result: Any, default: int) -> int:
    return int((result.config or {}).get("params", {}).get("optim.epochs", default))


def trial_name_from(result: Any, tid: str) -> str:
    return Path(str(result.path)).name


def _finish_child(uri: str, run_id: str, row: TrialRow) -> None:
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
        runs.log_metrics(uri, run_id, {"tune_best_metric": row.best_metric}, step=row.epochs)
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


def register_best(cfg: SweepConfig, ctx: TrialContext, shared: Any, best: TrialRow,
                  platform: str, uri: str | None, parent: str | None
                  ) -> tuple[Path, dict[str, Any] | None]:
    """Export the best trial's best checkpoint; with tracking, log it as a pyfunc model in the
    trial's run, register it and let ``promote_if_better`` decide on ``@champion``."""
    from recsys.model.pyfunc import RecommenderPyfunc
    from recsys.tracking import registry, runs
    from recsys.training.run import export_checkpoint

    assert best.checkpoint is not None
    trial_cfg = build_trial_config(ctx, best.params, best.trial_id)
    setup = setup_for(trial_cfg, shared, ctx.prepare_signature)
    out = cfg.sweep_dir().resolve() / "best" / "export"
    export = export_checkpoint(setup, Path(best.checkpoint), out,
                               {cfg.metric.key: best.best_metric or 0.0,
                                "best_epoch": best.best_epoch or 0})
    if not (uri and best.run_id):
        return export, None
    model_uri = runs.log_pyfunc_model(uri, best.run_id, RecommenderPyfunc(),
                                      artifacts={"export": str(export)}, name="model")
    name = cfg.registry.model_name or registry.default_model_name(platform)
    version = runs.register_model(uri, model_uri, name, tags={
        "sweep": cfg.name, "trial_id": best.trial_id, "sweep_run_id": parent,
        "metric": cfg.metric.key, "trial_best_metric": f"{best.best_metric:.6f}"})
    scorer = registry.valid_scorer(setup.example_set, platform, cfg.metric.name)
    decision = registry.promote_if_better(uri, name, version, scorer, platform=platform,
                                          metric=f"valid_{cfg.metric.name}",
                                          challenger_export=export,
                                          min_improvement=cfg.registry.min_improvement)
    if parent:
        c = runs.client(uri)
        c.set_tag(parent, "registry.model", name)
        c.set_tag(parent, "registry.version", version)
        c.set_tag(parent, "registry.promoted", str(decision.promoted).lower())
        c.set_tag(parent, "registry.decision", decision.reason[:4000])
    return export, decision.to_dict()


def format_outcome(out: SweepOutcome) -> str:
    """The summary a user reads at the end of ``recsys tune``."""
    lines = [f"sweep {out.name}: {len(out.rows)} trials ({_count(out.rows, 'completed')} "
             f"completed, {_count(out.rows, 'early_stopped')} early-stopped, "
             f"{_count(out.rows, 'errored')} errored) in {out.fit_seconds:.0f}s"
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
