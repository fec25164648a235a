"""Data stages: logs -> the lake (``ingest``, one key per source) -> the example set
(``examples``). Each key re-runs only when its source files, options or lake content change."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recsys.data.ingest.runner import IngestOptions
from recsys.pipeline.config import IngestSource
from recsys.pipeline.context import Context
from recsys.pipeline.outputs import ExamplesOutput, IngestOutput
from recsys.pipeline.state import hash_tree


def _source_inputs(src: IngestSource, pseudonym_fp: str) -> dict[str, Any]:
    """Fingerprint inputs of one source: its options, its files' content, the pseudonym key."""
    content = {}
    for attr in ("path", "items_path"):
        p = getattr(src, attr)
        if p is not None:
            content[attr] = hash_tree(p)
    return {"options": src.model_dump(mode="json", exclude={"out"}), **content,
            "pseudonym_key": pseudonym_fp}


def stage_ingest(ctx: Context) -> None:
    from recsys.data.ingest.runner import format_ingest_summary, ingest
    from recsys.data.ingest.synthetic import default_names
    from recsys.data.lake import platform_dir
    from recsys.data.pseudonym import Pseudonymizer, load_key

    key, key_source = load_key()
    pseudo = Pseudonymizer(key)
    reports = []
    for i, src in enumerate(ctx.cfg.ingest):
        out = src.out or Path(ctx.cfg.data.lake)
        names = (src.platform.split(",") if src.platform else default_names(src.num_platforms))
        inputs = _source_inputs(src, pseudo.fingerprint)
        stage_key = f"ingest/{i}-{src.source}-{'+'.join(names)}"
        if not ctx.needed(stage_key, "ingest", inputs, [platform_dir(out, p) for p in names],
                          IngestOutput):
            continue
        t = time.perf_counter()
        opts = IngestOptions(**{**src.model_dump(), "out": out})
        writes = ingest(opts, pseudo, key_source)
        reports += [w.report for w in writes]
        ctx.finish(stage_key, IngestOutput(platforms=[w.platform for w in writes]),
                   time.perf_counter() - t)
    if reports:
        print(format_ingest_summary(reports, ctx.cfg.data.lake))
    ctx.result.ingest = reports


def stage_examples(ctx: Context) -> None:
    from recsys.cluster import init_ray
    from recsys.data.examples import build_example_set, load_example_set
    from recsys.data.lake import list_platforms

    data = ctx.cfg.data
    platforms = data.platforms or list_platforms(data.lake)
    if not platforms:
        raise RuntimeError(f"no platform in the lake {data.lake}: run the ingest stage first")
    inputs = {"data": data.model_dump(mode="json"),
              **{f"lake/{p}": ctx.lake_fp(p) for p in platforms}}
    manifest = Path(data.examples) / "manifest.json"
    if ctx.needed("examples", "examples", inputs, [manifest], ExamplesOutput):
        t = time.perf_counter()
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        es = build_example_set(data)
        ctx.finish("examples", ExamplesOutput(manifest=str(manifest)), time.perf_counter() - t)
        print(es.manifest.summary())
    ctx.result.examples = load_example_set(data.examples).manifest
