"""What every ingest adapter shares: options in, frames out, the adapter signature, the ledger.

An adapter (:class:`Adapter`) parses its source into two pandas frames with canonical column
names (raw user ids), recording in the :class:`Ledger` every row it rejects (quarantine, with a
reason) or removes by a rule (filter, e.g. cancellations), and returns them as
:class:`SourceFrames`. :func:`recsys.data.ingest.finalize.finalize` then applies the checks every
source needs. The ledger makes the invariant ``rows_in == rows_out + quarantined + filtered``
checkable for every run.

Adapters import this module and the shared parsers (``parsing``, ``tables``) only, never the
runner: the runner imports the adapters, so the import graph has no cycle.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recsys.data.pseudonym import ID_PREFIX, IdKind, Pseudonymizer, identifier_kind
from recsys.data.schema import (
    QUARANTINE_KEY_METADATA,
    QUARANTINE_META_COLUMNS,
    QUARANTINE_PSEUDONYMISED_METADATA,
    validate_platform_name,
)

SourceKind = Literal["unisrec", "uci-online-retail", "amazon-json", "recbole", "generic",
                     "synthetic", "feedback"]
"""Names of the ingest sources; :data:`recsys.data.ingest.runner.ADAPTERS` maps each to its
adapter."""
SOURCE_KINDS: tuple[SourceKind, ...] = get_args(SourceKind)


class IngestError(ValueError):
    """A source that cannot be read at all: names the file, and the row and column if known."""

    def __init__(self, file: str, message: str, row: int | None = None, column: str | None = None):
        where = file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.row, self.column = file, row, column


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
    chunk_rows: int | None = Field(
        None, ge=1000, description="generic: stream the source in chunks of this many rows "
        "(bounded memory, spilled to per-bucket files); null: read it whole in memory")
    # synthetic
    seed: int = Field(0, description="random seed (synthetic data; unisrec-or tie order)")
    scale: float = Field(1.0, gt=0, description="synthetic: size multiplier (1.0 ~ 60k events)")
    num_platforms: int = Field(3, ge=1, le=26, description="synthetic: number of platforms")
    impressions: list[str] = Field(
        default_factory=list, description="synthetic: platforms that also log impression "
        "events (the other items of the page each choice was made from)")

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
        if self.chunk_rows is not None and self.source != "generic":
            problems.append(f"chunk_rows (--chunk-rows, streaming ingest) is for source "
                            f"'generic' only, not {self.source!r}")
        if self.chunk_rows is not None and max(self.min_user_events, self.min_item_events) > 1:
            problems.append("min_user_events/min_item_events (--min-user-events/"
                            "--min-item-events, k-core) need every event at once: not "
                            "available with chunk_rows (--chunk-rows, streaming ingest); "
                            "drop one of them")
        if self.impressions and self.source != "synthetic":
            problems.append("impressions is a synthetic option (a real source logs its own "
                            "impression events)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def source_path(self) -> Path:
        """``path``, which the validator requires for every source but synthetic."""
        if self.path is None:
            raise ValueError(f"--path is required for source {self.source!r}")
        return Path(self.path)


@dataclass
class RowCounts:
    """In/out bookkeeping of one table (events or items)."""

    rows_in: int = 0
    rows_out: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    frames: list[pd.DataFrame] = field(default_factory=list, repr=False)
    # Quarantine column -> what its values were hashed as (IdKind).
    pseudonymised: dict[str, IdKind] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + sum(self.quarantined.values()) + sum(
            self.filtered.values()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_quarantined": sum(self.quarantined.values()),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "rows_filtered": sum(self.filtered.values()),
            "filtered_by_rule": dict(sorted(self.filtered.items())),
            "invariant_holds": self.balanced,
            "quarantine_pseudonymised_columns": dict(sorted(self.pseudonymised.items())),
        }


@dataclass
class Ledger:
    """Counts and quarantined rows of one ingest run, plus the quirks the adapter noticed."""

    pseudonymizer: Pseudonymizer
    # Columns whose values are already pseudonyms of this key (source ``feedback``): quarantined
    # as they are, not hashed a second time.
    pseudonyms: frozenset[str] = frozenset()
    events: RowCounts = field(default_factory=RowCounts)
    items: RowCounts = field(default_factory=RowCounts)
    quirks: dict[str, Any] = field(default_factory=dict)

    def quarantine(
        self,
        table: str,
        rows: pd.DataFrame,
        reason: str,
        *,
        column: str | None,
        file: str,
        row_numbers: pd.Series | np.ndarray | None = None,
        user_column: str | None = None,
        session_columns: Iterable[str] = (),
    ) -> None:
        """Keep rejected rows, as strings, with file/row/column/reason.

        Identifier columns are pseudonymised with the run's key, the way the lake hashes them:
        ``user_column`` and ``user_id`` as user ids, ``session_columns`` and ``session_id`` as
        session ids, and any other column whose name looks like an identifier
        (:func:`~recsys.data.pseudonym.identifier_kind`: CustomerID, InvoiceNo, email, ...) as
        a generic id. Everything else stays as text so that a rejected row can be diagnosed.
        """
        if len(rows) == 0:
            return
        counts = self.events if table == "events" else self.items
        counts.quarantined[reason] += len(rows)
        out = rows.copy()
        if row_numbers is None:
            row_numbers = out["_row"] if "_row" in out else out.index.to_numpy() + 1
        sessions = set(session_columns)
        for col in list(out.columns):
            if col.startswith("_"):
                out = out.drop(columns=col)
                continue
            kind: IdKind | None = ("user" if col == user_column else
                                   "session" if col in sessions else identifier_kind(str(col)))
            if kind is None or col in self.pseudonyms:
                out[col] = _as_text(out[col])
                if kind is not None:
                    counts.pseudonymised[str(col)] = kind
            else:
                out[col] = self._pseudonymise(out[col], kind)
                counts.pseudonymised[str(col)] = kind
        out.insert(0, "_reason", reason)
        out.insert(0, "_column", column)
        out.insert(0, "_row", np.asarray(row_numbers, dtype=np.int64))
        out.insert(0, "_file", file)
        counts.frames.append(out.reset_index(drop=True))

    def _pseudonymise(self, values: pd.Series, kind: IdKind) -> pd.Series:
        """Hash every non-blank value; nulls stay null, blanks become "" (not identifying)."""
        text = _as_text(values)
        raw = [None if pd.isna(v) else str(v) for v in text]
        keep = [v if v is None or v.strip() else "" for v in raw]
        hashed = self.pseudonymizer.many((v or None for v in keep), prefix=ID_PREFIX[kind])
        return pd.Series(pd.array([h if h is not None else k for h, k in zip(hashed, keep)],
                                  dtype="string"), index=values.index)

    def filter(self, table: str, count: int, rule: str) -> None:
        """Rows removed on purpose by a named rule (dedup, k-core, cancellations, ...)."""
        if count:
            (self.events if table == "events" else self.items).filtered[rule] += int(count)

    def quirk(self, name: str, value: Any) -> None:
        self.quirks[name] = value

    def quarantine_table(self, table: str) -> pa.Table:
        """The rejected rows of ``table``; the schema metadata names the pseudonymised columns
        (column -> IdKind, JSON) and the key's fingerprint."""
        counts = self.events if table == "events" else self.items
        if not counts.frames:
            out = pa.table({c: pa.array([], pa.string()) for c in QUARANTINE_META_COLUMNS})
        else:
            out = pa.Table.from_pandas(pd.concat(counts.frames, ignore_index=True),
                                       preserve_index=False)
        return out.replace_schema_metadata({**(out.schema.metadata or {}),
                                            **self.quarantine_metadata(table)})

    def quarantine_metadata(self, table: str) -> dict[bytes, bytes]:
        """Schema metadata of a quarantine file: pseudonymised columns and key fingerprint."""
        counts = self.events if table == "events" else self.items
        return {QUARANTINE_PSEUDONYMISED_METADATA: json.dumps(
                    dict(sorted(counts.pseudonymised.items()))).encode(),
                QUARANTINE_KEY_METADATA: self.pseudonymizer.fingerprint.encode()}


