"""The ``monitor`` stage (opt-in): one drift check of the pipeline's lake against each
target's champion (``recsys.monitoring``). It runs every time it is listed (new logs are the
point) and only reports: re-training on drift is ``jobs.monitor`` with ``trigger.enabled``."""

from __future__ import annotations

from recsys.config import load_config
from recsys.pipeline.context import Context


def stage_monitor(ctx: Context) -> None:
    from recsys.monitoring.config import MonitorConfig
    from recsys.monitoring.monitor import check
    from recsys.monitoring.report import format_summary

    t = ctx.cfg.transfer
    assert t is not None  # PipelineConfig refuses the stage without its section
    m = ctx.cfg.monitor
    cfg = load_config(MonitorConfig, m.config, values={
        **m.overrides, "name": ctx.cfg.name, "lake": ctx.cfg.data.lake,
        "platforms": list(t.targets), "model_name": ctx.cfg.registry.model_name,
        "out_dir": str(ctx.cfg.root / "monitor"), "tracking.enabled": ctx.cfg.tracking,
        "tracking.experiment": f"{ctx.cfg.name}-monitor", "trigger.enabled": False})
    reports = check(cfg)
    ctx.result.monitor = reports
    print(format_summary(reports), flush=True)
