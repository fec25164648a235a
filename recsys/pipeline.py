"""The end-to-end job: ingest -> examples -> pretrain -> transfer (+ scratch baselines) ->
evaluate -> sweep -> register -> deploy -> smoke.

Each stage is a function of its config and of what earlier stages recorded. A stage runs only
when the fingerprint of its inputs (its config plus the content of what it reads, see
:mod:`recsys.fingerprint`) differs from the one recorded at its last success, so a second run
with nothing new does nothing, and new logs for one platform re-run only what reads that
platform. ``stages`` picks stages, ``skip`` leaves some out, ``force`` re-runs them anyway;
a stage run alone takes its inputs from the record of the earlier ones.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from recsys.config import StrictModel, load_config
from recsys.data.ingest.runner import IngestOptions
from recsys.data.examples import DataConfig
from recsys.fingerprint import PipelineState, hash_json, hash_tree, lake_platform_fingerprint
from recsys.training.config import Strategy, TrainJobConfig

log = logging.getLogger(__name__)

Stage = Literal["ingest", "examples", "pretrain", "transfer", "evaluate", "sweep", "register",
                "deploy", "smoke"]
STAGES: tuple[str, ...] = get_args(Stage)


class IngestSource(IngestOptions):
    """One `recsys ingest` run of the pipeline; ``out`` defaults to ``data.lake``."""

    out: Path | None = None  # type: ignore[assignment]


class RayConfig(StrictModel):
    num_cpus: int | None = None
    """Logical CPUs of a locally started cluster (ignored when joining one)."""
    keep_alive: bool = True
    """With the deploy stage and no cluster address: start a ``ray start --head`` cluster on
    127.0.0.1 that outlives the job, so the endpoint keeps answering (stop: ``make stop``)."""


class PretrainStage(StrictModel):
    config: str = "configs/train/pretrain.yaml"
    """Train job YAML; the pipeline sets name, mode, data and output_dir."""
    platforms: list[str] = Field(min_length=1)
    """Source platforms pooled for pretraining."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted train-config overrides, e.g. ``{optim.epochs: 5}``."""


class TransferStage(StrictModel):
    config: str = "configs/train/transfer.yaml"
    scratch_config: str | None = "configs/train/scratch.yaml"
    """The baseline every transfer is compared with (None: no baseline)."""
    targets: list[str] = Field(min_length=1)
    strategies: list[Strategy] = Field(default_factory=lambda: ["freeze_encoder"], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides applied to transfer and scratch runs alike."""


class EvaluateStage(StrictModel):
    split: Literal["valid", "test"] = "test"


class SweepStage(StrictModel):
    config: str = "tune/sweeps/demo_transfer.yaml"
    """Sweep YAML; the pipeline points its trials at its example set and pretrained model,
    and registers the best trial for ``transfer.targets[0]``."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted sweep-config overrides, e.g. ``{num_samples: 2}``."""
    train_overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted train-config overrides for every trial (before the sampled values)."""


class RegisterStage(StrictModel):
    model_name: str = "recsys-{platform}"
    """Registered model per target platform."""
    min_improvement: float = Field(0.0, ge=0)
    """A challenger must beat the champion's validation NDCG@10 by more than this."""


class DeployStage(StrictModel):
    config: str = "serve/config.yaml"
    """Serve config whose first application is deployed with the champion of the first
    target (``model_uri`` and ``lake`` are set by the pipeline)."""
    port: int | None = Field(None, ge=1, le=65535)
    """HTTP port (default: the config's ``http_options.port``)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Extra application args (see ``recsys/serving/app.py``: AppArgs)."""


class SmokeStage(StrictModel):
    k: int = Field(5, ge=1, le=100)
    timeout_s: float = Field(120, gt=0)


class PipelineConfig(StrictModel):
    """Config of ``python -m jobs.pipeline``."""

    name: str = "demo"
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES))
    skip: list[Stage] = Field(default_factory=list)
    force: list[Stage] = Field(default_factory=list)
    """Stages re-run even when their inputs are unchanged."""
    work_dir: str | None = None
    """Where training runs, reports and the stage record go (default ``runs/<name>``)."""
    ray: RayConfig = RayConfig()
    ingest: list[IngestSource] = Field(default_factory=list)
    data: DataConfig = DataConfig()
    pretrain: PretrainStage | None = None
    transfer: TransferStage | None = None
    evaluate: EvaluateStage = EvaluateStage()
    sweep: SweepStage = SweepStage()
    registry: RegisterStage = RegisterStage()
    deploy: DeployStage = DeployStage()
    smoke: SmokeStage = SmokeStage()
    tracking: bool = True
    """Log every training run to MLflow (local server unless RECSYS_MLFLOW_TRACKING_URI)."""

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if "pretrain" in self.active and self.pretrain is None:
            raise ValueError("stage 'pretrain' needs a 'pretrain' section (or skip: [pretrain])")
        needs_targets = {"transfer", "evaluate", "sweep", "register", "deploy", "smoke"}
        if needs_targets & set(self.active) and self.transfer is None:
            raise ValueError(f"stages {sorted(needs_targets & set(self.active))} need a "
                             "'transfer' section (its targets)")
        if {"sweep", "register"} & set(self.active) and not self.tracking:
            raise ValueError("stages 'sweep'/'register' need tracking: true (the MLflow "
                             "registry holds the champion)")
        return self

    @property
    def active(self) -> list[str]:
        return [s for s in STAGES if s in self.stages and s not in self.skip]

    @property
    def root(self) -> Path:
        return Path(self.work_dir or f"runs/{self.name}")


