"""Scan outputs for raw identifiers: the check that pseudonymisation held.

Every file under the given roots is read: Parquet decoded by pyarrow (every string value of
every column, nested lists and structs included, and the schema metadata: compressed pages
would hide a raw id from a byte search, and min/max statistics derive from the values), every
other file as raw bytes (JSON reports, Markdown, logs, an SQLite database). A hit is an
e-mail-like string (the commonest raw id that names a person) or one of the given raw ids.

Files whose bulk is numbers are read where they can hold text, not as bytes: a PNG's text
chunks (its pixels are deflate-compressed, where a byte search finds nothing real but, one
chart in a few hundred, an e-mail-like run of random bytes), a safetensors header, and every
member of a zip archive (``torch.save`` checkpoints: the pickle and metadata) except tensor
storages (``<archive>/data/<n>``). Text a chart draws as pixels is out of reach of any scan:
the charts name platforms and metrics, never users.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

EMAIL_LIKE = re.compile(rb"[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,}")
PARQUET_SUFFIXES = (".parquet", ".pq")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TORCH_STORAGE = re.compile(r"(?:^|/)data/\d+$")


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


def _png_texts(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The text chunks of a PNG (tEXt, zTXt, iTXt inflated where compressed; eXIf) and any
    bytes after its end: the places a PNG keeps text."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            yield "png tEXt", body
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            yield "png zTXt", key + b"=" + zlib.decompress(rest[1:])
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]  # flag, method
            lang, _, rest = rest.partition(b"\0")
            label, _, text = rest.partition(b"\0")
            yield "png iTXt", b"\n".join([key, lang, label,
                                           zlib.decompress(text) if compressed else text])
        elif kind == b"eXIf":  # EXIF tags (Artist, comments) are text among numbers
            yield "png eXIf", body
        elif kind == b"IEND":
            if data[pos:]:  # whatever hides after the image's end
                yield "png after IEND", data[pos:]
            return


def _safetensors_header(data: bytes) -> bytes | None:
    """The JSON header of a safetensors file (8-byte length, then JSON), or None."""
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    if not 0 < n <= len(data) - 8:
        return None
    header = data[8:8 + n]
    try:
        json.loads(header)
    except ValueError:
        return None
    return header


def _structured_texts(path: Path, data: bytes) -> list[tuple[str, bytes]]:
    """The text pieces of a PNG, safetensors or zip file; the whole bytes for anything else."""
    if data.startswith(PNG_SIGNATURE):
        return list(_png_texts(data))
    if path.suffix.lower() == ".safetensors" and (head := _safetensors_header(data)):
        return [("safetensors header", head)]
    if data.startswith(b"PK\x03\x04"):  # not a zip after all: BadZipFile, read as bytes
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [(f"zip member {name}", name.encode() + b"\n" + archive.read(name))
                    for name in archive.namelist() if not TORCH_STORAGE.search(name)]
    return [("bytes", data)]


def decoded_texts(path: Path) -> Iterator[tuple[str, bytes]]:
    """(where, text) pieces of one file: for Parquet each column's strings and the schema
    metadata; for a PNG its text chunks; for safetensors its header; for a zip archive each
    member but tensor storages; for anything else its bytes."""
    path = Path(path)
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        data = path.read_bytes()
        try:  # a file that does not parse as what it claims is read as bytes
            yield from _structured_texts(path, data)
        except (ValueError, IndexError, struct.error, zlib.error, zipfile.BadZipFile):
            yield "bytes", data
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
