"""Any CSV/Parquet/JSON-lines event log with a column mapping (source ``generic``).

``--path`` is a file or a directory of files with the same columns (read in name order, e.g.
one file per day: new logs arrive as new files and the platform is re-ingested whole).
:func:`read` reads it whole; with ``--chunk-rows`` :mod:`recsys.data.ingest.stream` reads it in
chunks through the same per-row functions (:func:`plan`, :func:`event_frame`,
:func:`catalog_rows`), in bounded memory.

The mapping says which source column holds each canonical field: ``opts.columns`` for events
(user_id, item_id, timestamp, event_type, quantity, price, session_id) and ``opts.item_columns``
for the catalog (item_id, title, description, brand, category, price). A canonical field that is
not mapped falls back to a source column of the same name, so a file already in canonical shape
needs no mapping at all. The mapping can also come from a YAML file, read by
:func:`load_mapping`; the CLI merges it into the options (see :func:`apply_mapping`), with
``--map`` entries given on the command line winning over the file's.

Item text is not optional: the models are text-aware, so a catalog (``--items-path``) or a title
column in the events file (``item_columns: {title: COLUMN}``) is required.

Timestamps may be datetimes, ISO strings or epoch numbers (seconds, ms, us or ns, told apart by
magnitude); everything becomes UTC. Values that cannot be parsed are left as NaT so that
:func:`~recsys.data.ingest.finalize.finalize` quarantines them as ``invalid_timestamp``, with the
source text kept beside them in ``source_timestamp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from recsys.data.ingest.base import IngestError, IngestOptions, Ledger, SourceFrames
from recsys.data.ingest.parsing import blank, id_text, parse_price, parse_timestamps
from recsys.data.ingest.tables import common_columns, read_table, source_files
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENT_TYPES

EventField = Literal["user_id", "item_id", "timestamp", "event_type", "quantity", "price",
                     "session_id"]
ItemField = Literal["item_id", "title", "description", "brand", "category", "price"]
EVENT_FIELDS: tuple[EventField, ...] = get_args(EventField)
ITEM_FIELDS: tuple[ItemField, ...] = get_args(ItemField)
_REQUIRED_EVENT_FIELDS = ("user_id", "item_id", "timestamp")


# --------------------------------------------------------------------------- mapping file


class MappingFile(BaseModel):
    """The YAML mapping: ``{columns: {...}, item_columns: {...}, event_type: ...}``.

    Unknown keys are errors rather than ignored: a typo such as ``user: CustomerID`` would
    otherwise silently fall back to a default column. A field mapped to null is not mapped.
    """

    model_config = ConfigDict(extra="forbid")

    columns: dict[EventField, str | None] = {}
    item_columns: dict[ItemField, str | None] = {}
    event_type: str | None = None


def load_mapping(path: Path) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Read a YAML column mapping; returns ``(columns, item_columns, event_type)``.

    Pure (no options touched): the CLI merges the result into :class:`IngestOptions`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(str(path), f"cannot read mapping file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise IngestError(str(path), f"not valid YAML: {exc}",
                          row=mark.line + 1 if mark is not None else None) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise IngestError(str(path), "a mapping file must be a YAML mapping with keys "
                          "'columns', 'item_columns', 'event_type'")
    try:
        parsed = MappingFile.model_validate(data)
    except ValidationError as exc:
        raise IngestError(str(path), _explain(exc)) from exc
    return (_mapped(parsed.columns, EVENT_FIELDS), _mapped(parsed.item_columns, ITEM_FIELDS),
            parsed.event_type)


def _mapped(mapping: dict[str, str | None], order: tuple[str, ...]) -> dict[str, str]:
    """Mapped fields only, in canonical field order."""
    return {name: col for name in order if (col := mapping.get(name)) is not None}


def _explain(exc: ValidationError) -> str:
    """Name each offending key and what is allowed there: pydantic's text alone is cryptic."""
    allowed = {(): list(MappingFile.model_fields), ("columns",): list(EVENT_FIELDS),
               ("item_columns",): list(ITEM_FIELDS)}
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        if err["type"] == "literal_error" and loc[-1:] == ("[key]",):
            loc = loc[:-1]  # a key of columns/item_columns that is not a canonical field
        elif err["type"] != "extra_forbidden":
            problems.append(f"{'.'.join(loc)}: {err['msg']}")
            continue
        problems.append(f"unknown key {'.'.join(loc)!r} (allowed: {allowed.get(loc[:-1], [])})")
    return "invalid mapping: " + "; ".join(problems)