@dataclass
class RowRules:
    """Rules applied in a fixed order to the rows of a source: each row is counted under the
    *first* rule that removes it, so the ledger's counts add up to the rows of the file."""

    ledger: Ledger
    rows: pd.DataFrame  # the source rows as they are quarantined, with _file and _row
    user_column: str | None = None  # raw user ids in ``rows``, hashed when quarantined
    session_columns: tuple[str, ...] = ()  # raw session/invoice ids, hashed as session ids
    table: str = "events"
    alive: np.ndarray = field(init=False)  # (n,) bool: not yet removed by any rule

    def __post_init__(self) -> None:
        self.alive = np.ones(len(self.rows), dtype=bool)

    def quarantine(self, bad: np.ndarray, reason: str, column: str) -> None:
        """Quarantine the alive rows where ``bad`` (grouped by source file)."""
        hit = self.alive & bad
        if not hit.any():
            return
        for fname, part in self.rows[hit].groupby("_file", sort=False):
            self.ledger.quarantine(self.table, part, reason, column=column, file=str(fname),
                                   user_column=self.user_column,
                                   session_columns=self.session_columns)
        self.alive &= ~hit

    def filter(self, bad: np.ndarray, rule: str) -> None:
        """Remove the alive rows where ``bad``, counted under ``rule``."""
        hit = self.alive & bad
        self.ledger.filter(self.table, int(hit.sum()), rule)
        self.alive &= ~hit

    def filter_duplicates(self, key: pd.DataFrame, rule: str = "duplicate") -> None:
        """Remove alive rows whose ``key`` (one row per source row) equals an earlier alive
        row's; the first is kept."""
        dup = np.zeros(len(self.alive), dtype=bool)
        dup[np.flatnonzero(self.alive)] = key[self.alive].duplicated(keep="first").to_numpy()
        self.filter(dup, rule)


def _as_text(values: pd.Series) -> pd.Series:
    """Source values as strings, vectorised unless the column holds lists."""
    if values.dtype == object:
        sample = values.dropna()
        if len(sample) and isinstance(sample.iloc[0], (list, tuple, np.ndarray)):
            return values.map(_to_text).astype("string")
    return values.astype("string")


def _to_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if value is pd.NaT:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return " > ".join(str(v) for v in value)
    return str(value)


@dataclass
class SourceFrames:
    """One platform's parsed source, ready for :func:`~recsys.data.ingest.finalize.finalize`.

    ``events`` columns: user_id (raw), item_id, event_type, timestamp, event_index, optional
    quantity/price/session_id, and ``_file``/``_row`` for provenance. ``items`` columns:
    item_id, title, optional description/brand/category/price, ``_file``/``_row``.
    """

    platform: str
    events: pd.DataFrame
    items: pd.DataFrame
    ledger: Ledger
    source_file: str
    min_user_events: int = 0
    min_item_events: int = 0
    pseudonymised: bool = False  # user and session ids are already the lake key's pseudonyms


class Adapter(Protocol):
    """One source's reader: options in, one :class:`SourceFrames` per platform out."""

    def __call__(self, opts: IngestOptions, pseudo: Pseudonymizer, /) -> list[SourceFrames]: ...


__all__ = ["SOURCE_KINDS", "Adapter", "IngestError", "IngestOptions", "Ledger", "RowCounts",
           "RowRules", "SourceFrames", "SourceKind"]