@dataclass
class Context:
    """What the stages share during one pipeline run."""

    cfg: PipelineConfig
    state: PipelineState
    lake_fps: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    pending: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def lake_fp(self, platform: str) -> str:
        if platform not in self.lake_fps:
            self.lake_fps[platform] = lake_platform_fingerprint(self.cfg.data.lake, platform)
        return self.lake_fps[platform]

    def needed(self, key: str, stage: str, inputs: dict[str, Any],
               outputs: list[str | Path], also: str | None = None) -> bool:
        """Whether ``key`` must run (its inputs changed, an output is gone, it is forced, or
        ``also`` gives another reason); logs the decision and the reason either way."""
        digest = {name: hash_json(value) for name, value in inputs.items()}
        fp = hash_json(digest)
        self.pending[key] = (fp, digest)
        reason = ("forced" if stage in self.cfg.force
                  else self.state.why_stale(key, fp, outputs, digest) or also)
        if reason is None:
            log.info("%s: inputs unchanged since %s, skipped", key,
                     self.state.records[key].finished_at)
            self.skipped.append(key)
            return False
        log.info("%s: running (%s)", key, reason)
        self.ran.append(key)
        return True

    def finish(self, key: str, outputs: dict[str, Any], seconds: float) -> None:
        fp, digest = self.pending.pop(key)
        self.state.record(key, fp, outputs, seconds, digest)

    def recorded(self, key: str) -> dict[str, Any]:
        rec = self.state.get(key)
        if rec is None:
            raise RuntimeError(f"{key} has never run in {self.state.path.parent}; run its stage "
                               f"first (stages: [...]) ")
        return rec.outputs


# --- stages ------------------------------------------------------------------------------------


def _source_inputs(src: IngestSource, pseudonym_fp: str) -> dict[str, Any]:
    content = {}
    for attr in ("path", "items_path"):
        p = getattr(src, attr)
        if p is not None:
            content[attr] = hash_tree(p)
    return {"options": src.model_dump(mode="json", exclude={"out"}), **content,
            "pseudonym_key": pseudonym_fp}


def stage_ingest(ctx: Context) -> None:
    from recsys.cli import format_ingest_summary
    from recsys.data.ingest.runner import ingest
    from recsys.data.ingest.synthetic import default_names
    from recsys.data.lake import platform_dir
    from recsys.data.pseudonym import Pseudonymizer, load_key

    key, _ = load_key()
    pseudo = Pseudonymizer(key)
    reports = []
    for i, src in enumerate(ctx.cfg.ingest):
        out = src.out or Path(ctx.cfg.data.lake)
        names = (src.platform.split(",") if src.platform else default_names(src.num_platforms))
        inputs = _source_inputs(src, pseudo.fingerprint)
        stage_key = f"ingest/{i}-{src.source}-{'+'.join(names)}"
        if not ctx.needed(stage_key, "ingest", inputs, [platform_dir(out, p) for p in names]):
            continue
        t = time.perf_counter()
        opts = IngestOptions(**{**src.model_dump(), "out": out})
        writes = ingest(opts, pseudo)
        reports += [w.report for w in writes]
        ctx.finish(stage_key, {"platforms": [w.platform for w in writes]},
                   time.perf_counter() - t)
    if reports:
        print(format_ingest_summary(reports, ctx.cfg.data.lake))
    ctx.results["ingest"] = reports


