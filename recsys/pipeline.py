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
from recsys.data.pipeline import DataConfig
from recsys.fingerprint import PipelineState, hash_json, hash_tree, lake_platform_fingerprint
from recsys.training.config import Strategy, TrainJobConfig

log = logging.getLogger(__name__)

Stage = Literal["ingest", "examples", "pretrain", "transfer", "evaluate"]
STAGES: tuple[str, ...] = get_args(Stage)


class IngestSource(IngestOptions):
    """One `recsys ingest` run of the pipeline; ``out`` defaults to ``data.lake``."""

    out: Path | None = None  # type: ignore[assignment]


class RayConfig(StrictModel):
    num_cpus: int | None = None
    """Logical CPUs of a locally started cluster (ignored when joining one)."""


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
    tracking: bool = True
    """Log every training run to MLflow (local server unless RECSYS_MLFLOW_TRACKING_URI)."""

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if "pretrain" in self.active and self.pretrain is None:
            raise ValueError("stage 'pretrain' needs a 'pretrain' section (or skip: [pretrain])")
        if {"transfer", "evaluate"} & set(self.active) and self.transfer is None:
            raise ValueError("stages 'transfer'/'evaluate' need a 'transfer' section")
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
    skipped: list[str] = field(default_factory=list)

    def lake_fp(self, platform: str) -> str:
        if platform not in self.lake_fps:
            self.lake_fps[platform] = lake_platform_fingerprint(self.cfg.data.lake, platform)
        return self.lake_fps[platform]

    def needed(self, key: str, stage: str, fingerprint: str, outputs: list[str | Path]) -> bool:
        """Whether ``key`` must run; logs the decision either way."""
        if stage in self.cfg.force or not self.state.fresh(key, fingerprint, outputs):
            self.ran.append(key)
            return True
        log.info("%s: inputs unchanged since %s, skipped", key, self.state.records[key].finished_at)
        self.skipped.append(key)
        return False

    def recorded(self, key: str) -> dict[str, Any]:
        rec = self.state.get(key)
        if rec is None:
            raise RuntimeError(f"{key} has never run in {self.state.path.parent}; run its stage "
                               f"first (stages: [...]) ")
        return rec.outputs


# --- stages ------------------------------------------------------------------------------------


def _source_fingerprint(src: IngestSource, pseudonym_fp: str) -> str:
    content = {}
    for attr in ("path", "items_path"):
        p = getattr(src, attr)
        if p is not None:
            content[attr] = hash_tree(p)
    return hash_json({"options": src.model_dump(mode="json", exclude={"out"}),
                      "content": content, "pseudonym_key": pseudonym_fp})


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
        fp = _source_fingerprint(src, pseudo.fingerprint)
        stage_key = f"ingest/{i}-{src.source}-{'+'.join(names)}"
        if not ctx.needed(stage_key, "ingest", fp, [platform_dir(out, p) for p in names]):
            continue
        t = time.perf_counter()
        opts = IngestOptions(**{**src.model_dump(), "out": out})
        writes = ingest(opts, pseudo)
        reports += [w.report for w in writes]
        ctx.state.record(stage_key, fp, {"platforms": [w.platform for w in writes]},
                         time.perf_counter() - t)
    if reports:
        print(format_ingest_summary(reports, ctx.cfg.data.lake))
    ctx.results["ingest"] = reports


def stage_examples(ctx: Context) -> None:
    from recsys.cli import format_examples_summary
    from recsys.cluster import init_ray
    from recsys.data.lake import list_platforms
    from recsys.data.pipeline import build_example_set, load_example_set

    data = ctx.cfg.data
    platforms = data.platforms or list_platforms(data.lake)
    if not platforms:
        raise RuntimeError(f"no platform in the lake {data.lake}: run the ingest stage first")
    fp = hash_json({"data": data.model_dump(mode="json"),
                    "lake": {p: ctx.lake_fp(p) for p in platforms}})
    manifest = Path(data.examples) / "manifest.json"
    if ctx.needed("examples", "examples", fp, [manifest]):
        t = time.perf_counter()
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        es = build_example_set(data)
        ctx.state.record("examples", fp, {"manifest": str(manifest)}, time.perf_counter() - t)
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
    fp = hash_json({"config": cfg.model_dump(mode="json", exclude={"tracking"}),
                    "lake": {p: ctx.lake_fp(p) for p in platforms}, "upstream": upstream})
    export = run_dir(cfg) / "export"
    if ctx.needed(key, stage, fp, [export / "export.json"]):
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        print(f"--- {key}: training {cfg.name} ({cfg.mode}) on {cfg.train_platforms}", flush=True)
        out = run_training(cfg)
        ctx.state.record(key, fp, {
            "export": str(out.export_dir), "best_valid_ndcg@10": out.best_metric,
            "report": str(out.export_dir.parent / "report" / "report.json"),
            "mlflow_run_id": out.run_id, "epochs": len(out.curve), "seconds": out.seconds},
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
    from recsys.training.evaluate import EvaluateConfig, run_evaluation

    out: dict[str, Any] = {}
    for target, runs in _transfer_output(ctx).items():
        exports = {label: r["export"] for label, r in runs.items()}
        fp = hash_json({"split": ctx.cfg.evaluate.split,
                        "runs": {label: r["fingerprint"] for label, r in runs.items()}})
        eval_dir = ctx.cfg.root / "eval"
        key = f"evaluate/{target}"
        rec = ctx.state.get(key)
        if ctx.needed(key, "evaluate", fp, list(rec.outputs.values()) if rec else [eval_dir / key]):
            t = time.perf_counter()
            files = run_evaluation(EvaluateConfig(
                name=target, examples=ctx.cfg.data.examples, split=ctx.cfg.evaluate.split,
                platforms=[target], exports=exports,
                baseline="scratch" if "scratch" in exports else None, out_dir=str(eval_dir)))
            ctx.state.record(key, fp, {k: str(v) for k, v in files.items()},
                             time.perf_counter() - t)
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


STAGE_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "ingest": stage_ingest, "examples": stage_examples, "pretrain": stage_pretrain,
    "transfer": stage_transfer, "evaluate": stage_evaluate,
}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the active stages in order; returns what each produced (for tests and the summary)."""
    ctx = Context(cfg, PipelineState(cfg.root / "pipeline"))
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
    return ctx.results


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
