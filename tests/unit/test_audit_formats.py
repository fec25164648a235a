"""The identifier scan reads binary formats where they hold text: a PNG's text chunks, a
safetensors header, a torch checkpoint's pickle. Numbers (pixels, tensor storages) are not
read as text: random bytes there once matched the e-mail pattern (CI, a chart's pixels held
``IHH@nn.lllT``). Each test also shows the plain byte scan would have hit, so none is vacuous.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from recsys.data.audit import EMAIL_LIKE, PNG_SIGNATURE, decoded_texts, scan

NOISE = b"\x00\x01IHH@nn.lllT\x02\x03"  # e-mail-like by chance, as random bytes can be


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(path: Path, pixels: bytes, *chunks: bytes, tail: bytes = b"") -> Path:
    """A 1-row grey PNG whose IDAT stores ``pixels`` uncompressed (zlib level 0), so that
    they appear verbatim in the file's bytes."""
    ihdr = struct.pack(">IIBBBBB", len(pixels), 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" + pixels, 0)
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + b"".join(chunks)
                     + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"") + tail)
    return path


def test_png_pixels_are_not_text_but_its_text_chunks_are(tmp_path: Path) -> None:
    quiet = _png(tmp_path / "chart.png", NOISE)
    assert EMAIL_LIKE.search(quiet.read_bytes()), "the raw bytes hold the e-mail-like noise"
    assert scan([quiet]) == []
    z = b"Comment\x00\x00" + zlib.compress(b"by mary@example.org")
    i = b"Author\x00\x01\x00en\x00\x00" + zlib.compress(b"jo@example.net")
    loud = _png(tmp_path / "tagged.png", b"\x00" * 4, _chunk(b"tEXt", b"Author\x00al@example.com"),
                _chunk(b"zTXt", z), _chunk(b"iTXt", i), tail=b"after ed@example.com")
    found = {(h.where, h.value) for h in scan([loud])}
    assert found == {("png tEXt", "al@example.com"), ("png zTXt", "mary@example.org"),
                     ("png iTXt", "jo@example.net"), ("png after IEND", "ed@example.com")}


def test_a_truncated_png_is_read_as_bytes(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(PNG_SIGNATURE + _chunk(b"zTXt", b"k\x00\x00not zlib ann@example.com"))
    assert [(h.where, h.value) for h in scan([path])] == [("bytes", "ann@example.com")]


def test_a_file_that_only_starts_like_a_zip_is_read_as_bytes(tmp_path: Path) -> None:
    path = tmp_path / "notes.bin"
    path.write_bytes(b"PK\x03\x04 then plain text: lee@example.com")
    assert [(h.where, h.value) for h in scan([path])] == [("bytes", "lee@example.com")]


def test_safetensors_reads_the_header_not_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": np.frombuffer(NOISE, dtype=np.uint8).copy()}, str(path),
              metadata={"trained_by": "bo@example.com"})
    assert len(EMAIL_LIKE.findall(path.read_bytes())) == 2
    assert [(h.where, h.value) for h in scan([path])] == [("safetensors header",
                                                           "bo@example.com")]
    header = dict(decoded_texts(path))["safetensors header"]
    assert json.loads(header)["w"]["shape"] == [len(NOISE)]


def test_torch_checkpoint_reads_the_pickle_not_the_storages(tmp_path: Path) -> None:
    path = tmp_path / "ddp.pt"
    torch.save({"weights": torch.frombuffer(bytearray(NOISE), dtype=torch.uint8),
                "note": "kim@example.com"}, path)
    assert len(EMAIL_LIKE.findall(b"".join(t for _, t in _zip_members(path)))) == 2
    hits = scan([path])
    assert len(hits) == 1 and hits[0].value.startswith("kim@example.com")  # + a pickle opcode
    assert hits[0].where.startswith("zip member") and hits[0].where.endswith("data.pkl")


def _zip_members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(n, z.read(n)) for n in z.namelist()]