def stage_examples(ctx: Context) -> None:
    from recsys.cli import format_examples_summary
    from recsys.cluster import init_ray
    from recsys.data.lake import list_platforms
    from recsys.data.examples import build_example_set, load_example_set

    data = ctx.cfg.data
    platforms = data.platforms or list_platforms(data.lake)
    if not platforms:
        raise RuntimeError(f"no platform in the lake {data.lake}: run the ingest stage first")
    inputs = {"data": data.model_dump(mode="json"),
              **{f"lake/{p}": ctx.lake_fp(p) for p in platforms}}
    manifest = Path(data.examples) / "manifest.json"
    if ctx.needed("examples", "examples", inputs, [manifest]):
        t = time.perf_counter()
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        es = build_example_set(data)
        ctx.finish("examples", {"manifest": str(manifest)}, time.perf_counter() - t)
        print(format_examples_summary(es.manifest))
    ctx.results["examples"] = load_example_set(data.examples).manifest


def _train_config(ctx: Context, yaml_path: str, name: str, overrides: dict[str, Any],
                  **fields: Any) -> TrainJobConfig:
    """A train job config from its YAML, with the pipeline's data, paths and tracking."""
    dotted = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    cfg = load_config(TrainJobConfig, yaml_path, dotted)
    update: dict[str, Any] = {
        "name": name, "data": ctx.cfg.data, "output_dir": str(ctx.cfg.root / "train"),
        "resume": False,
        "tracking": cfg.tracking.model_copy(update={"enabled": ctx.cfg.tracking,
                                                    "experiment": ctx.cfg.name}),
        **fields}
    return TrainJobConfig.model_validate({**cfg.model_dump(), **{
        k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in update.items()}})


def _train(ctx: Context, key: str, stage: str, cfg: TrainJobConfig,
           upstream: dict[str, str]) -> dict[str, Any]:
    """Run one training job unless its inputs are unchanged; returns its recorded outputs."""
    from recsys.cluster import init_ray
    from recsys.training.run import run_dir, run_training

    platforms = sorted(set(cfg.train_platforms or []) | set(cfg.eval_platforms or []))
    inputs = {"config": cfg.model_dump(mode="json", exclude={"tracking"}),
              **{f"lake/{p}": ctx.lake_fp(p) for p in platforms}, **upstream}
    export = run_dir(cfg) / "export"
    if ctx.needed(key, stage, inputs, [export / "export.json"]):
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        print(f"--- {key}: training {cfg.name} ({cfg.mode}) on {cfg.train_platforms}", flush=True)
        out = run_training(cfg)
        ctx.finish(key, {
            "export": str(out.export_dir), "best_valid_ndcg@10": out.best_metric,
            "report": str(out.export_dir.parent / "report" / "report.json"),
            "mlflow_run_id": out.run_id, "model_uri": out.model_uri, "epochs": len(out.curve),
            "seconds": out.seconds},
            out.seconds)
    return {"fingerprint": ctx.state.records[key].fingerprint, **ctx.recorded(key)}


def stage_pretrain(ctx: Context) -> None:
    p = ctx.cfg.pretrain
    assert p is not None
    cfg = _train_config(ctx, p.config, "pretrain", p.overrides, mode="pretrain",
                        train_platforms=p.platforms, eval_platforms=p.platforms)
    ctx.results["pretrain"] = _train(ctx, "pretrain", "pretrain", cfg, {})


def _pretrain_output(ctx: Context) -> dict[str, Any]:
    return ctx.results.get("pretrain") or {"fingerprint": ctx.state.records["pretrain"].fingerprint,
                                           **ctx.recorded("pretrain")}


