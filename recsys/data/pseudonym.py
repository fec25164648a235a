"""Keyed pseudonymisation of user, session and other identifiers, at ingest and at serve time.

HMAC-SHA256(key, prefix + normalise_id(raw id)). The same raw id under the same key maps to the
same pseudonym on every platform, so one person can be followed across shops; under another key
the ids are unlinkable. Raw ids never reach the lake, the quarantine, or a report.

One normalisation (:func:`normalise_id`) for every caller: ingest (events and quarantine) and
serving (a request's ``user_id``) both go through :meth:`Pseudonymizer.one`/``array``, so an id
typed with a stray space or a full-width character still finds its history.

The key's :attr:`Pseudonymizer.fingerprint` is written into every lake platform's report and
quarantine; serving and later ingests compare it with their own key's
(:func:`recsys.data.lake.check_key`) and refuse a different key instead of silently finding
no history.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

KEY_ENV = "RECSYS_PSEUDONYM_KEY"
KEY_FILE_ENV = "RECSYS_PSEUDONYM_KEY_FILE"
DEFAULT_KEY_FILE = Path(".recsys") / "pseudonym.key"
PSEUDONYM_HEX_CHARS = 32  # 128 bits: collisions are negligible at any realistic user count

IdKind = Literal["user", "session", "id"]
"""What an identifier column holds: a user (hashed as the lake's ``user_id``), a session or
invoice (as the lake's ``session_id``), or another identifier (customer e-mail, index, ...)."""
ID_PREFIX: dict[IdKind, str] = {"user": "", "session": "session:", "id": "id:"}
"""Hashed as ``prefix + normalise_id(raw)``: a session id never collides with a user id."""
SESSION_PREFIX = ID_PREFIX["session"]

# Column names that hold identifiers, matched on the lower-cased name without separators
# ("Customer ID" -> "customerid"): an entity word, optionally followed by an id-ish suffix.
# "InvoiceDate" or "StockCode" do not match; "InvoiceNo", "CustomerID", "reviewerID",
# "source_user_index", "session_id", "email" do.
_ID_NAME = re.compile(
    r"(?:user|customer|client|session|invoice|reviewer|visitor|account|member|buyer|shopper|"
    r"cookie|device|login)(?:ids?|no|nr|num|number|key|index|idx|name)?$"
    r"|^(?:e?mail|emailaddress|mailaddress|phone|phonenumber|ipaddress|ip)$")


def normalise_id(raw_id: str) -> str:
    """The one normalisation of a raw id before hashing, at ingest and at serve time.

    Unicode NFKC (full-width letters, ligatures and non-breaking spaces become their plain
    forms), then surrounding whitespace stripped. Case is kept on purpose: ids are in general
    case-sensitive (Amazon reviewer ids, base64 session cookies, invoice numbers), and folding
    would merge different people; it would also change every pseudonym already in a lake. An
    e-mail used as an id therefore has to arrive in the same case at ingest and at serve time
    (lower-case it upstream if the shop does not).
    """
    if raw_id.isascii():  # NFKC leaves ASCII as it is: skip the (slower) Unicode pass
        return raw_id.strip()
    return unicodedata.normalize("NFKC", raw_id).strip()


def identifier_kind(column: str) -> IdKind | None:
    """``"user"``/``"session"`` for the canonical columns, ``"id"`` for a column whose name
    looks like an identifier (see ``_ID_NAME``), else None."""
    if column == "user_id":
        return "user"
    if column == "session_id":
        return "session"
    name = re.sub(r"[^a-z0-9]", "", column.lower())
    return "id" if _ID_NAME.search(name) else None


class Pseudonymizer:
    """Maps raw ids to pseudonyms; holds the key, prints only its fingerprint.

    ``source`` says where the key came from (``load_key``'s second value), for error messages.
    """

    def __init__(self, key: bytes, source: str | None = None) -> None:
        if len(key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")
        self._key = key
        self.source = source
        # HMAC keyed once; each id copies it (faster than hmac.new per id, the same digest).
        # Not pickled (Ray ships pseudonymizers to workers): rebuilt from the key.
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_mac"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)

    @property
    def fingerprint(self) -> str:
        """A short, non-reversible id of the key, safe to write into reports and the lake."""
        return hashlib.sha256(b"recsys-key-fingerprint" + self._key).hexdigest()[:12]

    @property
    def described_source(self) -> str:
        """Where the key came from, or where ``load_key`` would look now if not recorded."""
        return self.source or describe_key_lookup()

    def one(self, raw_id: str, *, prefix: str = "") -> str:
        """Pseudonym of one raw id (normalised first, see :func:`normalise_id`)."""
        mac = self._mac.copy()
        mac.update((prefix + normalise_id(raw_id)).encode("utf-8"))
        return mac.hexdigest()[:PSEUDONYM_HEX_CHARS]

    def many(self, raw_ids: Iterable[str | None], *, prefix: str = "") -> list[str | None]:
        """Hash each distinct id once (logs repeat a user many times)."""
        values = list(raw_ids)
        uniq = {v for v in values if v is not None}
        mapping = {v: self.one(v, prefix=prefix) for v in uniq}
        return [None if v is None else mapping[v] for v in values]

    def array(self, raw_ids: pa.Array | pa.ChunkedArray | np.ndarray | list, *,
              prefix: str = "") -> pa.Array:
        """Vectorised over unique values: cost grows with users, not events."""
        arr = pa.chunked_array([raw_ids]) if not isinstance(raw_ids, pa.ChunkedArray) else raw_ids
        arr = arr.cast(pa.string())
        encoded = arr.combine_chunks().dictionary_encode()
        hashed = pa.array(self.many(encoded.dictionary.to_pylist(), prefix=prefix), pa.string())
        return hashed.take(encoded.indices)


def describe_key_lookup() -> str:
    """Where :func:`load_key` takes the key from in this environment (no key is read)."""
    if os.environ.get(KEY_ENV):
        return f"${KEY_ENV}"
    if os.environ.get(KEY_FILE_ENV):
        return f"${KEY_FILE_ENV}={os.environ[KEY_FILE_ENV]}"
    return f"{DEFAULT_KEY_FILE} (relative to {Path.cwd()}; ${KEY_ENV} and ${KEY_FILE_ENV} unset)"


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
