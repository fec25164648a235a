"""Tabular source files shared by the ingest adapters: CSV/TSV, Parquet, Excel workbooks.

Everything is read as the source stored it (CSV cells as text), with the encoding and the row
number of each line kept, and every read failure becomes an :class:`IngestError` that names the
file (and the line, when the parser says which).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recsys.data.ingest.base import IngestError

CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zip", ".xz", ".zst"}
FileKind = Literal["csv", "parquet"]


@contextmanager
def read_errors(path: Path, malformed: str = "malformed CSV") -> Iterator[None]:
    """Turn pandas/OS read failures into an :class:`IngestError` naming ``path``.

    A parser error says ``malformed`` and the line when pandas names one; an
    :class:`IngestError` raised inside passes unchanged.
    """
    try:
        yield
    except IngestError:
        raise
    except pd.errors.ParserError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise IngestError(str(path), f"{malformed}: {exc}",
                          row=int(m.group(1)) if m else None) from exc
    except (OSError, ValueError) as exc:
        raise IngestError(str(path), f"cannot read: {exc}") from exc


def file_kind(path: Path) -> tuple[FileKind, str | None]:
    """('csv', separator) or ('parquet', None) from the file name, ignoring a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in CSV_SEPARATORS:
        return "csv", CSV_SEPARATORS[last]
    if last in PARQUET_SUFFIXES:
        return "parquet", None
    raise IngestError(str(path), "unknown file type: expected .csv, .tsv (optionally compressed) "
                      "or .parquet")


def source_files(path: Path) -> list[Path]:
    """The file itself, or every CSV/Parquet file of a directory in name order (new logs arrive
    as new files: a directory source is re-read whole, so its ingest stays deterministic)."""
    if not path.is_dir():
        return [path]
    files = []
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        try:
            file_kind(f)
        except IngestError:
            continue  # README, checksums, ...: not logs
        files.append(f)
    if not files:
        raise IngestError(str(path), "directory holds no .csv/.tsv/.parquet file")
    return files


def file_columns(path: Path) -> list[str]:
    """Column names from the header (CSV) or schema (Parquet), without reading the rows."""
    kind, sep = file_kind(path)
    if not path.is_file():
        raise IngestError(str(path), "file not found")
    with read_errors(path):
        if kind == "parquet":
            return list(pq.read_schema(path).names)
        return [str(c) for c in read_csv_text(path, sep, nrows=0)[0].columns]


def common_columns(files: list[Path]) -> list[str]:
    """The columns every file of a source shares; an error names the first file that differs."""
    available = file_columns(files[0])
    for other in files[1:]:
        columns = file_columns(other)
        if columns != available:
            raise IngestError(str(other), f"columns {columns} differ from {available} of "
                              f"{files[0].name}: every file of a source directory must have the "
                              "same columns")
    return available


def read_csv_text(path: Path, sep: str | None = ",", *, utf8: str = "utf-8",
                  empty_is_missing: bool = True, **kw: Any) -> tuple[pd.DataFrame, str]:
    """Every cell as text; returns the frame and the encoding: ``utf8``, else Latin-1 (old
    exports such as UCI's CSV, with a pound sign in voucher descriptions).

    ``empty_is_missing``: only empty fields become missing (so the string "nan" stays visible);
    otherwise nothing does.
    """
    args: dict[str, Any] = dict(sep=sep, dtype=str, keep_default_na=False, **kw)
    if empty_is_missing:
        args.update(na_values=[""], skip_blank_lines=True)
    else:
        args.update(na_filter=False)
    try:
        return pd.read_csv(path, encoding=utf8, **args), "utf-8"
    except UnicodeDecodeError:
        return pd.read_csv(path, encoding="latin-1", **args), "latin-1"


def read_table(path: Path, columns: list[str]) -> tuple[pd.DataFrame, int, str | None]:
    """The needed columns of a CSV/Parquet file: (frame, 1-based row of its first row, encoding).

    For CSV that row is the line number (the header is line 1), exact unless blank lines or
    quoted fields spanning lines come before; for Parquet it is the row position. The encoding
    is None for Parquet.
    """
    kind, sep = file_kind(path)
    with read_errors(path):
        if kind == "parquet":
            return pd.read_parquet(path, columns=columns), 1, None
        df, encoding = read_csv_text(path, sep, usecols=columns)
        return df, 2, encoding


def read_workbook(path: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Every sheet of an .xlsx file, in order, as text: (frame, file label per row, row).

    The label is ``file[sheet]``; the row is the Excel row number (the header is row 1).
    """
    try:
        import openpyxl  # noqa: F401  (pandas needs it for .xlsx)
    except ImportError as exc:
        raise IngestError(str(path), "reading .xlsx needs the openpyxl package: install it, or "
                          "convert the workbook to .csv or .parquet first") from exc
    sheets = pd.read_excel(path, sheet_name=None, dtype=str, keep_default_na=False,
                           na_filter=False)
    frames, files, rows = [], [], []
    for sheet, df in sheets.items():
        df.columns = [str(c).strip() for c in df.columns]
        frames.append(df)
        files.append(np.full(len(df), f"{path}[{sheet}]", dtype=object))
        rows.append(np.arange(2, len(df) + 2, dtype=np.int64))
    if not frames:
        raise IngestError(str(path), "workbook has no sheets")
    return pd.concat(frames, ignore_index=True), np.concatenate(files), np.concatenate(rows)


def detect_spelling(raw: pd.DataFrame, spellings: dict[str, dict[str, str]], file: str,
                    what: str) -> tuple[str, dict[str, str]]:
    """The first published spelling of a header (role -> column) whose columns are all present.

    Strips the column names of ``raw`` in place; else names what each spelling is missing.
    """
    raw.columns = [str(c).strip() for c in raw.columns]
    present = set(raw.columns)
    missing = {name: [c for c in cols.values() if c not in present]
               for name, cols in spellings.items()}
    for name, cols in spellings.items():
        if not missing[name]:
            return name, cols
    closest = min(missing, key=lambda n: len(missing[n]))
    others = "; ".join(f"{n} would need {m}" for n, m in missing.items() if n != closest)
    raise IngestError(file, f"not {what}: missing column(s) {missing[closest]} of the {closest} "
                      f"spelling ({others}); found {list(raw.columns)}",
                      column=missing[closest][0])


__all__ = ["FileKind", "common_columns", "detect_spelling", "file_columns", "file_kind",
           "read_csv_text", "read_errors", "read_table", "read_workbook", "source_files"]
