"""Ray Data pipeline: lake -> validated events -> sequences -> leave-one-out examples on disk.

Parallel over (platform, user bucket) with no shuffle (a user's events share one bucket file).
Writes, into a staging directory swapped in at the end::

    OUT/train/*.parquet, OUT/valid/*.parquet, OUT/test/*.parquet   (schema: examples_schema())
    OUT/catalog/<platform>.parquet    item_idx, item_id, title, ..., text, text_hash
    OUT/tokens.parquet                text_hash -> token_ids, one row per distinct item text
    OUT/manifest.json                 config, counts per platform, input fingerprint
                                      (:class:`ExampleManifest`, read and written only here)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from recsys.config import StrictModel
from recsys.data.catalog import TextConfig, build_catalog, tokenize_batch, unique_texts
from recsys.data.lake import event_files, list_platforms, platform_dir, read_items, read_report
from recsys.data.schema import EVENTS_SCHEMA, IMPRESSION, check_schema
from recsys.data.sequences import (
    SPLITS,
    SequenceConfig,
    build_examples,
    examples_schema,
    item_index,
    user_sequences,
)
from recsys.data.staging import staged_dir

log = logging.getLogger(__name__)


class DataConfig(StrictModel):
    """Which lake, which platforms, and how to turn their logs into examples."""

    lake: str = "runs/demo/lake"
    examples: str = "runs/demo/examples"
    platforms: list[str] | None = None
    """Platforms to read (None: every platform in the lake)."""
    sequences: SequenceConfig = SequenceConfig()
    text: TextConfig = TextConfig()
    tokenize: bool = True
    """Tokenise item text once per distinct text (needs the encoder's tokenizer)."""


MANIFEST = "manifest.json"


class PlatformCounts(StrictModel):
    """One platform of an example set: its catalog, its users and the rows of each split.

    The split counts are 0 for a platform whose users are all too short for an example.
    """

    catalog_items: int
    lake_users: int
    """Users of the platform in the lake."""
    users_too_short: int
    """Lake users with fewer than ``sequences.min_seq_len`` interactions (no example)."""
    train_rows: int = 0
    valid_rows: int = 0
    test_rows: int = 0
    users: int = 0
    """Users with examples (one test row each)."""
    mean_history: float = 0.0
    """Mean history length of the test rows."""
    impressions: int = 0
    """Impression events in the lake (exposures: never in histories, CTR negatives)."""
    last_event: datetime | None = None
    """The newest event of the platform in the lake (None: a set built before it was kept)."""


class TextCounts(StrictModel):
    """Item texts of all catalogs, tokenised once per distinct text."""

    distinct_texts: int
    catalog_rows: int
    encoder: str | None = None
    """Set when the texts were tokenised (``tokenize: true``), as are the token counts."""
    tokens_total: int | None = None
    tokens_mean: float | None = None


class ExampleManifest(StrictModel):
    """``manifest.json`` of an example set: what was built, from what, and how much."""

    created_at: datetime
    seconds: float
    input_fingerprint: str
    """:func:`input_fingerprint` of the lake reports and the config."""
    config: DataConfig
    platforms: dict[str, PlatformCounts]
    text: TextCounts
    shown: bool = False
    """The lake holds impression events: rows carry ``shown`` (the CTR head's negatives)."""

    def as_json_dict(self) -> dict[str, Any]:
        """The manifest as ``manifest.json`` holds it: token counts are absent, not null, when
        the texts were not tokenised."""
        data = self.model_dump(mode="json")
        data["text"] = self.text.model_dump(mode="json", exclude_none=True)
        return data

    def summary(self) -> str:
        """A table per platform and the text counts, as ``recsys examples`` prints them."""
        head = f"{'platform':<16}{'items':>8}{'users':>9}{'too short':>10}{'train':>9}" \
               f"{'valid':>9}{'test':>9}{'mean hist':>10}"
        lines = [head, "-" * len(head)]
        for name, c in self.platforms.items():
            lines.append(f"{name:<16}{c.catalog_items:>8,}{c.users:>9,}{c.users_too_short:>10,}"
                         f"{c.train_rows:>9,}{c.valid_rows:>9,}{c.test_rows:>9,}"
                         f"{c.mean_history:>10}")
        t = self.text
        tokens = f" ({t.tokens_total:,} tokens)" if t.tokens_total is not None else ""
        lines.append(f"item texts: {t.catalog_rows:,} catalog rows -> {t.distinct_texts:,} "
                     f"distinct texts tokenised once{tokens}")
        return "\n".join(lines)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(self.as_json_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ExampleManifest:
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{directory} is not an example set (no {MANIFEST}): build "
                                    "it with the data stage first")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ValueError(f"{path} does not match this version's example-set manifest "
                             f"(rebuild the example set): {exc}") from exc


@dataclass(frozen=True)
class ExampleSet:
    """An example set on disk (``path``) and its manifest, read once."""

    path: Path
    manifest: ExampleManifest

    def split_path(self, split: str) -> Path:
        return self.path / split


COUNTS_SCHEMA = pa.schema([("platform", pa.string()), ("split", pa.string()),
                           ("rows", pa.int64()), ("history_items", pa.int64())])


def _bucket_examples(batch: pa.Table, lake: str, seq_cfg: dict[str, Any], out: str,
                     platforms: list[str], shown: bool) -> pa.Table:
    """Ray Data task body: one (platform, bucket file) -> its examples, written straight to
    ``out/<split>/<platform>-<bucket>.parquet``; returns only per-split counts (a few rows).
    With ``cross_platform`` the task also reads the same users' events on ``platforms``;
    ``shown``: the lake holds impressions (every file gets the ``shown`` column)."""
    cfg = SequenceConfig.model_validate(seq_cfg)
    counts = []
    for platform, path in zip(batch["platform"].to_pylist(), batch["path"].to_pylist()):
        events = _read_events(path)
        if cfg.cross_platform:
            table = _cross_examples(lake, platform, path, events, cfg, platforms, shown)
        else:
            table, _ = build_examples(events, _catalog(lake, platform), cfg, platform, shown)
        for split in SPLITS:
            part = _select_split(table, split)
            if part.num_rows:
                pq.write_table(part, Path(out) / split / f"{platform}-{Path(path).stem}.parquet")
            hist = pc.sum(pc.list_value_length(part["history"])).as_py() if part.num_rows else 0
            counts.append({"platform": platform, "split": split, "rows": part.num_rows,
                           "history_items": int(hist or 0)})
    return pa.Table.from_pylist(counts, schema=COUNTS_SCHEMA)


def _read_events(path: str | Path, users: pa.Array | None = None) -> pa.Table:
    events = pq.read_table(path)
    check_schema(events.schema, EVENTS_SCHEMA, str(path))
    if users is not None:
        events = events.filter(pc.is_in(events["user_id"], value_set=users))
    _check_required(events, str(path))
    return events


def _catalog(lake: str, platform: str) -> pa.Array:
    return item_index(pq.read_table(platform_dir(lake, platform) / "items" / "items.parquet",
                                    columns=["item_id"])["item_id"])


def same_user_files(path: str | Path, files: list[Path], other: list[Path]) -> list[Path]:
    """The event files of another platform that can hold users of bucket file ``path`` (one of
    ``files``). A user's bucket is ``h % n`` for one hash ``h`` (``lake.user_bucket``), so bucket
    ``b`` of ``n`` and bucket ``i`` of ``m`` share users only if ``i = b (mod gcd(n, m))``: with
    equal bucket counts that is one file. Files not named ``bucket-<i>``: all of them."""
    import math

    def number(p: Path) -> int | None:
        tail = p.stem.rpartition("-")[2]
        return int(tail) if p.stem.startswith("bucket-") and tail.isdigit() else None

    b, nums = number(Path(path)), [number(f) for f in other]
    if b is None or None in nums or any(number(f) is None for f in files):
        return list(other)
    g = math.gcd(len(files), len(other))
    return [f for f, i in zip(other, nums) if i is not None and i % g == b % g]


def _cross_examples(lake: str, platform: str, path: str, events: pa.Table, cfg: SequenceConfig,
                    platforms: list[str], shown: bool) -> pa.Table:
    """Examples of one bucket of ``platform`` whose histories merge in the same users' events on
    the other platforms (``recsys.data.crossplatform``)."""
    from recsys.data.crossplatform import build_cross_examples

    users = pc.unique(events["user_id"])
    files = event_files(lake, platform)
    seqs = {platform: user_sequences(events, _catalog(lake, platform), cfg)}
    for other in platforms:
        if other == platform:
            continue
        parts = [_read_events(f, users)
                 for f in same_user_files(path, files, event_files(lake, other))]
        seqs[other] = user_sequences(pa.concat_tables(parts), _catalog(lake, other), cfg)
    return build_cross_examples(seqs, platform, cfg, platforms, shown)[0]


def _check_required(events: pa.Table, path: str) -> None:
    """The lake was validated at ingest; a null here means the file was altered since."""
    for field in EVENTS_SCHEMA:
        if not field.nullable:
            nulls = events[field.name].null_count
            if nulls:
                first = pc.index(pc.is_null(events[field.name]), True).as_py()
                raise ValueError(f"{path}: row {first}, column {field.name!r}: {nulls} null "
                                 "value(s) in a required field (was the lake edited by hand?)")


def _select_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split))