def stage_transfer(ctx: Context) -> None:
    t = ctx.cfg.transfer
    assert t is not None
    pre = _pretrain_output(ctx)
    out: dict[str, dict[str, Any]] = {}
    for target in t.targets:
        runs: dict[str, Any] = {}
        if t.scratch_config:
            cfg = _train_config(ctx, t.scratch_config, f"scratch-{target}", t.overrides,
                                mode="scratch", train_platforms=[target], eval_platforms=[target])
            runs["scratch"] = _train(ctx, f"scratch/{target}", "transfer", cfg, {})
        for strategy in t.strategies:
            cfg = _train_config(ctx, t.config, f"transfer-{strategy}-{target}", t.overrides,
                                mode="transfer", train_platforms=[target],
                                eval_platforms=[target],
                                transfer={"init_from": pre["export"], "strategy": strategy})
            runs[strategy] = _train(ctx, f"transfer/{target}/{strategy}", "transfer", cfg,
                                    {"pretrain": pre["fingerprint"]})
        out[target] = runs
    ctx.results["transfer"] = out


def _transfer_output(ctx: Context) -> dict[str, dict[str, Any]]:
    if "transfer" in ctx.results:
        return ctx.results["transfer"]
    t = ctx.cfg.transfer
    assert t is not None
    out: dict[str, dict[str, Any]] = {}
    for target in t.targets:
        keys = {"scratch": f"scratch/{target}"} if t.scratch_config else {}
        keys.update({s: f"transfer/{target}/{s}" for s in t.strategies})
        out[target] = {label: {"fingerprint": ctx.state.records[k].fingerprint
                               if k in ctx.state.records else "", **ctx.recorded(k)}
                       for label, k in keys.items()}
    return out


def stage_evaluate(ctx: Context) -> None:
    """Scratch vs each transfer strategy, per target: JSON + Markdown + PNG per target."""
    from recsys.evaluation.offline import EvaluateConfig, run_evaluation

    out: dict[str, Any] = {}
    for target, runs in _transfer_output(ctx).items():
        exports = {label: r["export"] for label, r in runs.items()}
        inputs = {"split": ctx.cfg.evaluate.split,
                  **{f"run/{label}": r["fingerprint"] for label, r in runs.items()}}
        eval_dir = ctx.cfg.root / "eval"
        key = f"evaluate/{target}"
        rec = ctx.state.get(key)
        if ctx.needed(key, "evaluate", inputs,
                      list(rec.outputs.values()) if rec else [eval_dir / key]):
            t = time.perf_counter()
            files = run_evaluation(EvaluateConfig(
                name=target, examples=ctx.cfg.data.examples, split=ctx.cfg.evaluate.split,
                platforms=[target], exports=exports,
                baseline="scratch" if "scratch" in exports else None, out_dir=str(eval_dir)))
            ctx.finish(key, {k: str(v) for k, v in files.items()}, time.perf_counter() - t)
        out[target] = ctx.recorded(key)
        _print_comparison(target, out[target])
    ctx.results["evaluate"] = out


def _print_comparison(target: str, files: dict[str, str]) -> None:
    rows = []
    for label, path in files.items():
        if label == "transfer":
            continue
        m = json.loads(Path(path).read_text())["platforms"][target]["metrics"]
        rows.append((label, m["ndcg@10"], m["recall@10"], m["mrr"]))
    base = next((r[1] for r in rows if r[0] == "scratch"), None)
    print(f"\n{target}: {'run':<18}{'NDCG@10':>9}{'R@10':>8}{'MRR':>8}{'vs scratch':>12}")
    for label, ndcg, rec, mrr in rows:
        gain = f"{(ndcg / base - 1) * 100:+.1f}%" if base and label != "scratch" else ""
        print(f"{'':<{len(target) + 2}}{label:<18}{ndcg:>9.4f}{rec:>8.4f}{mrr:>8.4f}{gain:>12}")


def _model_name(ctx: Context, target: str) -> str:
    return ctx.cfg.registry.model_name.format(platform=target)


def _tracking_uri() -> str:
    from recsys.settings import get_settings
    from recsys.tracking.server import ensure_tracking

    return ensure_tracking(get_settings())


