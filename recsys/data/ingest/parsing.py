"""Value parsers shared by the ingest adapters: blanks, prices, ids, timestamps.

Pure functions over pandas Series, vectorised (or once per distinct value where a per-value
Python step cannot be avoided), so that every adapter cleans the same kind of value the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

_TZ_SUFFIX = re.compile(r"(?:Z|[+-]\d\d:?\d\d)$")
_MISSING_ID_TEXT = ("", "nan", "none", "<na>")


def blank(s: pd.Series) -> pd.Series:
    """True where a value is missing or only whitespace."""
    if (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_datetime64_any_dtype(s)) \
            and not isinstance(s.dtype, pd.CategoricalDtype):
        return s.isna()  # a number or a time is never blank text (and formatting it is slow)
    return s.isna() | (s.astype("string").str.strip().fillna("") == "")


def stripped_text(s: pd.Series) -> pd.Series:
    """Stripped text, <NA> where blank/null (numbers read from Parquet become their text)."""
    out = s.astype("string").str.strip()
    return out.where(out != "")


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
    junk = ~blank(values) & out.isna()
    return out, int(junk.sum())


def parse_timestamps(values: pd.Series,
                     unit: str | None = None) -> tuple[pd.Series, dict[str, Any]]:
    """Any timestamp column -> UTC datetimes (NaT where unparseable) plus what was assumed.

    Epoch numbers are told apart by magnitude of the median: below 1e11 seconds (year 5138),
    below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds. ``unit`` fixes the
    epoch unit instead (a streaming ingest keeps the one its first chunk chose).
    """
    notes: dict[str, Any] = {}
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC"), notes
    if pd.api.types.is_datetime64_dtype(values):
        if values.notna().any():
            notes["naive_timestamps_assumed_utc"] = int(values.notna().sum())
        return values.dt.tz_localize("UTC"), notes
    present = ~blank(values)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype("float64")
    else:
        numbers = pd.to_numeric(values.where(present), errors="coerce")
        if present.any() and not numbers[present].notna().all():
            numbers = None  # not an epoch column: parse as date strings
    if numbers is not None:
        magnitude = float(np.nanmedian(np.abs(numbers.to_numpy()))) if numbers.notna().any() \
            else 0.0
        unit = unit or ("s" if magnitude < 1e11 else "ms" if magnitude < 1e14 else "us"
                        if magnitude < 1e17 else "ns")
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


def parse_wall_clock(s: pd.Series, formats: Sequence[str]) -> tuple[pd.Series, bool]:
    """Naive wall-clock datetimes (or UTC if the column carries a zone) and whether it did.

    Strings are parsed once per distinct value (a timestamp repeats on every line of an order),
    trying ``formats`` in turn; what none of them parses is NaT.
    """
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return s.dt.tz_convert("UTC").dt.tz_localize(None), True
    if pd.api.types.is_datetime64_dtype(s.dtype):
        return s.astype("datetime64[us]"), False
    text = s.astype("string").str.strip()
    codes, uniques = pd.factorize(text)
    u = pd.Series(uniques, dtype="string")
    parsed = pd.to_datetime(u, format=formats[0], errors="coerce")
    for fmt in formats[1:]:
        todo = parsed.isna()
        if todo.any():
            parsed[todo] = pd.to_datetime(u[todo], format=fmt, errors="coerce")
    values = parsed.astype("datetime64[us]").to_numpy()
    out = np.where(codes >= 0, values[np.maximum(codes, 0)], np.datetime64("NaT"))
    return pd.Series(out.astype("datetime64[us]"), index=s.index), False


def localize_wall_clock(naive: pd.Series, tz: str) -> tuple[pd.Series, int, int]:
    """Local wall-clock times of ``tz`` -> UTC, once per distinct value.

    The repeated hour when summer time ends is read as summer time; the skipped hour when it
    starts is shifted forward. Returns (UTC times, #ambiguous values, #nonexistent values).
    """
    codes, uniques = pd.factorize(naive)
    u = pd.Series(pd.DatetimeIndex(uniques).astype("datetime64[us]"))
    strict = u.dt.tz_localize(tz, ambiguous="NaT", nonexistent="NaT")
    ambiguous = u.dt.tz_localize(tz, ambiguous="NaT", nonexistent="shift_forward").isna()
    n_ambiguous = int(ambiguous.sum())
    n_nonexistent = int(strict.isna().sum()) - n_ambiguous
    local = u.dt.tz_localize(tz, ambiguous=np.ones(len(u), dtype=bool),
                             nonexistent="shift_forward")
    utc = pd.DatetimeIndex(local.dt.tz_convert("UTC"))
    if len(utc) == 0:
        rows = pd.DatetimeIndex(np.full(len(codes), np.datetime64("NaT"), "datetime64[us]"),
                                tz="UTC")
    else:  # scatter per-distinct-value times back to rows; NaT where the source had none
        rows = utc.take(np.maximum(codes, 0)).where(codes >= 0)
    return pd.Series(rows, index=naive.index), n_ambiguous, n_nonexistent


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


def whole_number_ids(s: pd.Series) -> pd.Series:
    """Per value, for columns that mix types: 17850.0 / "17850.0" / "17850" -> "17850";
    null, blank, "nan" -> <NA>. Mapped once per distinct value (ids repeat)."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    norm = np.array([_whole_number_text(v) for v in uniques], dtype=object)
    values = np.where(codes >= 0, norm[np.maximum(codes, 0)] if len(norm) else None, None)
    return pd.Series(values, index=s.index, dtype="string")


def _whole_number_text(value: Any) -> str | None:
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    if text.lower() in _MISSING_ID_TEXT:
        return None
    return re.sub(r"^(\d+)\.0*$", r"\1", text)


__all__ = ["blank", "id_text", "localize_wall_clock", "parse_price", "parse_timestamps",
           "parse_wall_clock", "stripped_text", "whole_number_ids"]