def input_fingerprint(lake: str | Path, platforms: list[str], cfg: DataConfig) -> str:
    """Hash of the lake's reports (they change on every ingest) and of the config, not of
    where the output goes: same inputs, same fingerprint."""
    # A new option at its default leaves the fingerprint as it was (no rebuild of old sets).
    exclude: dict[str, Any] = {"examples": True}
    if not cfg.sequences.cross_platform:
        exclude["sequences"] = {"cross_platform"}
    h = hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude=exclude),
                                  sort_keys=True).encode())
    for p in platforms:
        h.update(p.encode())
        h.update((platform_dir(lake, p) / "report.json").read_bytes())
    return h.hexdigest()[:16]


def build_example_set(cfg: DataConfig) -> ExampleSet:
    """Run the pipeline on the connected Ray cluster and write the example set."""
    import ray

    started = time.perf_counter()
    platforms = cfg.platforms or list_platforms(cfg.lake)
    if not platforms:
        raise FileNotFoundError(f"lake {cfg.lake} has no platforms: run `recsys ingest` first")
    missing = [p for p in platforms if not platform_dir(cfg.lake, p).is_dir()]
    if missing:
        raise FileNotFoundError(f"platform(s) {missing} not in lake {cfg.lake}; "
                                f"present: {list_platforms(cfg.lake)}")
    out = Path(cfg.examples)
    with staged_dir(out) as staging:
        (staging / "catalog").mkdir()
        # 1. Catalogs (small; driver) and token ids once per distinct text (Ray Data).
        catalogs = {p: build_catalog(read_items(cfg.lake, p), cfg.text.fields) for p in platforms}
        for p, cat in catalogs.items():
            pq.write_table(cat, staging / "catalog" / f"{p}.parquet")
        texts = unique_texts(list(catalogs.values()))
        text = TextCounts(distinct_texts=texts.num_rows,
                          catalog_rows=sum(c.num_rows for c in catalogs.values()))
        if cfg.tokenize:
            tok_ds = ray.data.from_arrow(texts).map_batches(
                tokenize_batch, batch_format="pyarrow", batch_size=1024,
                fn_kwargs={"encoder": cfg.text.encoder, "max_tokens": cfg.text.max_tokens})
            tokens = pa.concat_tables(ray.get(tok_ds.to_arrow_refs()))
            pq.write_table(tokens, staging / "tokens.parquet")
            lengths = pc.list_value_length(tokens["token_ids"]).to_numpy(zero_copy_only=False)
            text = text.model_copy(update={
                "encoder": cfg.text.encoder, "tokens_total": int(lengths.sum()),
                "tokens_mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0})

        # 2. Examples: one Ray Data task per (platform, bucket) that also writes its three
        #    split files, in a single execution (no materialize, no per-split re-scan).
        for split in SPLITS:
            (staging / split).mkdir()
        tasks = [{"platform": p, "path": str(f)} for p in platforms
                 for f in event_files(cfg.lake, p)]
        shown = any(impressions(cfg.lake, p) for p in platforms)
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            _bucket_examples, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"lake": str(cfg.lake), "seq_cfg": cfg.sequences.model_dump(),
                       "out": str(staging), "platforms": list(platforms), "shown": shown},
        )
        counts = _count_rows(pa.concat_tables([COUNTS_SCHEMA.empty_table()]
                                              + ray.get(ds.to_arrow_refs())))

        manifest = ExampleManifest(
            created_at=datetime.now(UTC),
            seconds=round(time.perf_counter() - started, 2),
            input_fingerprint=input_fingerprint(cfg.lake, platforms, cfg),
            config=cfg,
            platforms={p: _platform_counts(cfg.lake, p, catalogs[p], counts.get(p, {}))
                       for p in platforms},
            text=text,
            shown=shown,
        )
        manifest.write(staging)
    return ExampleSet(out, manifest)


