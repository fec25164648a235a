"""Run one ingest: adapter -> common validation -> pseudonyms -> lake, one report per platform."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recsys.data.ingest.base import Ledger, finalize
from recsys.data.lake import PlatformWrite, write_platform
from recsys.data.pseudonym import Pseudonymizer, load_key
from recsys.data.schema import SCHEMA_VERSION, validate_platform_name

log = logging.getLogger(__name__)

SourceKind = Literal["unisrec", "uci-online-retail", "amazon-json", "recbole", "generic",
                     "synthetic"]


class IngestOptions(BaseModel):
    """Everything `recsys ingest` accepts. Adapter-specific fields say which source uses them."""

    model_config = ConfigDict(extra="forbid")

    source: SourceKind
    out: Path = Field(description="lake directory")
    path: Path | None = Field(None, description="source file or directory")
    items_path: Path | None = Field(None, description="item metadata file, when separate")
    platform: str | None = Field(None, description="platform name written to the lake")
    recipe: str | None = Field(None, description="named preprocessing recipe of the source")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="generic: canonical field -> source column")
    item_columns: dict[str, str] = Field(default_factory=dict,
                                         description="generic: item field -> source column")
    event_type: str | None = Field(None, description="constant event type when the source has "
                                                     "no event column")
    user_namespace: str | None = Field(
        None, description="prefix raw user ids before hashing ('ns:id'); use it when ids are "
        "dataset-local indices that must not link to other platforms")
    min_user_events: int = Field(0, ge=0, description="k-core: minimum events per user")
    min_item_events: int = Field(0, ge=0, description="k-core: minimum events per item")
    buckets: int | None = Field(None, ge=1, le=256, description="user buckets per platform")
    # synthetic
    seed: int = Field(0, description="random seed (synthetic data; unisrec-or tie order)")
    scale: float = Field(1.0, gt=0, description="synthetic: size multiplier (1.0 ~ 60k events)")
    num_platforms: int = Field(3, ge=1, le=26, description="synthetic: number of platforms")

    @model_validator(mode="after")
    def _check(self) -> IngestOptions:
        problems = []
        if self.source != "synthetic" and self.path is None:
            problems.append(f"--path is required for source {self.source!r}")
        if self.source != "synthetic" and not self.platform:
            problems.append(f"--platform is required for source {self.source!r}")
        if self.platform and self.source != "synthetic" and "," in self.platform:
            problems.append(f"--platform {self.platform!r}: one platform per {self.source!r} "
                            "source (comma-separated names are for synthetic only)")
        if self.platform:
            for name in self.platform.split(","):
                try:
                    validate_platform_name(name)
                except ValueError as exc:
                    problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass
class SourceFrames:
    """One platform's parsed source, ready for :func:`finalize`."""

    platform: str
    events: pd.DataFrame
    items: pd.DataFrame
    ledger: Ledger
    source_file: str
    min_user_events: int = 0
    min_item_events: int = 0


Adapter = Callable[[IngestOptions, Pseudonymizer], list[SourceFrames]]


def _adapters() -> dict[str, Adapter]:
    # Imported lazily so that `recsys --help` stays fast and adapters stay independent.
    from recsys.data.ingest import amazon, generic, recbole, synthetic, uci, unisrec

    return {
        "unisrec": unisrec.read,
        "uci-online-retail": uci.read,
        "amazon-json": amazon.read,
        "recbole": recbole.read,
        "generic": generic.read,
        "synthetic": synthetic.read,
    }


def ingest(opts: IngestOptions, pseudonymizer: Pseudonymizer | None = None) -> list[PlatformWrite]:
    """Ingest one source into the lake; returns what was written, one entry per platform."""
    key_source = "given"
    if pseudonymizer is None:
        key, key_source = load_key()
        pseudonymizer = Pseudonymizer(key)
    started = time.perf_counter()
    frames = _adapters()[opts.source](opts, pseudonymizer)
    written = []
    for fr in frames:
        events, items = finalize(
            fr.platform, fr.events, fr.items, fr.ledger, source_file=fr.source_file,
            min_user_events=max(fr.min_user_events, opts.min_user_events),
            min_item_events=max(fr.min_item_events, opts.min_item_events),
        )
        report = _report(opts, fr, events, items, pseudonymizer, key_source,
                         time.perf_counter() - started)
        written.append(write_platform(
            opts.out, fr.platform, events, items,
            fr.ledger.quarantine_table("events"), fr.ledger.quarantine_table("items"),
            report, opts.buckets,
        ))
        ev = report["events"]
        log.info("ingested %s/%s: %d rows in -> %d out, %d quarantined, %d filtered",
                 opts.source, fr.platform, ev["rows_in"], ev["rows_out"], ev["rows_quarantined"],
                 ev["rows_filtered"])
    return written


def _report(opts: IngestOptions, fr: SourceFrames, events: Any, items: Any,
            pseudo: Pseudonymizer, key_source: str, seconds: float) -> dict[str, Any]:
    ts = events["timestamp"]
    return {
        "schema_version": SCHEMA_VERSION,
        "platform": fr.platform,
        "source": opts.source,
        "recipe": opts.recipe,
        "path": str(opts.path) if opts.path else None,
        "created_at": datetime.now(UTC).isoformat(),
        "seconds": round(seconds, 3),
        "pseudonym_key_fingerprint": pseudo.fingerprint,
        "pseudonym_key_source": key_source,
        "events": fr.ledger.events.to_dict(),
        "items": fr.ledger.items.to_dict(),
        "users": pc.count_distinct(events["user_id"]).as_py(),
        "items_with_events": pc.count_distinct(events["item_id"]).as_py(),
        "catalog_items": items.num_rows,
        "first_event": str(pc.min(ts).as_py()) if events.num_rows else None,
        "last_event": str(pc.max(ts).as_py()) if events.num_rows else None,
        "event_types": {r["values"]: r["counts"] for r in
                        pc.value_counts(events["event_type"]).to_pylist()},
        "quirks": fr.ledger.quirks,
    }
