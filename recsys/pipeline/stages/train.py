"""Training stages: ``pretrain`` on the pooled source platforms, then per target a scratch
baseline and one ``transfer`` run per strategy from the pretrained export.

A training key's inputs are its full train config (tracking aside), the lake fingerprints of
the platforms it reads and, for transfer, the pretrain fingerprint: new logs for a target
retrain that target only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recsys.config import load_config
from recsys.pipeline.context import Context, train_output_dir
from recsys.pipeline.outputs import TrainOutput
from recsys.pipeline.state import Recorded
from recsys.training.config import TrainJobConfig

TrainedRuns = dict[str, dict[str, Recorded[TrainOutput]]]
"""Target -> run label (``scratch`` or a strategy) -> its training run."""


def train_config(ctx: Context, yaml_path: str, name: str, overrides: Mapping[str, Any],
                 **fields: Any) -> TrainJobConfig:
    """A train job config from its YAML and the stage's dotted ``overrides``, with the
    pipeline's data, paths (``output_dir``: ``train_output_dir``) and tracking; ``fields``
    replace whole top-level keys last."""
    values = {**overrides, "name": name, "data": ctx.cfg.data.model_dump(),
              "output_dir": train_output_dir(ctx), "resume": False,
              "tracking.enabled": ctx.cfg.tracking, "tracking.experiment": ctx.cfg.name,
              **fields}
    return load_config(TrainJobConfig, yaml_path, values=values)


def train(ctx: Context, key: str, stage: str, cfg: TrainJobConfig,
          upstream: Mapping[str, str]) -> Recorded[TrainOutput]:
    """Run one training job unless its inputs are unchanged; returns its recorded outputs."""
    from recsys.cluster import init_ray
    from recsys.training.run import run_dir, run_training

    platforms = sorted(set(cfg.train_platforms or []) | set(cfg.eval_platforms or []))
    inputs = {"config": cfg.model_dump(mode="json", exclude={"tracking"}),
              **{f"lake/{p}": ctx.lake_fp(p) for p in platforms}, **upstream}
    export = run_dir(cfg) / "export"
    if ctx.needed(key, stage, inputs, [export / "export.json"], TrainOutput):
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        print(f"--- {key}: training {cfg.name} ({cfg.mode}) on {cfg.train_platforms}", flush=True)
        out = run_training(cfg)
        ctx.finish(key, TrainOutput(
            export=str(out.export_dir), best_valid_ndcg10=out.best_metric,
            report=str(out.export_dir.parent / "report" / "report.json"),
            mlflow_run_id=out.run_id, model_uri=out.model_uri, epochs=len(out.curve),
            seconds=out.seconds), out.seconds)
    return ctx.recorded(key, TrainOutput)


def stage_pretrain(ctx: Context) -> None:
    p = ctx.cfg.pretrain
    assert p is not None  # PipelineConfig refuses the stage without its section
    if ctx.cfg.federated.enabled:
        from recsys.pipeline.stages.federated import federated_pretrain

        ctx.result.pretrain = federated_pretrain(ctx, p.platforms)
        return
    cfg = train_config(ctx, p.config, "pretrain", p.overrides, mode="pretrain",
                       train_platforms=p.platforms, eval_platforms=p.platforms)
    ctx.result.pretrain = train(ctx, "pretrain", "pretrain", cfg, {})


def pretrained(ctx: Context) -> Recorded[TrainOutput]:
    """The pretrain run of this pipeline run, else the recorded one."""
    return ctx.result.pretrain or ctx.recorded("pretrain", TrainOutput)


def warm_start(ctx: Context, target: str) -> tuple[str, dict[str, str]]:
    """The export ``target``'s transfer runs start from, and its upstream fingerprint: with
    ``transfer.warm_start: champion`` the target's ``@champion`` (a new champion re-runs them),
    else, or without a champion yet, the pretrained model."""
    t = ctx.cfg.transfer
    assert t is not None
    if t.warm_start == "champion":
        from recsys.pipeline.context import tracking_uri
        from recsys.tracking.registry import CHAMPION, alias_version, download_export

        uri, name = tracking_uri(), ctx.cfg.model_name(target)
        version = alias_version(uri, name, CHAMPION)
        if version is not None:
            dst = ctx.cfg.root / "champions" / f"{name}-v{version}"
            found = sorted(dst.rglob("export.json")) if dst.is_dir() else []
            export = found[0].parent if found else download_export(uri, name, version, dst)
            print(f"--- transfer/{target}: warm start from {name}@champion (v{version})",
                  flush=True)
            return str(export), {"champion": f"{name}/{version}"}
        print(f"--- transfer/{target}: {name} has no @champion yet: warm start from the "
              "pretrained model instead", flush=True)
    pre = pretrained(ctx)
    return pre.output.export, {"pretrain": pre.fingerprint}


def stage_transfer(ctx: Context) -> None:
    t = ctx.cfg.transfer
    assert t is not None  # PipelineConfig refuses the stage without its section
    out: TrainedRuns = {}
    for target in t.targets:
        init_from, upstream = warm_start(ctx, target)
        runs: dict[str, Recorded[TrainOutput]] = {}
        if t.scratch_config:
            cfg = train_config(ctx, t.scratch_config, f"scratch-{target}", t.overrides,
                               mode="scratch", train_platforms=[target], eval_platforms=[target])
            runs["scratch"] = train(ctx, f"scratch/{target}", "transfer", cfg, {})
        for strategy in t.strategies:
            cfg = train_config(ctx, t.config, f"transfer-{strategy}-{target}", t.overrides,
                               mode="transfer", train_platforms=[target],
                               eval_platforms=[target],
                               transfer={"init_from": init_from, "strategy": strategy})
            runs[strategy] = train(ctx, f"transfer/{target}/{strategy}", "transfer", cfg,
                                   upstream)
        out[target] = runs
    ctx.result.transfer = out


def transfer_runs(ctx: Context) -> TrainedRuns:
    """Every target's scratch and transfer runs: from this pipeline run, else as recorded."""
    if ctx.result.transfer:
        return ctx.result.transfer
    t = ctx.cfg.transfer
    assert t is not None  # PipelineConfig refuses the stages that read it without the section
    out: TrainedRuns = {}
    for target in t.targets:
        keys = {"scratch": f"scratch/{target}"} if t.scratch_config else {}
        keys.update({s: f"transfer/{target}/{s}" for s in t.strategies})
        out[target] = {label: ctx.recorded(k, TrainOutput) for label, k in keys.items()}
    return out