def apply_mapping(opts: IngestOptions, path: Path) -> IngestOptions:
    """Options with a mapping file merged in; entries already in ``opts`` (from --map) win."""
    columns, item_columns, event_type = load_mapping(path)
    return opts.model_copy(update={
        "columns": {**columns, **opts.columns},
        "item_columns": {**item_columns, **opts.item_columns},
        "event_type": opts.event_type or event_type,
    })


# --------------------------------------------------------------------------- reading


def _read_files(files: list[Path], columns: list[str],
                ledger: Ledger) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The needed columns of every file, concatenated: (frame, _file per row, _row per row).

    A CSV that is not valid UTF-8 is read as Latin-1 and recorded as a quirk.
    """
    frames, files_of, rows_of = [], [], []
    for f in files:
        df, first_row, encoding = read_table(f, columns)
        if encoding not in (None, "utf-8"):
            ledger.quirk(f"encoding:{f.name}", f"{encoding} (not valid UTF-8)")
        frames.append(df)
        files_of.append(np.full(len(df), str(f), dtype=object))
        rows_of.append(np.arange(first_row, first_row + len(df), dtype=np.int64))
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df, np.concatenate(files_of), np.concatenate(rows_of)


def _resolve(mapping: dict[str, str], fields: tuple[str, ...], available: list[str], path: Path,
             required: tuple[str, ...], hint: str) -> dict[str, str]:
    """Canonical field -> source column, checked against the file's header."""
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise IngestError(str(path), f"unknown canonical field(s) {unknown} in the column "
                          f"mapping; allowed: {list(fields)}")
    out: dict[str, str] = {}
    for name in fields:
        if name in mapping:
            col = mapping[name]
            if col not in available:
                raise IngestError(str(path), f"mapped column {col!r} (for {name}) not found; the "
                                  f"file has {available}", column=col)
            out[name] = col
        elif name in available:
            out[name] = name
    for name in required:
        if name not in out:
            raise IngestError(str(path), f"no column for {name}: map one with "
                              f"{hint} {name}=COLUMN (the file has {available})", column=name)
    return out


# --------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class Plan:
    """What a generic source is, checked before reading any row: its files and column mapping.
    ``item_columns``: item fields read from the events file (no separate catalog)."""

    path: Path
    platform: str
    files: list[Path]
    columns: dict[str, str]
    item_columns: dict[str, str]


def plan(opts: IngestOptions) -> Plan:
    """Resolve the files and the mapping of a generic source (errors name what is missing)."""
    path = opts.source_path()
    if opts.event_type is not None and opts.event_type not in EVENT_TYPES:
        raise IngestError(str(path), f"event type {opts.event_type!r} is not one of "
                          f"{list(EVENT_TYPES)}")
    files = source_files(path)
    available = common_columns(files)
    cols = _resolve(opts.columns, EVENT_FIELDS, available, path, _REQUIRED_EVENT_FIELDS, "--map")
    if "event_type" not in cols and opts.event_type is None:
        raise IngestError(str(path), "no event type: map an event_type column or give a constant "
                          f"event type (one of {list(EVENT_TYPES)})", column="event_type")
    item_cols_in_events: dict[str, str] = {}
    if opts.items_path is None:
        item_cols_in_events = _catalog_columns(opts, available, path)
    return Plan(path, opts.platform or path.stem.lower(), files, cols, item_cols_in_events)


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    """Events (and catalog) of one platform from a mapped CSV/Parquet/JSON-lines file."""
    p = plan(opts)
    ledger = Ledger(pseudo)
    needed = sorted(set(p.columns.values()) | set(p.item_columns.values()))
    df, source_file, source_row = _read_files(p.files, needed, ledger)
    ledger.events.rows_in = len(df)
    events = event_frame(df, p.columns, opts, ledger, source_file, source_row)
    if opts.items_path is not None:
        items = read_catalog(Path(opts.items_path), opts.item_columns, ledger)
    else:
        items = catalog_from_events(df.reset_index(drop=True), events, p.item_columns, p.path,
                                    ledger)
    ledger.quirk("column_mapping", {"events": p.columns, "items": opts.item_columns or "defaults"})
    return [SourceFrames(p.platform, events, items, ledger, str(p.path))]