def _count_rows(per_task: pa.Table) -> dict[str, dict[str, float]]:
    """Rows per platform and split, users with examples, mean history length, from the
    per-task counts (only these few rows come back to the driver)."""
    counts: dict[str, dict[str, float]] = {}
    for r in per_task.to_pylist():
        if not r["rows"]:
            continue
        c = counts.setdefault(r["platform"], {f"{s}_rows": 0 for s in SPLITS}
                              | {"history_items": 0})
        c[f"{r['split']}_rows"] += r["rows"]
        if r["split"] == "test":
            c["history_items"] += r["history_items"]
    for c in counts.values():
        c["users"] = c["test_rows"]
        c["mean_history"] = round(c.pop("history_items") / max(c["users"], 1), 2)
    return counts


def _platform_counts(lake: str, platform: str, catalog: pa.Table,
                     counts: dict[str, float]) -> PlatformCounts:
    lake_users = read_report(lake, platform)["users"]
    return PlatformCounts.model_validate(
        {"catalog_items": catalog.num_rows, "lake_users": lake_users,
         "users_too_short": lake_users - counts.get("users", 0),
         "impressions": impressions(lake, platform), "last_event": last_event(lake, platform),
         **counts})


def last_event(lake: str | Path, platform: str) -> datetime | None:
    """The newest event timestamp of a platform's lake partition (its timestamp column only)."""
    newest = [pc.max(pq.read_table(f, columns=["timestamp"])["timestamp"]).as_py()
              for f in event_files(lake, platform)]
    return max((t for t in newest if t is not None), default=None)


def impressions(lake: str | Path, platform: str) -> int:
    """Impression events of a platform in the lake (its ingest report counts event types)."""
    return int(read_report(lake, platform).get("event_types", {}).get(IMPRESSION, 0))


def load_example_set(path: str | Path) -> ExampleSet:
    path = Path(path)
    return ExampleSet(path, ExampleManifest.read(path))


def read_split(example_set: ExampleSet, split: str) -> pa.Table:
    """A whole split as one Arrow table (evaluation, tests, small data)."""
    schema = examples_schema(example_set.manifest.config.sequences.cross_platform,
                             example_set.manifest.shown)
    files = sorted(example_set.split_path(split).glob("*.parquet"))
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
