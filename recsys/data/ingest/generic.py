"""Any CSV/Parquet event log with a column mapping (source ``generic``).

``--path`` is a file or a directory of files with the same columns (read in name order, e.g.
one file per day: new logs arrive as new files and the platform is re-ingested whole).

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
:func:`~recsys.data.ingest.base.finalize` quarantines them as ``invalid_timestamp``, with the
source text kept beside them in ``source_timestamp``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from recsys.data.ingest.base import IngestError, Ledger, _blank
from recsys.data.ingest.runner import IngestOptions, SourceFrames
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.schema import EVENT_TYPES

EVENT_FIELDS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "event_type", "quantity",
                                 "price", "session_id")
ITEM_FIELDS: tuple[str, ...] = ("item_id", "title", "description", "brand", "category", "price")
_REQUIRED_EVENT_FIELDS = ("user_id", "item_id", "timestamp")
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zip", ".xz", ".zst"}


# --------------------------------------------------------------------------- mapping file


class _EventColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str | None = None
    item_id: str | None = None
    timestamp: str | None = None
    event_type: str | None = None
    quantity: str | None = None
    price: str | None = None
    session_id: str | None = None


class _ItemColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str | None = None
    title: str | None = None
    description: str | None = None
    brand: str | None = None
    category: str | None = None
    price: str | None = None


class MappingFile(BaseModel):
    """The YAML mapping: ``{columns: {...}, item_columns: {...}, event_type: ...}``.

    Unknown keys are errors rather than ignored: a typo such as ``user: CustomerID`` would
    otherwise silently fall back to a default column.
    """

    model_config = ConfigDict(extra="forbid")

    columns: _EventColumns = _EventColumns()
    item_columns: _ItemColumns = _ItemColumns()
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
    return (parsed.columns.model_dump(exclude_none=True),
            parsed.item_columns.model_dump(exclude_none=True), parsed.event_type)


def _explain(exc: ValidationError) -> str:
    """Name each offending key and what is allowed there: pydantic's text alone is cryptic."""
    allowed = {(): list(MappingFile.model_fields), ("columns",): list(EVENT_FIELDS),
               ("item_columns",): list(ITEM_FIELDS)}
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {dotted!r} (allowed: {allowed.get(loc[:-1], [])})")
        else:
            problems.append(f"{dotted}: {err['msg']}")
    return "invalid mapping: " + "; ".join(problems)


def apply_mapping(opts: IngestOptions, path: Path) -> IngestOptions:
    """Options with a mapping file merged in; entries already in ``opts`` (from --map) win."""
    columns, item_columns, event_type = load_mapping(path)
    return opts.model_copy(update={
        "columns": {**columns, **opts.columns},
        "item_columns": {**item_columns, **opts.item_columns},
        "event_type": opts.event_type or event_type,
    })


# --------------------------------------------------------------------------- value parsing


def parse_price(values: pd.Series) -> tuple[pd.Series, int]:
    """Prices as floats; strings like ``"$1,299.00"`` are cleaned. Returns (prices, #junk).

    Junk (ranges such as ``"$5 - $9"``, HTML, words) becomes missing and is counted, not fatal:
    a price is a feature, not a key.
    """
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype("float64"), 0
    text = values.astype("string").str.strip()
    cleaned = text.str.replace(r"^(?:US\s*)?[$€£¥]\s*|,", "", regex=True)
    out = pd.to_numeric(cleaned, errors="coerce").astype("float64")
    junk = ~_blank(values) & out.isna()
    return out, int(junk.sum())


_TZ_SUFFIX = re.compile(r"(?:Z|[+-]\d\d:?\d\d)$")


def parse_timestamps(values: pd.Series) -> tuple[pd.Series, dict[str, Any]]:
    """Any timestamp column -> UTC datetimes (NaT where unparseable) plus what was assumed.

    Epoch numbers are told apart by magnitude of the median: below 1e11 seconds (year 5138),
    below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds.
    """
    notes: dict[str, Any] = {}
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC"), notes
    if pd.api.types.is_datetime64_dtype(values):
        if values.notna().any():
            notes["naive_timestamps_assumed_utc"] = int(values.notna().sum())
        return values.dt.tz_localize("UTC"), notes
    present = ~_blank(values)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype("float64")
    else:
        numbers = pd.to_numeric(values.where(present), errors="coerce")
        if present.any() and not numbers[present].notna().all():
            numbers = None  # not an epoch column: parse as date strings
    if numbers is not None:
        magnitude = float(np.nanmedian(np.abs(numbers.to_numpy()))) if numbers.notna().any() \
            else 0.0
        unit = "s" if magnitude < 1e11 else "ms" if magnitude < 1e14 else "us" \
            if magnitude < 1e17 else "ns"
        notes["timestamp_epoch_unit"] = unit
        if pd.api.types.is_integer_dtype(values):
            numbers = values  # int64 ns epochs would lose precision as float64
        return pd.to_datetime(numbers, unit=unit, utc=True, errors="coerce"), notes
    text = values.astype("string").str.strip()
    parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    loose = present & parsed.isna()
    if loose.any():
        # Not ISO 8601 (e.g. "12/1/2010 8:26"): let pandas guess per value, and say so.
        second = pd.to_datetime(text[loose], utc=True, errors="coerce", format="mixed")
        parsed = parsed.where(~loose, second)
        n_loose = int(second.notna().sum())
        if n_loose:
            notes["timestamps_parsed_loosely"] = n_loose
    naive = present & parsed.notna() & ~text.str.contains(_TZ_SUFFIX, na=False)
    if naive.any():
        notes["naive_timestamps_assumed_utc"] = int(naive.sum())
    return parsed, notes