def event_frame(df: pd.DataFrame, cols: dict[str, str], opts: IngestOptions, ledger: Ledger,
                source_file: np.ndarray | str, source_row: np.ndarray, first_index: int = 0, *,
                keep_source_timestamp: bool = False, epoch_unit: str | None = None) -> pd.DataFrame:
    """Canonical event columns (raw user ids) of source rows ``df``, which are rows
    ``first_index...`` of the source (their ``event_index``). ``source_timestamp`` (the source
    text beside unparseable timestamps) is kept when a row has one, or always with
    ``keep_source_timestamp``; ``epoch_unit`` fixes the unit of epoch timestamps."""
    n = len(df)
    events = pd.DataFrame(index=df.index)
    users, converted = id_text(df[cols["user_id"]])
    if opts.user_namespace:
        users = opts.user_namespace + ":" + users
    events["user_id"] = users
    items_ids, item_converted = id_text(df[cols["item_id"]])
    events["item_id"] = items_ids
    if converted or item_converted:
        ledger.quirk("float_ids_as_integers",
                     [f for f, c in (("user_id", converted), ("item_id", item_converted)) if c])

    if "event_type" in cols:
        etype = df[cols["event_type"]].astype("string").str.strip().str.lower()
        if opts.event_type is not None:
            etype = etype.mask(blank(etype), opts.event_type)
        events["event_type"] = etype
    else:
        events["event_type"] = opts.event_type

    ts, notes = parse_timestamps(df[cols["timestamp"]], epoch_unit)
    events["timestamp"] = ts
    for key, value in notes.items():
        ledger.quirk(key, value)
    bad_ts = ts.isna() & ~blank(df[cols["timestamp"]])
    if bad_ts.any() or keep_source_timestamp:
        # finalize quarantines NaT; keep what the source said so the quarantine is useful (the
        # quarantine writes it as text: formatting every value here would cost more than parsing).
        events["source_timestamp"] = df[cols["timestamp"]]
    if bad_ts.any():
        ledger.quirk("unparseable_timestamps", int(bad_ts.sum()))

    if "quantity" in cols:
        q = pd.to_numeric(df[cols["quantity"]], errors="coerce")
        junk = int((q.isna() & ~blank(df[cols["quantity"]])).sum())
        if junk:
            ledger.quirk("unparseable_quantities", junk)
        events["quantity"] = q
    if "price" in cols:
        price, junk = parse_price(df[cols["price"]])
        if junk:
            ledger.quirk("unparseable_event_prices", junk)
        events["price"] = price
    if "session_id" in cols:
        events["session_id"], _ = id_text(df[cols["session_id"]])
    events["event_index"] = np.arange(first_index, first_index + n, dtype=np.int64)
    events["_file"] = source_file
    events["_row"] = source_row
    return events.reset_index(drop=True)


