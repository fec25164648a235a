"""``run_sweep(cfg)``: a Ray Tune sweep of training runs, tracked in MLflow, ending in the registry.

Driver-side, in order: validate and budget resources; open (or, on restore, reopen) the sweep's
parent MLflow run; prepare the data once; ``Tuner.fit`` (or ``Tuner.restore`` of an interrupted
sweep: finished trials are not run again); then, from the result grid, the per-trial bookkeeping
(status, best checkpoint, child-run tags; ``recsys.tuning.results``), the result table and plot,
and the registry step: the best trial's best checkpoint is exported, logged as a pyfunc model,
registered as a new version of the platform's model, and promoted to ``@champion`` only if it
beats the champion on the same validation data (``recsys.tracking.registry.promote_if_better``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from recsys.config import ConfigError
from recsys.logs import stdout_to_log
from recsys.settings import Settings, get_settings
from recsys.training.config import TrainJobConfig
from recsys.tuning.config import ParamSpec, SweepConfig, trial_config, validate_sweep
from recsys.tuning.janitor import PlacementGroupJanitor
from recsys.tuning.results import (
    SweepOutcome,
    TrialRow,
    collect_rows,
    count,
    format_outcome,
    write_results,
)
from recsys.tuning.trial import (
    TrialContext,
    build_trial_config,
    prepare_signature,
    run_trial,
    setup_for,
    trial_name,
)

# Re-exported: callers import the sweep's result types from here too.
__all__ = ["STATE_FILE", "SweepOutcome", "TrialRow", "check_fits", "format_outcome",
           "param_space", "registry_platform", "run_sweep", "trial_resources", "tune_storage",
           "write_results"]

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"


class SweepState(BaseModel):
    """``sweep.json`` beside the sweep: what a later run of the same sweep reads to continue it
    (the parent MLflow run) or to refuse it (already completed)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    status: Literal["running", "completed", "failed"]
    uri: str | None = None
    parent_run_id: str | None = None
    source: str = "<sweep>"
    best_trial: str | None = None
    registered: dict[str, Any] | None = None


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


def _read_state(sweep_dir: Path) -> SweepState | None:
    path = sweep_dir / STATE_FILE
    return SweepState.model_validate_json(path.read_text()) if path.exists() else None


