"""The schema of ``python -m jobs.pipeline``: which stages run and each stage's settings.

Kept apart from the stage code so that the docs generator and config tests can import it
without the training, Ray or MLflow stacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from recsys.config import StrictModel
from recsys.data.examples import DataConfig
from recsys.data.ingest.runner import IngestOptions
from recsys.production.canary import CanaryConfig
from recsys.training.config import Strategy

Stage = Literal["ingest", "examples", "pretrain", "transfer", "evaluate", "sweep", "register",
                "deploy", "smoke", "monitor"]
STAGES: tuple[str, ...] = get_args(Stage)
OPT_IN: tuple[str, ...] = ("monitor",)
"""Stages that run only when ``stages`` names them (the default list leaves them out)."""


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


class FederatedStage(StrictModel):
    """Federated pretraining in place of pooled pretraining (off by default)."""

    enabled: bool = False
    """The ``pretrain`` stage trains its platforms as federated clients (each shop's logs stay
    in its own client; only model updates reach the server) instead of pooling them. Its
    export has the same format, so transfer starts from it unchanged."""
    config: str = "configs/federated/federated.yaml"
    """Federated job YAML; the pipeline sets name, data, platforms, output_dir, tracking."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted federated-config overrides, e.g. ``{federated.rounds: 5}``."""


class TransferStage(StrictModel):
    config: str = "configs/train/transfer.yaml"
    scratch_config: str | None = "configs/train/scratch.yaml"
    """The baseline every transfer is compared with (None: no baseline)."""
    targets: list[str] = Field(min_length=1)
    strategies: list[Strategy] = Field(default_factory=lambda: ["freeze_encoder"], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides applied to transfer and scratch runs alike."""
    warm_start: Literal["pretrain", "champion"] = "pretrain"
    """What each target's transfer runs start from: the pretrained model, or the target's
    current ``@champion`` (downloaded from the registry; the incremental re-fine-tune on new
    logs). Without a champion yet: the pretrained model, and the log says so."""


class EvaluateStage(StrictModel):
    split: Literal["valid", "test"] = "test"


class SweepStage(StrictModel):
    config: str = "tune/sweeps/demo_transfer.yaml"
    """Sweep YAML; the pipeline points its trials at its example set and pretrained model,
    and runs one sweep per target in ``transfer.targets``, each registering its best trial."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted sweep-config overrides, e.g. ``{num_samples: 2}``."""
    train_overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted train-config overrides for every trial (before the sampled values)."""


class CanaryStage(StrictModel):
    """The online canary after the offline gate (``recsys.production.canary``): the Serve app
    sends its ``canary.share`` of users to ``@canary``, this judges (docs/production.md)."""

    app: str | None = None
    """Serve application (on the Ray cluster this job runs on) whose model replicas count the
    canary's fallbacks, e.g. ``recsys``. None: not read; a canary that never loads then shows
    as no impressions and is rolled back at ``judge.timeout_s``."""
    feedback_dir: str = "runs/demo/feedback"
    """The app's ``feedback.dir``: impressions and clicks per arm."""
    judge: CanaryConfig = CanaryConfig()


class RegisterStage(StrictModel):
    model_name: str = "recsys-{platform}"
    """Registered model per target platform."""
    min_improvement: float = Field(0.0, ge=0)
    """A challenger must beat the champion's validation NDCG@10 by more than this."""
    canary: CanaryStage | None = None
    """Set: a version that beats the champion offline gets ``@canary`` for an online canary
    (``recsys.production.trigger`` runs it) instead of becoming ``@champion``."""


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


class MonitorStage(StrictModel):
    """The drift monitor after deploy (opt-in: ``stages=[..., monitor]``): one check of the
    pipeline's lake against each target's champion; it reports, never triggers a re-run."""

    config: str = "configs/monitor/monitor.yaml"
    """Monitor job YAML; the pipeline sets name, lake, platforms (the targets), model_name,
    out_dir and tracking, and turns the trigger off."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted monitor-config overrides, e.g. ``{window.min_events: 100}``."""


class PipelineConfig(StrictModel):
    """Config of ``python -m jobs.pipeline``."""

    name: str = "demo"
    stages: list[Stage] = Field(default_factory=lambda: [s for s in STAGES if s not in OPT_IN])
    skip: list[Stage] = Field(default_factory=list)
    force: list[Stage] = Field(default_factory=list)
    """Stages re-run even when their inputs are unchanged."""
    work_dir: str | None = None
    """Where training runs, reports and the stage record go (default ``runs/<name>``)."""
    ray: RayConfig = RayConfig()
    ingest: list[IngestSource] = Field(default_factory=list)
    data: DataConfig = DataConfig()
    pretrain: PretrainStage | None = None
    federated: FederatedStage = FederatedStage()
    transfer: TransferStage | None = None
    evaluate: EvaluateStage = EvaluateStage()
    sweep: SweepStage = SweepStage()
    registry: RegisterStage = RegisterStage()
    deploy: DeployStage = DeployStage()
    smoke: SmokeStage = SmokeStage()
    monitor: MonitorStage = MonitorStage()
    tracking: bool = True
    """Log every training run to MLflow (local server unless RECSYS_MLFLOW_TRACKING_URI)."""

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if "pretrain" in self.active and self.pretrain is None:
            raise ValueError("stage 'pretrain' needs a 'pretrain' section (or skip: [pretrain])")
        needs_targets = {"transfer", "evaluate", "sweep", "register", "deploy", "smoke",
                         "monitor"}
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

    def model_name(self, target: str) -> str:
        """The registered model that holds ``target``'s champion."""
        return self.registry.model_name.format(platform=target)
