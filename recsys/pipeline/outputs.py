"""What each stage records (in ``state.json``) and what a pipeline run returns, as types.

A later stage, a later run and the tests read these fields instead of string keys. Field names
are the JSON keys of ``state.json``; a record whose JSON no longer fits its model re-runs its
stage (see :meth:`recsys.pipeline.state.PipelineState.why_stale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from recsys.data.examples import ExampleManifest
from recsys.pipeline.state import Recorded, StageOutput
from recsys.serving.schemas import RecommendResponse
from recsys.tracking.registry import Decision


class IngestOutput(StageOutput):
    """``ingest/<i>-<source>-<platforms>``: the platforms one source wrote to the lake."""

    platforms: list[str]


class ExamplesOutput(StageOutput):
    """``examples``: the example set's manifest file."""

    manifest: str


class TrainOutput(StageOutput):
    """``pretrain``, ``scratch/<target>``, ``transfer/<target>/<strategy>``: one training run."""

    export: str
    """The exported model directory (what transfer starts from and evaluate reads)."""
    best_valid_ndcg10: float = Field(alias="best_valid_ndcg@10")
    """Best validation NDCG@10 (register picks each target's best run by it)."""
    report: str
    """The run's test-split report JSON."""
    mlflow_run_id: str | None
    model_uri: str | None
    """The MLflow model the run logged (None with tracking off: it cannot be registered)."""
    epochs: int
    seconds: float


class EvaluateOutput(StageOutput):
    """``evaluate/<target>``: the report files of one target's comparison."""

    reports: dict[str, str]
    """Run label (``scratch`` or a strategy) -> its report JSON."""
    transfer: str | None = None
    """Transfer-vs-scratch report JSON (only with a scratch baseline)."""

    def files(self) -> list[str]:
        return [*self.reports.values(), *([self.transfer] if self.transfer else [])]


class SweepOutput(StageOutput):
    """``sweep/<target>``: a Tune sweep of transfer runs and what became of its best trial."""

    sweep_dir: str
    export: str | None
    best_trial: str | None
    best_metric: float | None
    trials: int
    registered: Decision | None
    """What ``promote_if_better`` decided for the best trial (None: not registered)."""
    table: str
    """The sweep's Markdown result table ("" if none was written)."""


class RegisterOutput(StageOutput):
    """``register/<target>``: the version registered for a target and whether it is champion."""

    name: str
    version: str
    run: str
    """Label of the registered run (``scratch`` or a strategy)."""
    promoted: bool
    reason: str
    champion: str | None
    """The version ``@champion`` points at after the decision."""


class DeployOutput(StageOutput):
    """``deploy``: the Serve application answering for every target's champion."""

    url: str
    model: str
    """The model uri template (``models:/<name>-{platform}@champion``)."""
    versions: dict[str, str]
    """Target -> the champion version it was deployed with (replicas follow the aliases)."""
    app: str
    api_key_file: str | None = None
    """Where the endpoint's API keys are (a path, never a key); None: ``auth: none``."""


class SmokeOutput(StageOutput):
    """One real request to the deployed endpoint (not recorded: it runs every time)."""

    platform: str
    recent_items: list[str]
    response: RecommendResponse


@dataclass
class PipelineResult:
    """What one ``run_pipeline`` produced, stage by stage (for the summary and tests)."""

    ingest: list[dict[str, Any]] = field(default_factory=list)
    """Ingest reports of the sources ingested in this run (``recsys.data.ingest``'s format)."""
    examples: ExampleManifest | None = None
    """The example set's manifest."""
    pretrain: Recorded[TrainOutput] | None = None
    transfer: dict[str, dict[str, Recorded[TrainOutput]]] = field(default_factory=dict)
    """Target -> run label (``scratch`` or a strategy) -> its training run."""
    evaluate: dict[str, EvaluateOutput] = field(default_factory=dict)
    sweep: dict[str, SweepOutput] = field(default_factory=dict)
    """Target -> its sweep."""
    register: dict[str, RegisterOutput] = field(default_factory=dict)
    deploy: DeployOutput | None = None
    smoke: SmokeOutput | None = None
    monitor: list[Any] = field(default_factory=list)
    """The monitor stage's ``recsys.monitoring.schema.DriftReport`` per target."""
    timings: dict[str, float] = field(default_factory=dict)
    """Stage -> seconds."""
    ran: list[str] = field(default_factory=list)
    """Stage keys that ran (inputs changed, outputs missing or forced)."""
    skipped: list[str] = field(default_factory=list)
    """Stage keys skipped because nothing they read changed."""
