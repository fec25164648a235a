"""The schema of ``python -m jobs.monitor`` and of the pipeline's ``monitor`` stage.

Kept apart from the monitor's code so that the docs generator and the config tests import it
without torch, the lake readers or MLflow.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from recsys.config import StrictModel


class Thresholds(StrictModel):
    """Where each signal breaches (None: computed and reported, never judged). The defaults
    flag the synthetic shops' injected popularity shift and none of their natural drift
    (``tests/unit/test_drift_monitor.py``)."""

    popularity_js: float | None = Field(0.5, gt=0, le=1)
    """Jensen-Shannon distance (base 2) of events over the reference's popularity bins. The
    synthetic shops' own new logs stay under 0.3 from 300 new interactions on (0.41 at 100);
    demand moved to their long tail reads 0.84 and more."""
    popularity_psi: float | None = Field(None, gt=0)
    """Population stability index of the same buckets (0.25: the usual 'shifted')."""
    new_item_rate: float | None = Field(0.5, gt=0, le=1)
    """Share of new events on items the reference window never saw (the synthetic shops' new
    logs: 1-2%)."""
    history_length_ks: float | None = Field(None, gt=0, le=1)
    """KS distance of the users' prior interactions per event (capped at ``history_cap``).
    Off by default: a later window sees longer histories by construction."""
    score_ks: float | None = Field(0.25, gt=0, le=1)
    """KS distance of served scores, newest feedback window vs the one before."""
    ctr_drop: float | None = Field(0.3, gt=0, le=1)
    """Relative drop of online CTR (newest window's upper 95% bound below
    ``(1 - ctr_drop) *`` the earlier window's CTR)."""
    ndcg_drop: float | None = Field(0.3, gt=0, le=1)
    """Relative drop of the champion's NDCG@10 on the newest window below its recorded test
    NDCG@10."""


class WindowConfig(StrictModel):
    """Which events are the reference (what the champion was trained on) and which are new."""

    reference_until: datetime | None = None
    """Events up to this time are the reference. None: the champion export's ``data_until``
    for the platform (the newest event its example set saw); without one, the newest
    ``current_events`` events are judged against everything before them."""
    current_events: int = Field(5000, ge=1)
    """At most this many newest interactions after the cutoff are judged (without a cutoff:
    at most half of the platform's interactions)."""
    min_events: int = Field(300, ge=1)
    """Fewer new interactions than this: the platform is reported, not judged."""
    popularity_bins: int = Field(20, ge=2)
    """Popularity bins: the reference's items by rank, each about 1/bins of its events, plus
    one bin for new items (``recsys.monitoring.drift.popularity_buckets``)."""
    history_cap: int = Field(50, ge=1)
    """Prior interactions are counted up to this (the longest history a model reads)."""


class FeedbackConfig(StrictModel):
    """Served impressions and clicks (``recsys.serving.feedback``'s Parquet files)."""

    dir: str | None = None
    """Feedback directory (every ``*.parquet`` below it); None: no online signals."""
    current_impressions: int = Field(5000, ge=1)
    """The newest this many impressions of a platform are the current window; the ones
    before are its reference (scores, CTR)."""
    min_impressions: int = Field(300, ge=1)
    """Fewer impressions in either window: score and CTR are reported, not judged."""


class NdcgConfig(StrictModel):
    """The champion's offline NDCG@10 on the newest window (next-item, full ranking)."""

    enabled: bool = True
    users: int = Field(500, ge=1)
    """At most this many users of the window, sampled with ``seed`` (keeps a check bounded)."""
    seed: int = 0
    batch_size: int = Field(256, ge=1)


class TrackingSection(StrictModel):
    enabled: bool = True
    """Find each platform's ``@champion`` in the MLflow registry and log every check as a run
    (metrics ``monitor_<signal>/<platform>``, the HTML report and its figures)."""
    experiment: str = "monitor"


class TriggerConfig(StrictModel):
    """What ``jobs.monitor`` does on a drifted platform (never the pipeline stage)."""

    enabled: bool = False
    """Call ``recsys.production.trigger.on_drift(cfg, report)`` for each drifted platform."""
    pipeline_config: str = "configs/pipeline/demo.yaml"
    """The pipeline the trigger re-runs (fine-tuning from the current champion)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides of that pipeline config."""
    cooldown_s: float = Field(6 * 3600, ge=0)
    """After a trigger for a platform, ``--watch`` does not trigger it again for this long: a
    canary that rolled back leaves the drift in place, and a retrain per check would follow."""


class MonitorConfig(StrictModel):
    """Config of ``python -m jobs.monitor``: newest logs and served traffic vs the champion's
    training data, per platform."""

    name: str = "monitor"
    lake: str = "runs/demo/lake"
    platforms: list[str] | None = None
    """Platforms to check (None: every platform of the lake)."""
    model_name: str = "recsys-{platform}"
    """Registered model whose ``@champion`` serves the platform."""
    exports: dict[str, str] = Field(default_factory=dict)
    """Platform -> a local export directory used as its champion instead of the registry."""
    window: WindowConfig = WindowConfig()
    thresholds: Thresholds = Thresholds()
    feedback: FeedbackConfig = FeedbackConfig()
    ndcg: NdcgConfig = NdcgConfig()
    out_dir: str = "runs/monitor"
    """Reports go to ``<out_dir>/<name>/<UTC time>/`` (``report.html``, figures, JSON)."""
    tracking: TrackingSection = TrackingSection()
    interval_s: float = Field(3600, gt=0)
    """``--watch``: seconds between two checks."""
    trigger: TriggerConfig = TriggerConfig()

    def champion_name(self, platform: str) -> str:
        return self.model_name.format(platform=platform)
