"""One Tune trial = one training run: the trial function builds the job's ``TorchTrainer`` with
``build_trainer`` (Ray Train V2 under Tune) and fits it; ``TuneReportCallback`` forwards rank 0's
per-epoch report (and its checkpoint path) to Tune, so ASHA sees every epoch.

The trial function is the driver of its training run: it owns the trial's MLflow child run
(rank 0 logs the per-epoch metrics into it). Whatever needs the whole sweep (status of stopped
trials, best checkpoints, the registry) is done by the sweep driver after ``Tuner.fit``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.training.config import TrainJobConfig
from recsys.training.trainer import TrainSetup
from recsys.tuning.config import ResourcesConfig, trial_config

TRIAL_TAG = "tune.trial_id"
STATUS_TAG = "tune.trial_status"
STARTS_FILE = "trial_starts.jsonl"
TIMELINE_FILE = "trial_timeline.jsonl"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs from the driver, by value (no module globals on workers)."""

    sweep_name: str
    base: dict[str, Any]
    resources: dict[str, Any]
    trials_dir: str
    prepare_signature: str
    uri: str | None
    experiment: str
    parent_run_id: str | None


def trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def prepare_signature(cfg: TrainJobConfig) -> str:
    """The config fields ``prepare()`` depends on: trials that agree on them share the driver's
    prepared setup (example set, item inputs, transfer init) instead of preparing again."""
    return json.dumps({
        "data": cfg.data.model_dump(mode="json"), "mode": cfg.mode,
        "init_from": cfg.transfer.init_from if cfg.mode == "transfer" else None,
        "train": cfg.train_platforms, "eval": cfg.eval_platforms,
        "finetunes_encoder": cfg.finetunes_encoder, "cache": cfg.encoder.cache_dir,
        "user_fraction": cfg.user_fraction, "seed": cfg.optim.seed}, sort_keys=True)


def build_trial_config(ctx: TrialContext, params: dict[str, Any], trial_id: str) -> TrainJobConfig:
    name = trial_name(ctx.sweep_name, trial_id)
    resumed = (Path(ctx.trials_dir) / name).exists()  # a restored sweep continues this run
    return trial_config(TrainJobConfig.model_validate(ctx.base), params, name=name,
                        output_dir=ctx.trials_dir,
                        resources=ResourcesConfig.model_validate(ctx.resources), resume=resumed)


def setup_for(cfg: TrainJobConfig, shared: TrainSetup | None, signature: str) -> TrainSetup:
    from recsys.training.trainer import prepare

    if shared is None or prepare_signature(cfg) != signature:
        return prepare(cfg)
    return dataclasses.replace(shared, cfg=cfg)


def child_run(ctx: TrialContext, trial_id: str, cfg: TrainJobConfig,
              params: dict[str, Any]) -> str | None:
    """The trial's MLflow run under the sweep's parent run; a restored trial finds its own."""
    if ctx.uri is None or ctx.parent_run_id is None:
        return None
    from recsys.tracking import runs

    found = find_child_runs(ctx.uri, ctx.parent_run_id).get(trial_id)
    if found is not None:
        runs.client(ctx.uri).update_run(found, status="RUNNING")
        return found
    run_id = runs.start_run(ctx.uri, ctx.experiment, cfg.name, parent_run_id=ctx.parent_run_id,
                            tags={TRIAL_TAG: trial_id, STATUS_TAG: "running",
                                  "sweep": ctx.sweep_name, "mode": cfg.mode,
                                  "strategy": cfg.transfer.strategy})
    runs.log_config(ctx.uri, run_id, cfg.model_dump(mode="json"))
    runs.client(ctx.uri).log_dict(run_id, params, "sampled_params.json")
    return run_id


def find_child_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> run id of the sweep's child runs."""
    from recsys.tracking import runs

    c = runs.client(uri)
    parent = c.get_run(parent_run_id)
    found = c.search_runs([parent.info.experiment_id],
                          filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                          max_results=10_000)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in found if TRIAL_TAG in r.data.tags}


def run_trial(config: dict[str, Any], ctx: TrialContext, shared: TrainSetup | None) -> None:
    """The Tune trainable (wrapped by ``tune.with_parameters`` / ``with_resources``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from recsys.tracking import runs
    from recsys.training.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    params = dict(config["params"])
    cfg = build_trial_config(ctx, params, trial_id)
    _record_start(ctx, trial_id, cfg)
    setup = setup_for(cfg, shared, ctx.prepare_signature)
    run_id = child_run(ctx, trial_id, cfg, params)
    tracking = {"uri": ctx.uri, "run_id": run_id} if run_id else None
    trainer = build_trainer(cfg, setup, tracking, callbacks=[TuneReportCallback()])
    _record_event(ctx, trial_id, "fit_start")
    try:
        trainer.fit()
    except BaseException as exc:
        # Not tagged "errored" here: when ASHA stops a trial, Tune raises SystemExit (or tears
        # the trial's actors down) inside fit, which is no error. Tune records real errors in
        # the trial's result; the sweep driver reads them and ends the child run accordingly.
        if run_id:
            runs.client(ctx.uri).set_tag(run_id, "tune.trial_exception", type(exc).__name__)
        raise
    _record_event(ctx, trial_id, "fit_end")
    if run_id:
        runs.client(ctx.uri).set_tag(run_id, STATUS_TAG, "completed")


def _record_start(ctx: TrialContext, trial_id: str, cfg: TrainJobConfig) -> None:
    """One line per trial start: shows that a restored sweep did not run a finished trial again."""
    path = Path(ctx.trials_dir) / STARTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"trial_id": trial_id, "name": cfg.name, "resume": cfg.resume,
                             "time": time.time()}) + "\n")


def _record_event(ctx: TrialContext, trial_id: str, event: str) -> None:
    """Wall-clock marks of a trial's phases (``bench/tune.py`` splits the overhead with them)."""
    with (Path(ctx.trials_dir) / TIMELINE_FILE).open("a") as fh:
        fh.write(json.dumps({"trial_id": trial_id, "event": event, "time": time.time()}) + "\n")
