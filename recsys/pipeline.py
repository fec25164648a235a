"""The end-to-end job, stage by stage. Today: ingest -> examples. Training, sweeps, registry and
serving stages are added by the issues that build them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from recsys.cli import format_examples_summary, format_ingest_summary
from recsys.config import StrictModel
from recsys.data.ingest.runner import IngestOptions
from recsys.data.pipeline import DataConfig

log = logging.getLogger(__name__)

Stage = Literal["ingest", "examples"]


class IngestSource(IngestOptions):
    """One `recsys ingest` run of the pipeline; ``out`` defaults to ``data.lake``."""

    out: Path | None = None  # type: ignore[assignment]


class RayConfig(StrictModel):
    num_cpus: int | None = None
    """Logical CPUs of a locally started cluster (ignored when joining one)."""


class PipelineConfig(StrictModel):
    """Config of ``python -m jobs.pipeline``."""

    name: str = "demo"
    stages: list[Stage] = Field(default_factory=lambda: ["ingest", "examples"])
    ray: RayConfig = RayConfig()
    ingest: list[IngestSource] = Field(default_factory=list)
    data: DataConfig = DataConfig()


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns what each produced (for tests and summary)."""
    from recsys.cluster import init_ray
    from recsys.data.ingest.runner import ingest
    from recsys.data.pipeline import build_example_set

    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if "ingest" in cfg.stages:
        t = time.perf_counter()
        reports = []
        for src in cfg.ingest:
            opts = IngestOptions(**{**src.model_dump(), "out": src.out or cfg.data.lake})
            reports += [w.report for w in ingest(opts)]
        results["ingest"] = reports
        timings["ingest"] = time.perf_counter() - t
        print(format_ingest_summary(reports, cfg.data.lake))
    if "examples" in cfg.stages:
        t = time.perf_counter()
        init_ray(num_cpus=cfg.ray.num_cpus)
        es = build_example_set(cfg.data)
        results["examples"] = es.manifest
        timings["examples"] = time.perf_counter() - t
        print(format_examples_summary(es.manifest))
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return results
