"""Tabular source files shared by the ingest adapters: CSV/TSV, Parquet, JSON lines, Excel.

Everything is read as the source stored it (CSV cells as text), with the encoding and the row
number of each line kept, and every read failure becomes an :class:`IngestError` that names the
file (and the line, when the parser says which). :func:`iter_table` reads the same files chunk by
chunk (bounded memory), with the same cells and row numbers as :func:`read_table`.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
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
JSON_SUFFIXES = {".jsonl", ".ndjson"}  # JSON lines: one object per line
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zip", ".xz", ".zst"}
FileKind = Literal["csv", "parquet", "json"]


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
    """('csv', separator), ('parquet', None) or ('json', None) from the file name, ignoring a
    compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in CSV_SEPARATORS:
        return "csv", CSV_SEPARATORS[last]
    if last in PARQUET_SUFFIXES:
        return "parquet", None
    if last in JSON_SUFFIXES:
        return "json", None
    raise IngestError(str(path), "unknown file type: expected .csv, .tsv, .jsonl (optionally "
                      "compressed) or .parquet")


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
        raise IngestError(str(path), "directory holds no .csv/.tsv/.jsonl/.parquet file")
    return files


def file_columns(path: Path) -> list[str]:
    """Column names from the header (CSV) or schema (Parquet), without reading the rows."""
    kind, sep = file_kind(path)
    if not path.is_file():
        raise IngestError(str(path), "file not found")
    with read_errors(path):
        if kind == "parquet":
            return list(pq.read_schema(path).names)
        if kind == "json":  # the keys of the first record
            return [str(c) for c in _read_json(path, nrows=1).columns]
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
    args = csv_text_args(sep, empty_is_missing, **kw)
    try:
        return pd.read_csv(path, encoding=utf8, **args), "utf-8"
    except UnicodeDecodeError:
        return pd.read_csv(path, encoding="latin-1", **args), "latin-1"


def csv_text_args(sep: str | None, empty_is_missing: bool = True, **kw: Any) -> dict[str, Any]:
    """``pd.read_csv`` arguments that read every cell as text (see :func:`read_csv_text`)."""
    args: dict[str, Any] = dict(sep=sep, dtype=str, keep_default_na=False, **kw)
    if empty_is_missing:
        args.update(na_values=[""], skip_blank_lines=True)
    else:
        args.update(na_filter=False)
    return args


def _read_json(path: Path, **kw: Any) -> Any:
    """JSON lines as parsed (no dtype guessing, no date conversion); a frame or a chunk reader."""
    return pd.read_json(path, lines=True, dtype=False, convert_dates=False, **kw)


def read_table(path: Path, columns: list[str]) -> tuple[pd.DataFrame, int, str | None]:
    """The needed columns of a CSV/Parquet/JSON-lines file: (frame, 1-based row of its first
    row, encoding).

    For CSV that row is the line number (the header is line 1), exact unless blank lines or
    quoted fields spanning lines come before; for Parquet it is the row position, for JSON lines
    the line number. The encoding is None for Parquet and JSON.
    """
    kind, sep = file_kind(path)
    with read_errors(path):
        if kind == "parquet":
            return pd.read_parquet(path, columns=columns), 1, None
        if kind == "json":
            return _read_json(path).reindex(columns=columns), 1, None
        df, encoding = read_csv_text(path, sep, usecols=columns)
        return df, 2, encoding


def iter_table(path: Path, columns: list[str],
               chunk_rows: int) -> Iterator[tuple[pd.DataFrame, int, str | None]]:
    """:func:`read_table` in chunks of at most ``chunk_rows`` rows: (frame, 1-based row of the
    chunk's first row, encoding), with the cells and row numbers :func:`read_table` gives.

    A CSV is checked for UTF-8 in one streaming pass first (Latin-1 otherwise, as
    :func:`read_csv_text` decides), so that the encoding never changes half-way.
    """
    kind, sep = file_kind(path)
    first = 2 if kind == "csv" else 1
    with read_errors(path):
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
                df = batch.to_pandas()
                yield df, first, None
                first += len(df)
            return
        encoding = None
        if kind == "json":
            reader = _read_json(path, chunksize=chunk_rows)
        else:
            encoding = "utf-8" if is_utf8(path) else "latin-1"
            reader = pd.read_csv(path, encoding=encoding, chunksize=chunk_rows,
                                 **csv_text_args(sep, usecols=columns))
        with reader:
            for df in reader:
                df = df.reindex(columns=columns) if kind == "json" else df
                yield df.reset_index(drop=True), first, encoding
                first += len(df)


_OPENERS: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def is_utf8(path: Path, block: int = 1 << 24) -> bool:
    """Whether a (plain, .gz, .bz2 or .xz) file decodes as UTF-8, read in blocks; other
    compressions are assumed UTF-8."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSION_SUFFIXES and suffix not in _OPENERS:
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _OPENERS.get(suffix, open)(path, "rb") as fh:
        try:
            while chunk := fh.read(block):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def estimate_rows(path: Path, sample_bytes: int = 1 << 20) -> int | None:
    """Rows of a file without reading it: Parquet metadata (exact), else the file size over the
    mean line length of its first MiB (uncompressed CSV/JSON lines); None for compressed text."""
    kind, _ = file_kind(path)
    if kind == "parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    if path.suffix.lower() in COMPRESSION_SUFFIXES:
        return None
    with open(path, "rb") as fh:
        sample = fh.read(sample_bytes)
    lines = max(1, sample.count(b"\n"))
    return int(path.stat().st_size / (len(sample) / lines))


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


__all__ = ["FileKind", "common_columns", "csv_text_args", "detect_spelling", "estimate_rows",
           "file_columns", "file_kind", "is_utf8", "iter_table", "read_csv_text", "read_errors",
           "read_table", "read_workbook", "source_files"]
