"""``bench/ingest.py``'s three stages, and the read-back that proves two of them agree.

1. ``run_ingest``: source -> canonical lake (``run_generate``: the synthetic world alone);
2. ``run_ray_seq``: ``build_example_set``, the Ray Data pipeline;
3. ``run_base_seq``: the same work in one process with pyarrow + numpy, no Ray: the baseline.

``split_rows`` and ``checksum`` give what both sequence stages must agree on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from recsys.data.examples import DataConfig


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the benchmark: how to ingest it (``IngestOptions`` fields but ``out``)
    and how often to time each stage; ``skipped`` says why it is not measured."""

    name: str
    kind: str = ""  # "synthetic" or the real source's name
    ingest: dict[str, Any] = field(default_factory=dict)
    repeats: int = 1
    skipped: str | None = None


def run_ingest(spec: DatasetSpec, lake: Path) -> dict[str, Any]:
    """Source -> lake; lake events (after quarantine, filters, k-core) and per-platform facts."""
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.pseudonym import Pseudonymizer, load_key

    opts = IngestOptions(out=lake, **spec.ingest)
    written = ingest(opts, Pseudonymizer(load_key(create_if_missing=False)[0]))
    return {
        "events_in": sum(w.report["events"]["rows_in"] for w in written),
        "events": sum(w.report["events"]["rows_out"] for w in written),
        "platforms": {w.platform: {"events": w.report["events"]["rows_out"],
                                   "buckets": w.num_buckets,
                                   "catalog_items": w.report["catalog_items"],
                                   "users": w.report["users"]} for w in written},
    }


def run_generate(spec: DatasetSpec) -> int:
    """Only the synthetic world's generation (part of its ingest); rows generated."""
    from recsys.data.ingest.synthetic import generate

    ing = spec.ingest
    frames = generate(ing.get("num_platforms", 3), ing["scale"], ing["seed"])
    return sum(len(ev) for ev, _ in frames.values())


def data_config(lake: Path, examples: Path, seq: dict[str, Any]) -> DataConfig:
    from recsys.data.examples import DataConfig

    return DataConfig(lake=str(lake), examples=str(examples), sequences=seq, tokenize=False)


def run_ray_seq(lake: Path, examples: Path, seq: dict[str, Any]) -> dict[str, Any]:
    from recsys.data.examples import build_example_set

    return build_example_set(data_config(lake, examples, seq)).manifest.as_json_dict()


def _require_non_null(events: pa.Table, path: str) -> None:
    """The pipeline's check that required columns have no nulls (same cost, same message)."""
    from recsys.data.schema import EVENTS_SCHEMA

    for col in EVENTS_SCHEMA:
        if not col.nullable and events[col.name].null_count:
            raise ValueError(f"{path}: null values in required column {col.name!r}")


def count_rows(examples: pa.Table) -> dict[str, dict[str, Any]]:
    """Rows per platform and split, users, mean history: the pipeline manifest's counts."""
    from recsys.data.sequences import SPLITS

    counts: dict[str, dict[str, Any]] = {}
    for p in pc.unique(examples["platform"]).to_pylist():
        part = examples.filter(pc.equal(examples["platform"], p))
        c = {f"{s}_rows": int(pc.sum(pc.equal(part["split"], s)).as_py() or 0) for s in SPLITS}
        test = part.filter(pc.equal(part["split"], "test"))
        hist = int(pc.sum(pc.list_value_length(test["history"])).as_py() or 0)
        c["users"] = c["test_rows"]
        c["mean_history"] = round(hist / max(c["users"], 1), 2)
        counts[p] = c
    return counts


def run_base_seq(lake: Path, examples: Path, seq: dict[str, Any]) -> dict[str, Any]:
    """Single-process baseline: the pipeline's work with pyarrow + numpy, no Ray."""
    from recsys.data.catalog import build_catalog, unique_texts
    from recsys.data.examples import (
        ExampleManifest,
        PlatformCounts,
        TextCounts,
        input_fingerprint,
    )
    from recsys.data.lake import list_platforms, read_events, read_items, read_report
    from recsys.data.sequences import SPLITS, build_examples, item_index

    started = time.perf_counter()
    cfg = data_config(lake, examples, seq)
    platforms = list_platforms(lake)
    (examples / "catalog").mkdir(parents=True)
    catalogs, tables = {}, []
    for p in platforms:
        items = read_items(lake, p)
        catalogs[p] = build_catalog(items, cfg.text.fields)
        pq.write_table(catalogs[p], examples / "catalog" / f"{p}.parquet")
        events = read_events(lake, p)  # every bucket file, schema-checked, concatenated
        _require_non_null(events, f"{lake}/{p}")
        table, _ = build_examples(events, item_index(items["item_id"]), cfg.sequences, p)
        tables.append(table)
    texts = unique_texts(list(catalogs.values()))
    examples_table = pa.concat_tables(tables)
    for split in SPLITS:
        (examples / split).mkdir()
        pq.write_table(examples_table.filter(pc.equal(examples_table["split"], split)),
                       examples / split / "part-00000.parquet")
    counts = count_rows(examples_table)
    manifest = ExampleManifest(
        created_at=datetime.now(UTC), seconds=round(time.perf_counter() - started, 2),
        input_fingerprint=input_fingerprint(lake, platforms, cfg), config=cfg,
        platforms={p: PlatformCounts(
            catalog_items=catalogs[p].num_rows, lake_users=read_report(lake, p)["users"],
            users_too_short=read_report(lake, p)["users"] - counts.get(p, {}).get("users", 0),
            **counts.get(p, {})) for p in platforms},
        text=TextCounts(distinct_texts=texts.num_rows,
                        catalog_rows=sum(c.num_rows for c in catalogs.values())))
    manifest.write(examples)  # the same manifest.json the Ray pipeline writes
    return manifest.as_json_dict()


def checksum(examples: Path) -> dict[str, dict[str, int]]:
    """Per (platform, split): rows, sum of targets, sum of history lengths (read back)."""
    from recsys.data.sequences import EXAMPLES_SCHEMA, SPLITS

    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        files = sorted((examples / split).glob("*.parquet"))
        if not files:
            continue
        t = pa.concat_tables([pq.read_table(f, schema=EXAMPLES_SCHEMA) for f in files])
        for p in pc.unique(t["platform"]).to_pylist():
            part = t.filter(pc.equal(t["platform"], p))
            out[f"{p}/{split}"] = {
                "rows": part.num_rows,
                "target_sum": int(pc.sum(part["target"].cast(pa.int64())).as_py() or 0),
                "history_items": int(pc.sum(pc.list_value_length(part["history"])).as_py()
                                     or 0)}
    return dict(sorted(out.items()))


COMPARED = ("train_rows", "valid_rows", "test_rows", "users", "mean_history")


def split_rows(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest counts both implementations must agree on."""
    return {p: {k: c[k] for k in COMPARED if k in c}
            for p, c in sorted(manifest["platforms"].items())}
