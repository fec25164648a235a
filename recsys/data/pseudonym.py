"""Keyed pseudonymisation of user ids at ingest.

HMAC-SHA256(key, raw id). The same raw id under the same key maps to the same pseudonym on every
platform, so one person can be followed across shops; under another key the ids are unlinkable.
Raw ids never reach the lake, the quarantine, or a report.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

KEY_ENV = "RECSYS_PSEUDONYM_KEY"
KEY_FILE_ENV = "RECSYS_PSEUDONYM_KEY_FILE"
DEFAULT_KEY_FILE = Path(".recsys") / "pseudonym.key"
PSEUDONYM_HEX_CHARS = 32  # 128 bits: collisions are negligible at any realistic user count


class Pseudonymizer:
    """Maps raw user ids to pseudonyms; holds the key, prints only its fingerprint."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")
        self._key = key

    @property
    def fingerprint(self) -> str:
        """A short, non-reversible id of the key, safe to write into reports."""
        return hashlib.sha256(b"recsys-key-fingerprint" + self._key).hexdigest()[:12]

    def one(self, raw_id: str) -> str:
        return hmac.new(self._key, raw_id.encode("utf-8"), hashlib.sha256).hexdigest()[
            :PSEUDONYM_HEX_CHARS
        ]

    def many(self, raw_ids: Iterable[str | None]) -> list[str | None]:
        """Hash each distinct id once (logs repeat a user many times)."""
        values = list(raw_ids)
        uniq = {v for v in values if v is not None}
        mapping = {v: self.one(v) for v in uniq}
        return [None if v is None else mapping[v] for v in values]

    def array(self, raw_ids: pa.Array | pa.ChunkedArray | np.ndarray | list) -> pa.Array:
        """Vectorised over unique values: cost grows with users, not events."""
        arr = pa.chunked_array([raw_ids]) if not isinstance(raw_ids, pa.ChunkedArray) else raw_ids
        arr = arr.cast(pa.string())
        encoded = arr.combine_chunks().dictionary_encode()
        hashed = pa.array(self.many(encoded.dictionary.to_pylist()), pa.string())
        return hashed.take(encoded.indices)


def load_key(*, create_if_missing: bool = True, key_file: Path | None = None) -> tuple[bytes, str]:
    """Return (key, where it came from).

    Order: ``RECSYS_PSEUDONYM_KEY`` (hex or text), then the key file (``RECSYS_PSEUDONYM_KEY_FILE``,
    default ``.recsys/pseudonym.key``). If neither exists and ``create_if_missing``, a random key is
    written to the key file with mode 0600 and a warning says so: keep that file (or export the
    variable) to get the same pseudonyms on the next ingest.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            return bytes.fromhex(env), f"${KEY_ENV}"
        except ValueError:
            return env.encode("utf-8"), f"${KEY_ENV}"
    path = key_file or Path(os.environ.get(KEY_FILE_ENV, str(DEFAULT_KEY_FILE)))
    if path.exists():
        return bytes.fromhex(path.read_text().strip()), str(path)
    if not create_if_missing:
        raise RuntimeError(
            f"no pseudonym key: set ${KEY_ENV} or create {path} (32 random bytes, hex)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    log.warning(
        "created a new pseudonym key at %s (mode 0600). Keep it, or set $%s, to get the same "
        "user pseudonyms on later ingests; a different key makes ids unlinkable.",
        path,
        KEY_ENV,
    )
    return key, str(path)