def _write_state(sweep_dir: Path, state: SweepState) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / (STATE_FILE + ".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(sweep_dir / STATE_FILE)


def tune_storage(cfg: SweepConfig, settings: Settings) -> str:
    """Tune's ``storage_path`` for the sweep (the experiment is ``<it>/tune``): the settings'
    ``RECSYS_STORAGE_PATH/<name>`` (shared or cloud storage, so a restarted driver on another
    machine can restore it), else the sweep's own directory."""
    root = settings.storage_path
    if not root:
        return str(cfg.sweep_dir().resolve())
    if "://" in root:
        return f"{root.rstrip('/')}/{cfg.name}"
    return str(Path(root).resolve() / cfg.name)


def _restorable(experiment: str) -> bool:
    from ray import tune

    local = "://" not in experiment
    return (not local or Path(experiment).exists()) and tune.Tuner.can_restore(experiment)


def run_sweep(cfg: SweepConfig, source: str = "<sweep>") -> SweepOutcome:
    """Run (or continue) the sweep and update the registry; see the module docstring."""
    from ray import tune

    from recsys.cluster import init_ray
    from recsys.tracking import runs
    from recsys.tracking.server import ensure_experiment, ensure_tracking
    from recsys.training.trainer import prepare, training_datasets

    started = time.perf_counter()
    base = validate_sweep(cfg, source)
    platform = registry_platform(cfg, base) if cfg.registry.enabled else None
    settings = get_settings()
    sweep_dir = cfg.sweep_dir().resolve()
    storage = tune_storage(cfg, settings)
    experiment = f"{storage}/{TUNE_DIR}"
    trials_dir = sweep_dir / TRIALS_DIR
    state = _read_state(sweep_dir)
    if not cfg.resume and sweep_dir.exists():
        log.warning("resume=false: removing the previous sweep at %s", sweep_dir)
        shutil.rmtree(sweep_dir)
        state = None
    if state and state.status == "completed":
        raise ConfigError(f"sweep {cfg.name!r} already completed at {sweep_dir}; use another "
                          "name, or resume=false to run it again from scratch")
    init_ray()
    import ray

    check_fits(cfg, base, ray.cluster_resources())
    # Only a sweep whose own state survived: with storage outside the sweep's directory, an
    # experiment that resume=false left behind there is not picked up again.
    restoring = state is not None and _restorable(experiment)

    uri = parent = None
    if base.tracking.enabled:
        uri = ensure_tracking(settings)
        ensure_experiment(uri, cfg.experiment)  # once on the driver, before trials race on it
        if restoring and state and state.uri == uri and state.parent_run_id:
            parent = state.parent_run_id
            runs.client(uri).update_run(parent, status="RUNNING")
        else:
            parent = runs.start_run(uri, cfg.experiment, cfg.name,
                                    tags={"kind": "sweep", "sweep": cfg.name,
                                          "scheduler": cfg.scheduler.kind,
                                          "search": cfg.search.algorithm})
            runs.log_config(uri, parent, {"sweep": cfg.model_dump(mode="json"),
                                          "base": base.model_dump(mode="json")})
            runs.log_system_info(uri, parent)
    _write_state(sweep_dir, SweepState(name=cfg.name, status="running", uri=uri,
                                       parent_run_id=parent, source=source))

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
        log.info("restoring the interrupted sweep at %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(cfg),
                           tune_config=_tune_config(cfg, base),
                           run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage,
                                                     failure_config=tune.FailureConfig(
                                                         max_failures=0),
                                                     verbose=1))
    t0, fit_started_at = time.perf_counter(), time.time()
    with PlacementGroupJanitor(cfg.resources.trial_cpu), stdout_to_log():
        grid = tuner.fit()  # Tune's status tables: to the job's log file, if it has one
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
        summary = {"trials": len(rows), "trials_completed": count(rows, "completed"),
                   "trials_early_stopped": count(rows, "early_stopped"),
                   "trials_errored": count(rows, "errored"), "sweep_fit_seconds": fit_seconds,
                   "sweep_total_seconds": outcome.total_seconds}
        if outcome.best is not None:
            summary[f"best_{cfg.metric.key}"] = float(outcome.best.best_metric or 0.0)
            runs.client(uri).set_tag(parent, "best_trial", outcome.best.trial_id)
        runs.log_metrics(uri, parent, summary, step=0)
        runs.end_run(uri, parent, "FINISHED" if scored else "FAILED")
    _write_state(sweep_dir, SweepState(
        name=cfg.name, status="completed" if scored else "failed", uri=uri,
        parent_run_id=parent, source=source,
        best_trial=outcome.best.trial_id if outcome.best else None,
        registered=outcome.registered))
    if not scored:
        raise RuntimeError(f"sweep {cfg.name!r}: no trial reported a checkpoint; see "
                           f"{outcome.files.get('md')} and the trial errors")
    return outcome


def register_best(cfg: SweepConfig, ctx: TrialContext, shared: Any, best: TrialRow,
                  platform: str, uri: str | None, parent: str | None
                  ) -> tuple[Path, dict[str, Any] | None]:
    """Export the best trial's best checkpoint; with tracking, log it as a pyfunc model in the
    trial's run, register it and let ``promote_if_better`` decide on ``@champion``."""
    from recsys.tracking import registry, runs
    from recsys.tracking.challenger import register_challenger
    from recsys.tracking.metric_names import mlflow_key
    from recsys.training.run import export_checkpoint

    assert best.checkpoint is not None
    trial_cfg = build_trial_config(ctx, best.params, best.trial_id)
    setup = setup_for(trial_cfg, shared, ctx.prepare_signature)
    out = cfg.sweep_dir().resolve() / "best" / "export"
    export = export_checkpoint(setup, Path(best.checkpoint), out,
                               {cfg.metric.key: best.best_metric or 0.0,
                                "epoch": best.best_epoch or 0})
    if not (uri and best.run_id):
        return export, None
    # At the best epoch: the LoggedModel carries that epoch's metrics of the trial's run.
    model_uri = runs.log_recommender(uri, best.run_id, export, step=best.best_epoch or 0)
    name = cfg.registry.model_name or registry.default_model_name(platform)
    version = register_challenger(uri, model_uri, name, export, platform=platform, tags={
        "sweep": cfg.name, "trial_id": best.trial_id, "sweep_run_id": parent,
        "metric": mlflow_key(cfg.metric.key), "trial_best_metric": f"{best.best_metric:.6f}"})
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