def _catalog_columns(opts: IngestOptions, available: list[str], path: Path) -> dict[str, str]:
    """Item fields that live in the events file (no separate catalog): a title is required."""
    mapping = {k: v for k, v in opts.item_columns.items() if k != "item_id"}
    if "title" not in mapping:
        raise IngestError(str(path), "no item text: give an items file (--items-path) or map a "
                          "title column of the events file (item_columns title=COLUMN); the "
                          "models need a title for every item", column="title")
    fields = tuple(f for f in ITEM_FIELDS if f != "item_id")
    resolved = _resolve(mapping, fields, available, path, ("title",), "item_columns")
    return {k: v for k, v in resolved.items() if k in mapping}


def read_catalog(path: Path, mapping: dict[str, str], ledger: Ledger) -> pd.DataFrame:
    """The items file (catalog) as item frames, counted in ``ledger.items.rows_in``."""
    files = source_files(path)
    available = common_columns(files)
    cols = _resolve(mapping, ITEM_FIELDS, available, path, ("item_id", "title"), "item_columns")
    df, source_file, source_row = _read_files(files, sorted(set(cols.values())), ledger)
    ledger.items.rows_in = len(df)
    items = _item_fields(df, cols, ledger)
    items["item_id"], _ = id_text(df[cols["item_id"]])
    items["_file"] = source_file
    items["_row"] = source_row
    return items.reset_index(drop=True)


def _item_fields(df: pd.DataFrame, cols: dict[str, str], ledger: Ledger) -> pd.DataFrame:
    items = pd.DataFrame(index=df.index)
    for name in ("title", "description", "brand", "category"):
        if name in cols:
            items[name] = df[cols[name]]
    if "price" in cols:
        items["price"], junk = parse_price(df[cols["price"]])
        if junk:
            ledger.quirk("unparseable_item_prices", junk)
    return items


def catalog_from_events(df: pd.DataFrame, events: pd.DataFrame, cols: dict[str, str],
                        path: Path, ledger: Ledger) -> pd.DataFrame:
    """One catalog row per distinct item id, from its first event with a non-blank title.

    ``df``: source rows (in source order) holding the ``cols`` item columns; ``events``: their
    ``item_id`` and ``_row``, one per row of ``df``."""
    firsts = df.index[catalog_rows(df, events, cols, titled_only=True)]
    src = df.loc[firsts]
    items = _item_fields(src, cols, ledger)
    items["item_id"] = events.loc[firsts, "item_id"]
    items["_file"] = str(path)
    items["_row"] = events.loc[firsts, "_row"]
    items = items.sort_values("_row", kind="stable").reset_index(drop=True)
    ledger.items.rows_in = len(items)
    ledger.quirk("catalog_from_events", f"{len(items)} distinct item ids; text from the first "
                 "event with a non-blank title")
    return items


def catalog_rows(df: pd.DataFrame, events: pd.DataFrame, cols: dict[str, str], *,
                 titled_only: bool) -> np.ndarray:
    """Positions of the rows that give each item id its catalog entry: its first row with a
    non-blank title, else its first row (``titled_only=False``: both, so that a later read of
    only these rows picks the same entry as a read of every row)."""
    has_id = ~blank(events["item_id"]).to_numpy()
    blank_title = blank(df[cols["title"]]).to_numpy()
    # Stable sort: rows with a title first, source order within; then first row per item.
    order = np.lexsort((np.arange(len(df)), blank_title))
    pick = order[has_id[order]]
    ids = events["item_id"].to_numpy()[pick]
    firsts = pick[~pd.Series(ids).duplicated(keep="first").to_numpy()]
    if titled_only:
        return firsts
    valid = np.flatnonzero(has_id)
    first_any = valid[~pd.Series(events["item_id"].to_numpy()[valid]).duplicated().to_numpy()]
    return np.union1d(firsts, first_any)


__all__ = ["EVENT_FIELDS", "ITEM_FIELDS", "EventField", "ItemField", "MappingFile", "Plan",
           "apply_mapping", "catalog_from_events", "catalog_rows", "event_frame", "load_mapping",
           "plan", "read", "read_catalog"]
