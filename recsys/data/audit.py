"""Scan outputs for raw identifiers: the check that pseudonymisation held.

Every file under the given roots is read: Parquet decoded by pyarrow (every string value of
every column, nested lists and structs included, and the schema metadata: compressed pages
would hide a raw id from a byte search, and min/max statistics derive from the values), every
other file as raw bytes (JSON reports, Markdown, logs, an SQLite database). A hit is an
e-mail-like string (the commonest raw id that names a person) or one of the given raw ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

EMAIL_LIKE = re.compile(rb"[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,}")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Hit:
    """One raw identifier found: the file, where in it (``bytes``, ``column X``,
    ``metadata``), and the matched text."""

    path: Path
    where: str
    value: str


def _strings(arr: pa.Array) -> Iterator[str]:
    """Every string held by ``arr``, however nested; numbers and times cannot hold an id."""
    t = arr.type
    if pa.types.is_dictionary(t):
        yield from _strings(arr.dictionary_decode())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        yield from (v for v in arr.to_pylist() if v is not None)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        yield from (v.decode("utf-8", "replace") for v in arr.to_pylist() if v is not None)
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        yield from _strings(arr.flatten())
    elif pa.types.is_map(t):
        yield from _strings(arr.keys)
        yield from _strings(arr.items)
    elif pa.types.is_struct(t):
        for i in range(t.num_fields):
            yield from _strings(arr.field(i))


def decoded_texts(path: Path) -> Iterator[tuple[str, bytes]]:
    """(where, text) pieces of one file: for Parquet each column's strings and the schema
    metadata, for anything else its bytes."""
    path = Path(path)
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        yield "bytes", path.read_bytes()
        return
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    yield "metadata", b"\n".join(k + b"=" + v for k, v in meta.items())
    for name, column in zip(table.column_names, table.columns):
        values = [s for chunk in column.chunks for s in _strings(chunk)]
        if values:
            yield f"column {name}", "\n".join(values).encode("utf-8")


def files_under(roots: Iterable[str | Path]) -> list[Path]:
    """Every regular file under each root (a root may be a file), in a stable order."""
    out: list[Path] = []
    for root in roots:
        root = Path(root)
        out += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return out


def scan(roots: Iterable[str | Path], raw_ids: Iterable[str] = (), *,
         pattern: re.Pattern[bytes] | None = EMAIL_LIKE) -> list[Hit]:
    """Raw identifiers in the files under ``roots``: matches of ``pattern`` (default: e-mail
    like strings; None: none) and occurrences of each of ``raw_ids`` (a substring search per
    id and file piece: keep that list to a sample when the files are large)."""
    needles = [(r, r.encode("utf-8")) for r in raw_ids]
    hits: list[Hit] = []
    for path in files_under(roots):
        for where, text in decoded_texts(path):
            if pattern is not None:
                hits += [Hit(path, where, m.decode("utf-8", "replace"))
                         for m in pattern.findall(text)]
            hits += [Hit(path, where, r) for r, b in needles if b in text]
    return hits


__all__ = ["EMAIL_LIKE", "Hit", "decoded_texts", "files_under", "scan"]
