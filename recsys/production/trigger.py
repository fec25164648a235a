"""What a drifted platform triggers (``jobs.monitor`` with ``trigger.enabled``): a re-fine-tune
of that platform from its champion on the new logs, the offline gate, then the online canary.

    on_drift(monitor_cfg, report)      # the monitor's callback, one drifted platform
      -> refit(pipeline_config, platform, overrides)
           run_pipeline: ingest -> examples -> transfer (warm start from @champion) -> register
           register: better offline -> @canary (with registry.canary) or @champion
           run_canary: the Serve app's canary share answers from @canary; promote/rollback

A thin composition: the stages skip what did not change (only the drifted platform's new logs
are re-ingested, only its transfer re-runs), the gate is the register stage's, the judge is
``recsys.production.canary``. Locally ``python -m jobs.monitor --watch``; on Kubernetes the
CronJob of ``infra/k8s/monitor-cronjob.yaml`` submits the same job as a RayJob on a schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recsys.config import load_config
from recsys.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from recsys.monitoring.config import MonitorConfig
    from recsys.monitoring.schema import DriftReport
    from recsys.pipeline.outputs import RegisterOutput
    from recsys.production.canary import CanaryResult

log = logging.getLogger(__name__)

REFIT_STAGES = ["ingest", "examples", "transfer", "register"]


@dataclass
class Refit:
    """What one trigger did: the registered version, the gate's word, the canary's."""

    platform: str
    register: RegisterOutput
    canary: CanaryResult | None


def refit_config(pipeline_config: str, platform: str,
                 overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The pipeline config of a re-fine-tune of ``platform``: its YAML and ``overrides``,
    then the stages, the one target and the warm start from its champion."""
    return load_config(PipelineConfig, pipeline_config, values={
        **(overrides or {}), "stages": REFIT_STAGES, "transfer.targets": [platform],
        "transfer.warm_start": "champion"})


def refit(pipeline_config: str, platform: str, overrides: dict[str, Any] | None = None
          ) -> Refit:
    """Re-fine-tune ``platform`` from its champion on its new logs, gate it offline and, when
    the config's ``registry.canary`` is set and the gate gave the version ``@canary``, judge
    it online."""
    from recsys.pipeline.context import tracking_uri
    from recsys.pipeline.runner import run_pipeline
    from recsys.production.canary import CANARY
    from recsys.tracking.registry import alias_version

    cfg = refit_config(pipeline_config, platform, overrides)
    reg = run_pipeline(cfg).register[platform]
    uri = tracking_uri()
    if cfg.registry.canary is None or reg.promoted \
            or alias_version(uri, reg.name, CANARY) != reg.version:
        log.info("%s: v%s %s; no canary", platform, reg.version,
                 "promoted" if reg.promoted else f"not a challenger ({reg.reason})")
        return Refit(platform, reg, None)
    return Refit(platform, reg, canary(cfg, platform, reg.version))


def canary(cfg: PipelineConfig, platform: str, version: str) -> CanaryResult:
    """Judge ``version`` (``@canary``) on the traffic from now on (``registry.canary``)."""
    from recsys.pipeline.context import tracking_uri
    from recsys.production.canary import combined, feedback_stats, run_canary, serve_errors
    from recsys.tracking.registry import CHAMPION, alias_version

    c = cfg.registry.canary
    assert c is not None
    uri, name = tracking_uri(), cfg.model_name(platform)
    champion, since = alias_version(uri, name, CHAMPION), time.time()

    def traffic():  # noqa: ANN202 (a canary.Stats)
        return feedback_stats(c.feedback_dir, platform, champion, version, since=since)

    stats = combined(traffic, serve_errors(c.app, platform)) if c.app else traffic
    return run_canary(uri, name, stats, c.judge, version=version)


def on_drift(cfg: MonitorConfig, report: DriftReport) -> None:
    """The monitor's callback: re-fine-tune and canary the drifted platform
    (``cfg.trigger.pipeline_config`` with ``cfg.trigger.overrides``)."""
    if not report.drifted:
        return
    log.warning("%s drifted (%s): re-fine-tuning from its champion", report.platform,
                "; ".join(report.reasons) or "-")
    out = refit(cfg.trigger.pipeline_config, report.platform, cfg.trigger.overrides)
    c = out.canary
    print(f"trigger {report.platform}: v{out.register.version} {out.register.reason}"
          + (f"; canary: {c.verdict} ({c.reason})" if c else ""), flush=True)