def stage_sweep(ctx: Context) -> None:
    """A small Tune sweep of transfer runs for the first target; its best trial is registered
    and becomes champion only if it beats the current one on validation data."""
    from recsys.tuning.config import SweepConfig
    from recsys.tuning.sweep import run_sweep

    t, sw = ctx.cfg.transfer, ctx.cfg.sweep
    assert t is not None
    target = t.targets[0]
    pre = _pretrain_output(ctx)
    dotted = [f"{k}={json.dumps(v)}" for k, v in sw.overrides.items()]
    probe = load_config(SweepConfig, sw.config, dotted)
    base = [*probe.base_overrides,
            f"data={json.dumps(ctx.cfg.data.model_dump(mode='json'))}",
            f"train_platforms={json.dumps([target])}", f"eval_platforms={json.dumps([target])}",
            f"transfer.init_from={json.dumps(pre['export'])}",
            *[f"{k}={json.dumps(v)}" for k, v in {**t.overrides, **sw.train_overrides}.items()]]
    inputs = {"sweep": probe.model_dump(mode="json", exclude={"name", "output_dir"}),
              "base": base, "pretrain": pre["fingerprint"], f"lake/{target}": ctx.lake_fp(target)}
    key = f"sweep/{target}"
    if ctx.needed(key, "sweep", inputs, []):
        digest = ctx.pending[key][0]
        cfg = probe.model_copy(update={
            # One sweep per set of inputs: an interrupted one resumes, a changed one starts anew.
            "name": f"{ctx.cfg.name}-{target}-{digest[:8]}", "base_overrides": base,
            "output_dir": str(ctx.cfg.root / "tune"), "experiment": ctx.cfg.name,
            "resume": True,
            "registry": probe.registry.model_copy(update={
                "enabled": True, "platform": target, "model_name": _model_name(ctx, target)})})
        started = time.perf_counter()
        out = run_sweep(SweepConfig.model_validate(cfg.model_dump()), sw.config)
        ctx.finish(key, {"sweep_dir": str(out.sweep_dir), "export": str(out.export_dir),
                         "best_trial": out.best.trial_id if out.best else None,
                         "best_metric": out.best.best_metric if out.best else None,
                         "trials": len(out.rows), "registered": out.registered,
                         "table": str(out.files.get("md", ""))}, time.perf_counter() - started)
    ctx.results["sweep"] = ctx.recorded(key)
    reg = ctx.results["sweep"].get("registered") or {}
    print(f"sweep {target}: {ctx.results['sweep']['trials']} trials, best "
          f"{ctx.results['sweep']['best_metric']}; registry: {reg.get('reason', '-')}")


def stage_register(ctx: Context) -> None:
    """Register each target's best run (scratch or transfer, by validation NDCG@10) and promote
    it to ``@champion`` only if it beats the champion re-evaluated on the same validation data."""
    from recsys.data.examples import load_example_set
    from recsys.tracking import registry, runs

    uri = _tracking_uri()
    es = load_example_set(ctx.cfg.data.examples)
    out: dict[str, Any] = {}
    for target, candidates in _transfer_output(ctx).items():
        logged = {label: r for label, r in candidates.items() if r.get("model_uri")}
        if not logged:
            raise RuntimeError(f"no run for {target} logged a model to MLflow (tracking off?)")
        label, best = max(logged.items(), key=lambda kv: kv[1]["best_valid_ndcg@10"])
        name = _model_name(ctx, target)
        key = f"register/{target}"
        inputs = {"candidate": best["fingerprint"], "name": name,
                  "min_improvement": ctx.cfg.registry.min_improvement}
        if ctx.needed(key, "register", inputs, []):
            started = time.perf_counter()
            version = runs.register_model(uri, best["model_uri"], name, tags={
                "pipeline": ctx.cfg.name, "run": label, "mlflow_run_id": best["mlflow_run_id"]})
            decision = registry.promote_if_better(
                uri, name, version, registry.valid_scorer(es, target), platform=target,
                challenger_export=Path(best["export"]),
                min_improvement=ctx.cfg.registry.min_improvement)
            ctx.finish(key, {"name": name, "version": version, "run": label,
                             "promoted": decision.promoted, "reason": decision.reason,
                             "champion": registry.alias_version(uri, name, registry.CHAMPION)},
                       time.perf_counter() - started)
        out[target] = ctx.recorded(key)
        r = out[target]
        print(f"register {target}: {r['name']} v{r['version']} ({r['run']}) "
              f"{'promoted to @champion' if r['promoted'] else 'kept as challenger'}: "
              f"{r['reason']}")
    ctx.results["register"] = out


