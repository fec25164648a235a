"""The evaluation reports as data: pydantic models that round-trip through ``report.json`` and
``transfer_report.json``, and the display names of metrics. ``report`` builds, saves and renders
them, ``figures`` draws them; both import this module, and ``figures`` never imports ``report``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recsys.evaluation.metrics import COLD_START

Metrics = dict[str, float | None]

PROTOCOL = ("full ranking over all items of the platform; items in the user's history are NOT "
            "masked (RecBole full-sort, the protocol of the published numbers); ties count half")
HISTORY_EXCLUDED_LABEL = "history excluded (items in the user's history masked; reads higher)"


def _nan_to_none(value: Any) -> Any:
    """NaN (an empty subset) is stored as None, so that ``report.json`` is standard JSON."""
    if isinstance(value, Mapping):
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in value.items()}
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlatformResult(_Model):
    """Numbers of one platform in one run and split."""

    metrics: Metrics = Field(description="Primary protocol (history not masked); has `count`.")
    history_excluded: Metrics | None = Field(
        None, description="Same metrics with history items masked; labelled, never primary.")
    subsets: dict[str, Metrics] = Field(
        default_factory=dict, description=f"Named user subsets, e.g. `{COLD_START}`; have `count`.")
    auc: float | None = Field(None, description="CTR AUC on this platform, where measured.")
    ci: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Seeded bootstrap 95% intervals of primary metrics.")

    @field_validator("metrics", "history_excluded", mode="before")
    @classmethod
    def _metrics_nan(cls, value: Any) -> Any:
        return _nan_to_none(value)

    @field_validator("subsets", mode="before")
    @classmethod
    def _subsets_nan(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: _nan_to_none(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _has_counts(self) -> PlatformResult:
        named = {"metrics": self.metrics, **{f"subsets.{k}": v for k, v in self.subsets.items()}}
        if self.history_excluded is not None:
            named["history_excluded"] = self.history_excluded
        missing = [k for k, v in named.items() if v.get("count") is None]
        if missing:
            raise ValueError(f"metrics without `count`: {missing} (use ranking_metrics)")
        return self

    @property
    def users(self) -> int:
        return int(self.metrics["count"] or 0)


class EvalReport(_Model):
    """One run evaluated on one split, per platform; ``report.json`` is this model."""

    run: str
    split: str
    protocol: str = PROTOCOL
    platforms: dict[str, PlatformResult]
    curves: list[dict[str, float]] = Field(
        default_factory=list,
        description="Learning curve points, e.g. {epoch, train_loss, valid_ndcg@10}.")
    meta: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Free-form provenance: model, checkpoint, seed, ...")

    @field_validator("curves")
    @classmethod
    def _epochs(cls, value: list[dict[str, float]]) -> list[dict[str, float]]:
        missing = [i for i, point in enumerate(value) if "epoch" not in point]
        if missing:
            raise ValueError(f"curves points {missing[:5]} have no `epoch`")
        return value


class TransferRow(_Model):
    """One strategy on one platform, against the baseline run on the same platform and split."""

    platform: str
    strategy: str
    users: int
    values: Metrics
    gain_abs: Metrics = Field(description="value - baseline; None where there is no baseline.")
    gain_rel_pct: Metrics = Field(description="100 * gain / baseline; None if baseline is 0.")

    @field_validator("values", "gain_abs", "gain_rel_pct", mode="before")
    @classmethod
    def _nan(cls, value: Any) -> Any:
        return _nan_to_none(value)


class TransferReport(_Model):
    """Scratch vs transfer strategies (full, freeze_encoder, lora, adapter_only...) per platform."""

    baseline: str
    split: str
    metrics: list[str]
    strategies: list[str] = Field(description="Baseline first, then the runs in given order.")
    rows: list[TransferRow]

    @property
    def platforms(self) -> list[str]:
        return sorted({r.platform for r in self.rows})


MAIN_COLUMNS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")
_TITLES = {"recall@10": "Recall@10", "ndcg@10": "NDCG@10", "recall@50": "Recall@50",
           "ndcg@50": "NDCG@50", "mrr": "MRR"}


def metric_title(metric: str) -> str:
    """``ndcg@10`` -> ``NDCG@10`` for tables and figures; unknown names unchanged."""
    return _TITLES.get(metric, metric)
