"""Run the active stages in order, then print where to look next (``run_pipeline``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from recsys.config import load_config
from recsys.pipeline.config import PipelineConfig
from recsys.pipeline.context import Context, tracking_uri
from recsys.pipeline.outputs import PipelineResult
from recsys.pipeline.stages.data import stage_examples, stage_ingest
from recsys.pipeline.stages.evaluate import stage_evaluate
from recsys.pipeline.stages.monitor import stage_monitor
from recsys.pipeline.stages.registry import stage_register, stage_sweep
from recsys.pipeline.stages.serve import stage_deploy, stage_smoke
from recsys.pipeline.stages.train import stage_pretrain, stage_transfer
from recsys.pipeline.state import PipelineState

STAGE_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "ingest": stage_ingest, "examples": stage_examples, "pretrain": stage_pretrain,
    "transfer": stage_transfer, "evaluate": stage_evaluate, "sweep": stage_sweep,
    "register": stage_register, "deploy": stage_deploy, "smoke": stage_smoke,
    "monitor": stage_monitor,
}


def load_pipeline_config(path: str | Path, overrides: Iterable[str] | None = None
                         ) -> PipelineConfig:
    """A pipeline YAML with dotted command-line overrides, validated."""
    return load_config(PipelineConfig, path, overrides)


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


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
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
    res = ctx.result
    res.timings = {k: round(v, 2) for k, v in timings.items()}
    print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(f"ran {len(res.ran)} step(s), skipped {len(res.skipped)} unchanged: "
          + (", ".join(res.skipped) or "-"))
    print(format_summary(cfg, res))
    return res


def format_summary(cfg: PipelineConfig, res: PipelineResult) -> str:
    """The last thing a user reads: where to look next, and one real answer."""
    import ray

    lines = ["", f"pipeline {cfg.name}: done"]
    links: list[tuple[str, str]] = []
    if res.deploy is not None:
        d = res.deploy
        served = ", ".join(f"{p} v{v}" for p, v in d.versions.items())
        links.append(("Serve endpoint", f"{d.url}/recommend  (docs: {d.url}/docs; "
                                        f"serving {d.model}: {served})"))
        if d.api_key_file:
            links.append(("API key", f"x-api-key header, from {d.api_key_file} (mode 0600)"))
    if cfg.tracking and {"pretrain", "transfer", "sweep", "register"} & set(cfg.active):
        from recsys.tracking.server import ensure_experiment, experiment_url

        uri = tracking_uri()  # the experiment's training runs, in the machine-learning view
        links.append(("MLflow UI", experiment_url(uri, ensure_experiment(uri, cfg.name))))
    if ray.is_initialized():
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
        if url:  # Ray 2.60 guards it with a token (~/.ray/auth_token), asked once a browser
            links.append(("Ray dashboard", (url if "://" in url else f"http://{url}")
                          + "  (token: `ray get-auth-token`, from ~/.ray/auth_token)"))
    links.append(("Work dir", str(cfg.root)))
    width = max(len(k) for k, _ in links)
    lines += [f"  {k:<{width}}  {v}" for k, v in links]
    if res.smoke is not None:
        s = res.smoke
        lines.append(f"  sample: {s.platform} user who saw {s.recent_items} -> "
                     f"{s.response.source}:")
        lines += [f"    {i + 1}. {it.item_id}  {it.title}  ({it.score:.3f})"
                  for i, it in enumerate(s.response.items)]
    if res.deploy is not None and cfg.ray.keep_alive:
        lines.append("  The endpoint keeps running; stop it (and MLflow) with `make stop`.")
    return "\n".join(lines)