def deployment_options(app_cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """A deployment's options from a Serve config app, by name (autoscaling, resources, ...)."""
    found = [d for d in app_cfg.get("deployments") or [] if d.get("name") == name]
    allowed = ("autoscaling_config", "ray_actor_options", "max_ongoing_requests",
               "num_replicas", "graceful_shutdown_timeout_s", "health_check_period_s")
    return {k: v for k, v in (found[0] if found else {}).items() if k in allowed}


def stage_deploy(ctx: Context) -> None:
    """Deploy the Serve app (serve/config.yaml) with the first target's champion; replicas
    follow later promotions by themselves (they poll the alias)."""
    import os

    import yaml
    from ray import serve

    from recsys.cluster import LOOPBACK, init_ray
    from recsys.tracking import registry
    from recsys.serving.app import AppArgs, compose

    t, d = ctx.cfg.transfer, ctx.cfg.deploy
    assert t is not None
    target = t.targets[0]
    uri = _tracking_uri()
    name = _model_name(ctx, target)
    champion = registry.alias_version(uri, name, registry.CHAMPION)
    if champion is None:
        raise RuntimeError(f"{name} has no @champion yet: run the register stage first")
    serve_cfg = yaml.safe_load(Path(d.config).read_text())
    app_cfg = serve_cfg["applications"][0]
    port = d.port or int(serve_cfg.get("http_options", {}).get("port", 8000))
    args = AppArgs.model_validate({**app_cfg.get("args", {}), **d.args,
                                   "model_uri": f"models:/{name}@champion",
                                   "lake": str(Path(ctx.cfg.data.lake).resolve()),
                                   "tracking_uri": uri})
    env = {k: os.environ[k] for k in ("RECSYS_PSEUDONYM_KEY", "RECSYS_API_KEY")
           if k in os.environ}
    options = {tier: deployment_options(app_cfg, tier) for tier in ("Recommender", "Gateway")}
    for opts in options.values():
        if env:  # merged into the config's runtime_env, whose env_vars it may set too
            actor = opts.get("ray_actor_options", {})
            runtime_env = actor.get("runtime_env", {})
            opts["ray_actor_options"] = {**actor, "runtime_env": {
                **runtime_env, "env_vars": {**runtime_env.get("env_vars", {}), **env}}}
    started = time.perf_counter()
    init_ray(num_cpus=ctx.cfg.ray.num_cpus)
    prefix = app_cfg.get("route_prefix", "/").rstrip("/")
    url = f"http://{LOOPBACK}:{port}{prefix}"
    key = f"deploy/{target}"
    inputs = {"args": args.model_dump(mode="json"), "options": options, "port": port,
              "champion": champion, "serve_config": hash_tree(d.config)}
    gone = None if _app_running(app_cfg["name"]) else f"app {app_cfg['name']!r} not running"
    if ctx.needed(key, "deploy", inputs, [], also=gone):
        serve.start(http_options={"host": LOOPBACK, "port": port})
        serve.run(compose(args, options["Recommender"], options["Gateway"]),
                  name=app_cfg["name"], route_prefix=app_cfg.get("route_prefix", "/"))
        ctx.finish(key, {"url": url, "model": f"models:/{name}@champion", "version": champion,
                         "app": app_cfg["name"]}, time.perf_counter() - started)
        print(f"deployed {app_cfg['name']} serving {name} v{champion} (@champion) at {url}")
    ctx.results["deploy"] = ctx.recorded(key)


def _app_running(name: str) -> bool:
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001  (no Serve instance on this cluster yet)
        return False
    return app is not None and str(app.status).endswith("RUNNING")


def stage_smoke(ctx: Context) -> None:
    """One real request to the endpoint: a user history from the test split."""
    import os

    import pyarrow.parquet as pq
    import requests

    from recsys.data.examples import load_example_set

    deployed = ctx.results.get("deploy")
    if deployed is None:
        raise RuntimeError("smoke needs the deploy stage in the same run")
    t = ctx.cfg.transfer
    assert t is not None
    target = t.targets[0]
    es = load_example_set(ctx.cfg.data.examples)
    table = pq.read_table(es.split_path("test"), filters=[("platform", "==", target)],
                          columns=["history"])
    catalog = pq.read_table(es.path / "catalog" / f"{target}.parquet",
                            columns=["item_idx", "item_id"]).to_pydict()
    ids = dict(zip(catalog["item_idx"], catalog["item_id"], strict=True))
    history = [ids[i] for i in table.column("history")[0].as_py()][-5:]  # oldest first
    url, deadline = deployed["url"], time.monotonic() + ctx.cfg.smoke.timeout_s
    key = os.environ.get("RECSYS_API_KEY")
    headers = {"x-api-key": key} if key else {}
    with requests.Session() as client:
        client.headers.update(headers)
        while True:
            try:
                if client.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except requests.ConnectionError:
                pass  # the proxy is still starting
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/readyz not ready after {ctx.cfg.smoke.timeout_s}s")
            time.sleep(1)
        r = client.post(f"{url}/recommend", json={"platform": target, "recent_items": history,
                                                   "k": ctx.cfg.smoke.k}, timeout=30)
        r.raise_for_status()
    body = r.json()
    ctx.results["smoke"] = {"request": {"platform": target, "recent_items": history},
                            "response": body}
    print(f"smoke: POST {url}/recommend {{platform: {target}, recent_items: {history}}} -> "
          f"{body.get('source')}: " + "; ".join(f"{it['title']} ({it['score']:.3f})"
                                             for it in body.get("items", [])[:3]))


STAGE_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "ingest": stage_ingest, "examples": stage_examples, "pretrain": stage_pretrain,
    "transfer": stage_transfer, "evaluate": stage_evaluate, "sweep": stage_sweep,
    "register": stage_register, "deploy": stage_deploy, "smoke": stage_smoke,
}


