"""Registry stages: ``sweep`` (a Tune sweep of transfer runs whose best trial is registered)
and ``register`` (each target's best run registered). Either way a new version becomes
``@champion`` only if it beats the current one re-evaluated on the same validation data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recsys.config import load_config
from recsys.pipeline.context import Context, tracking_uri
from recsys.pipeline.outputs import RegisterOutput, SweepOutput
from recsys.pipeline.stages.train import pretrained, transfer_runs
from recsys.tracking.registry import Decision


def stage_sweep(ctx: Context) -> None:
    """A small Tune sweep of transfer runs for every target; each registers its best trial."""
    t = ctx.cfg.transfer
    assert t is not None  # PipelineConfig refuses the stage without its section
    for target in t.targets:
        _sweep(ctx, target)


def _sweep(ctx: Context, target: str) -> None:
    from recsys.tuning.config import SweepConfig
    from recsys.tuning.sweep import run_sweep

    t, sw = ctx.cfg.transfer, ctx.cfg.sweep
    assert t is not None
    pre = pretrained(ctx)
    probe = load_config(SweepConfig, sw.config, values=sw.overrides)
    # The trials' base config: the sweep's own, then this pipeline's data, target and
    # pretrained model, then the stage overrides (typed values, applied in this order).
    base: dict[str, Any] = {
        **probe.base_values, "data": ctx.cfg.data.model_dump(mode="json"),
        "train_platforms": [target], "eval_platforms": [target],
        "transfer.init_from": pre.output.export, **t.overrides, **sw.train_overrides}
    inputs = {"sweep": probe.model_dump(mode="json", exclude={"name", "output_dir"}),
              "base": base, "pretrain": pre.fingerprint, f"lake/{target}": ctx.lake_fp(target)}
    key = f"sweep/{target}"
    if ctx.needed(key, "sweep", inputs, [], SweepOutput):
        digest = ctx.pending[key].fingerprint
        cfg = probe.model_copy(update={
            # One sweep per set of inputs: an interrupted one resumes, a changed one starts anew.
            "name": f"{ctx.cfg.name}-{target}-{digest[:8]}", "base_values": base,
            "output_dir": str(ctx.cfg.root / "tune"), "experiment": ctx.cfg.name,
            "resume": True,
            "registry": probe.registry.model_copy(update={
                "enabled": True, "platform": target, "model_name": ctx.cfg.model_name(target)})})
        started = time.perf_counter()
        out = run_sweep(SweepConfig.model_validate(cfg.model_dump()), sw.config)
        ctx.finish(key, SweepOutput(
            sweep_dir=str(out.sweep_dir),
            export=str(out.export_dir) if out.export_dir else None,
            best_trial=out.best.trial_id if out.best else None,
            best_metric=out.best.best_metric if out.best else None,
            trials=len(out.rows),
            registered=Decision(**out.registered) if out.registered else None,
            table=str(out.files.get("md", ""))), time.perf_counter() - started)
    swept = ctx.recorded(key, SweepOutput).output
    ctx.result.sweep[target] = swept
    print(f"sweep {target}: {swept.trials} trials, best {_fmt(swept.best_metric)}; registry: "
          f"{swept.registered.reason if swept.registered else '-'}")


def stage_register(ctx: Context) -> None:
    """Register each target's best run (scratch or transfer, by validation NDCG@10)."""
    from recsys.data.examples import load_example_set
    from recsys.tracking import registry
    from recsys.tracking.challenger import register_challenger

    uri = tracking_uri()
    es = load_example_set(ctx.cfg.data.examples)
    out: dict[str, RegisterOutput] = {}
    for target, candidates in transfer_runs(ctx).items():
        logged = {label: r for label, r in candidates.items() if r.output.model_uri}
        if not logged:
            raise RuntimeError(f"no run for {target} logged a model to MLflow (tracking off?)")
        label, best = max(logged.items(), key=lambda kv: kv[1].output.best_valid_ndcg10)
        name = ctx.cfg.model_name(target)
        key = f"register/{target}"
        inputs = {"candidate": best.fingerprint, "name": name,
                  "min_improvement": ctx.cfg.registry.min_improvement,
                  **({"canary": True} if ctx.cfg.registry.canary else {})}
        if ctx.needed(key, "register", inputs, [], RegisterOutput):
            started = time.perf_counter()
            assert best.output.model_uri is not None  # only logged runs are candidates
            # @challenger until the gate below decides (with its description and test metrics)
            version = register_challenger(
                uri, best.output.model_uri, name, Path(best.output.export), platform=target,
                tags={"pipeline": ctx.cfg.name, "run": label,
                      "mlflow_run_id": best.output.mlflow_run_id})
            gate = registry.promote_if_better
            if ctx.cfg.registry.canary is not None:  # better offline: @challenger, canary next
                from recsys.production.gate import offline_gate as gate
            decision = gate(
                uri, name, version, registry.valid_scorer(es, target), platform=target,
                challenger_export=Path(best.output.export),
                min_improvement=ctx.cfg.registry.min_improvement)
            ctx.finish(key, RegisterOutput(
                name=name, version=version, run=label, promoted=decision.promoted,
                reason=decision.reason,
                champion=registry.alias_version(uri, name, registry.CHAMPION)),
                time.perf_counter() - started)
        out[target] = r = ctx.recorded(key, RegisterOutput).output
        print(f"register {target}: {r.name} v{r.version} ({r.run}) "
              f"{'promoted to @champion' if r.promoted else 'kept as challenger'}: "
              f"{r.reason}")
    ctx.result.register = out


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"