def id_text(values: pd.Series) -> tuple[pd.Series, bool]:
    """Ids as strings; float columns of whole numbers (``17850.0``) lose the ``.0``.

    Returns (ids, whether floats were converted). Without this a Parquet id column with missing
    values (stored as float) would never match the same ids read from a CSV.
    """
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if len(finite) and bool((finite == np.floor(finite)).all()):
            return values.astype("Int64").astype("string"), True
    return values.astype("string").str.strip(), False


# --------------------------------------------------------------------------- reading


def _kind(path: Path) -> tuple[str, str | None]:
    """('csv', separator) or ('parquet', None) from the file name, ignoring a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _CSV_SUFFIXES:
        return "csv", _CSV_SUFFIXES[last]
    if last in _PARQUET_SUFFIXES:
        return "parquet", None
    raise IngestError(str(path), "unknown file type: expected .csv, .tsv (optionally compressed) "
                      "or .parquet")


def _source_files(path: Path) -> list[Path]:
    """The file itself, or every CSV/Parquet file of a directory in name order (new logs arrive
    as new files: a directory source is re-read whole, so its ingest stays deterministic)."""
    if not path.is_dir():
        return [path]
    files = []
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        try:
            _kind(f)
        except IngestError:
            continue  # README, checksums, ...: not logs
        files.append(f)
    if not files:
        raise IngestError(str(path), "directory holds no .csv/.tsv/.parquet file")
    return files


def _source_columns(path: Path) -> list[str]:
    kind, sep = _kind(path)
    if not path.is_file():
        raise IngestError(str(path), "file not found")
    try:
        if kind == "parquet":
            return list(pq.read_schema(path).names)
        return [str(c) for c in _read_csv(path, sep, nrows=0)[0].columns]
    except IngestError:
        raise
    except (OSError, ValueError) as exc:
        raise IngestError(str(path), f"cannot read: {exc}") from exc


def _read_csv(path: Path, sep: str | None, **kw: Any) -> tuple[pd.DataFrame, str]:
    """Everything as text, only empty fields missing (so the string "nan" stays visible).

    Returns the frame and the encoding: UTF-8, else Latin-1 (old exports, e.g. UCI's CSV).
    """
    args: dict[str, Any] = dict(sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                                skip_blank_lines=True, **kw)
    try:
        return pd.read_csv(path, encoding="utf-8", **args), "utf-8"
    except UnicodeDecodeError:
        return pd.read_csv(path, encoding="latin-1", **args), "latin-1"


def _read_table(path: Path, columns: list[str], ledger: Ledger) -> tuple[pd.DataFrame, int]:
    """Read the needed columns; returns the frame and the 1-based row number of its first row.

    For CSV that is the line number (the header is line 1), exact unless blank lines or quoted
    fields spanning lines come before; for Parquet it is the row position.
    """
    kind, sep = _kind(path)
    try:
        if kind == "parquet":
            return pd.read_parquet(path, columns=columns), 1
        df, encoding = _read_csv(path, sep, usecols=columns)
        if encoding != "utf-8":
            ledger.quirk(f"encoding:{path.name}", f"{encoding} (not valid UTF-8)")
        return df, 2
    except pd.errors.ParserError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise IngestError(str(path), f"malformed CSV: {exc}",
                          row=int(m.group(1)) if m else None) from exc
    except (OSError, ValueError) as exc:
        raise IngestError(str(path), f"cannot read: {exc}") from exc


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


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    """Events (and catalog) of one platform from a mapped CSV/Parquet file."""
    path = Path(opts.path)  # type: ignore[arg-type]
    platform = opts.platform or path.stem.lower()
    ledger = Ledger(pseudo)
    if opts.event_type is not None and opts.event_type not in EVENT_TYPES:
        raise IngestError(str(path), f"event type {opts.event_type!r} is not one of "
                          f"{list(EVENT_TYPES)}")

    files = _source_files(path)
    available = _source_columns(files[0])
    for other in files[1:]:
        if _source_columns(other) != available:
            raise IngestError(str(other), f"columns {_source_columns(other)} differ from "
                              f"{available} of {files[0].name}: every file of a source directory "
                              "must have the same columns")
    cols = _resolve(opts.columns, EVENT_FIELDS, available, path, _REQUIRED_EVENT_FIELDS, "--map")
    if "event_type" not in cols and opts.event_type is None:
        raise IngestError(str(path), "no event type: map an event_type column or give a constant "
                          f"event type (one of {list(EVENT_TYPES)})", column="event_type")
    item_cols_in_events: dict[str, str] = {}
    if opts.items_path is None:
        item_cols_in_events = _catalog_columns(opts, available, path)
    needed = sorted(set(cols.values()) | set(item_cols_in_events.values()))
    parts = [_read_table(f, needed, ledger) for f in files]
    df = pd.concat([d for d, _ in parts], ignore_index=True) if len(parts) > 1 else parts[0][0]
    source_file = np.concatenate([np.full(len(d), str(f), dtype=object)
                                  for f, (d, _) in zip(files, parts, strict=True)])
    source_row = np.concatenate([np.arange(r, r + len(d), dtype=np.int64) for d, r in parts])
    n = len(df)
    ledger.events.rows_in = n

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
            etype = etype.mask(_blank(etype), opts.event_type)
        events["event_type"] = etype
    else:
        events["event_type"] = opts.event_type

    ts, notes = parse_timestamps(df[cols["timestamp"]])
    events["timestamp"] = ts
    for key, value in notes.items():
        ledger.quirk(key, value)
    bad_ts = ts.isna() & ~_blank(df[cols["timestamp"]])
    if bad_ts.any():
        # finalize quarantines NaT; keep what the source said so the quarantine is useful.
        events["source_timestamp"] = df[cols["timestamp"]].astype("string")
        ledger.quirk("unparseable_timestamps", int(bad_ts.sum()))

    if "quantity" in cols:
        q = pd.to_numeric(df[cols["quantity"]], errors="coerce")
        junk = int((q.isna() & ~_blank(df[cols["quantity"]])).sum())
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
    events["event_index"] = np.arange(n, dtype=np.int64)
    events["_file"] = source_file
    events["_row"] = source_row
    events = events.reset_index(drop=True)

    if opts.items_path is not None:
        items = _read_catalog(Path(opts.items_path), opts.item_columns, ledger)
    else:
        items = _catalog_from_events(df.reset_index(drop=True), events, item_cols_in_events,
                                     path, ledger)
    ledger.quirk("column_mapping", {"events": cols, "items": opts.item_columns or "defaults"})
    return [SourceFrames(platform, events, items, ledger, str(path))]


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


def _read_catalog(path: Path, mapping: dict[str, str], ledger: Ledger) -> pd.DataFrame:
    files = _source_files(path)
    available = _source_columns(files[0])
    for other in files[1:]:
        if _source_columns(other) != available:
            raise IngestError(str(other), f"columns {_source_columns(other)} differ from "
                              f"{available} of {files[0].name}: every file of a source directory "
                              "must have the same columns")
    cols = _resolve(mapping, ITEM_FIELDS, available, path, ("item_id", "title"), "item_columns")
    df, first_row = _read_table(path, sorted(set(cols.values())), ledger)
    ledger.items.rows_in = len(df)
    items = _item_fields(df, cols, ledger)
    items["item_id"], _ = id_text(df[cols["item_id"]])
    items["_file"] = str(path)
    items["_row"] = np.arange(first_row, first_row + len(df), dtype=np.int64)
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


def _catalog_from_events(df: pd.DataFrame, events: pd.DataFrame, cols: dict[str, str],
                         path: Path, ledger: Ledger) -> pd.DataFrame:
    """One catalog row per distinct item id, from its first event with a non-blank title."""
    has_id = ~_blank(events["item_id"])
    blank_title = _blank(df[cols["title"]])
    # Stable sort: rows with a title first, source order within; then first row per item.
    order = np.lexsort((np.arange(len(df)), blank_title.to_numpy()))
    pick = pd.Index(order)[has_id.to_numpy()[order]]
    firsts = events["item_id"].take(pick).drop_duplicates(keep="first").index
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


__all__ = ["EVENT_FIELDS", "ITEM_FIELDS", "MappingFile", "apply_mapping", "id_text",
           "load_mapping", "parse_price", "parse_timestamps", "read"]