def _ensure_persistent_cluster(cfg: PipelineConfig) -> None:
    """The endpoint must outlive this job: run on a ``ray start`` cluster, not a private one
    (under ``ray job submit`` the job already runs on one)."""
    import os
    import sys

    from recsys.cluster import ensure_local_head

    # Not `import ray` first: Ray reads RAY_AUTH_MODE, which ensure_local_head sets, at import.
    if ("ray" in sys.modules and sys.modules["ray"].is_initialized()) \
            or os.environ.get("RAY_ADDRESS") or os.environ.get("RECSYS_RAY_ADDRESS"):
        return
    ensure_local_head(cfg.ray.num_cpus)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the active stages in order; returns what each produced (for tests and the summary)."""
    ctx = Context(cfg, PipelineState(cfg.root / "pipeline"))
    if "deploy" in cfg.active and cfg.ray.keep_alive:
        _ensure_persistent_cluster(cfg)
    timings: dict[str, float] = {}
    active = cfg.active
    for i, stage in enumerate(active, 1):
        print(f"=== [{i}/{len(active)}] {stage}", flush=True)
        t = time.perf_counter()
        STAGE_FUNCTIONS[stage](ctx)
        timings[stage] = time.perf_counter() - t
    ctx.results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    ctx.results["ran"], ctx.results["skipped"] = ctx.ran, ctx.skipped
    print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(f"ran {len(ctx.ran)} step(s), skipped {len(ctx.skipped)} unchanged: "
          + (", ".join(ctx.skipped) or "-"))
    print(format_summary(ctx))
    return ctx.results


def format_summary(ctx: Context) -> str:
    """The last thing a user reads: where to look next, and one real answer."""
    import ray

    lines = ["", f"pipeline {ctx.cfg.name}: done"]
    links: list[tuple[str, str]] = []
    if "deploy" in ctx.results:
        d = ctx.results["deploy"]
        links.append(("Serve endpoint", f"{d['url']}/recommend  (docs: {d['url']}/docs; "
                                        f"serving {d['model']} = v{d['version']})"))
    if ctx.cfg.tracking and {"pretrain", "transfer", "sweep", "register"} & set(ctx.cfg.active):
        links.append(("MLflow UI", _tracking_uri()))
    if ray.is_initialized():
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
        if url:
            links.append(("Ray dashboard", url if "://" in url else f"http://{url}"))
    links.append(("Work dir", str(ctx.cfg.root)))
    width = max(len(k) for k, _ in links)
    lines += [f"  {k:<{width}}  {v}" for k, v in links]
    if "smoke" in ctx.results:
        s = ctx.results["smoke"]
        items = s["response"].get("items", [])
        lines.append(f"  sample: {s['request']['platform']} user who saw "
                     f"{s['request']['recent_items']} -> {s['response'].get('source')}:")
        lines += [f"    {i + 1}. {it['item_id']}  {it['title']}  ({it['score']:.3f})"
                  for i, it in enumerate(items)]
    if "deploy" in ctx.results and ctx.cfg.ray.keep_alive:
        lines.append("  The endpoint keeps running; stop it (and MLflow) with `make stop`.")
    return "\n".join(lines)


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
