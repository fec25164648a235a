import hashlib
import hmac
import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from recsys.data.pseudonym import (
    DEFAULT_KEY_FILE,
    ID_PREFIX,
    KEY_ENV,
    KEY_FILE_ENV,
    SESSION_PREFIX,
    Pseudonymizer,
    describe_key_lookup,
    identifier_kind,
    load_key,
    normalise_id,
)


def test_same_key_links_users_across_platforms() -> None:
    p = Pseudonymizer(b"k" * 32)
    a = p.array(pa.array(["alice", "bob", "alice"]))
    b = p.array(pa.array(["bob", "alice"]))
    assert a[0] == a[2] == b[1]
    assert a[1] == b[0]
    assert a[0] != a[1]
    assert "alice" not in a.to_pylist()


def test_different_key_gives_unlinkable_ids() -> None:
    ids = ["alice", "bob", "carol"]
    one = set(Pseudonymizer(b"1" * 32).many(ids))
    two = set(Pseudonymizer(b"2" * 32).many(ids))
    assert one.isdisjoint(two)


def test_fingerprint_does_not_reveal_key() -> None:
    key = bytes(range(32))
    fp = Pseudonymizer(key).fingerprint
    assert key.hex() not in fp and len(fp) == 12


def test_short_key_rejected() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")


def test_load_key_creates_private_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(KEY_ENV)
    path = tmp_path / "k" / "pseudonym.key"
    key, where = load_key(key_file=path)
    assert where == str(path) and path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "created a new pseudonym key" in caplog.text
    again, _ = load_key(key_file=path)
    assert again == key


def test_load_key_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    key, where = load_key(key_file=tmp_path / "never")
    assert key == bytes.fromhex("ab" * 16) and where == f"${KEY_ENV}"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RuntimeError, match="no pseudonym key"):
        load_key(create_if_missing=False, key_file=tmp_path / "missing")


# -- one normalisation, at ingest and at serve time ----------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    (" Alice@Example.com ", "Alice@Example.com"),        # surrounding blanks
    ("\u00a0Alice@Example.com\t\n", "Alice@Example.com"),  # no-break space, tab, newline
    ("\uff21lice@Example.com", "Alice@Example.com"),     # full-width A (NFKC)
    ("\u3000jane.doe+17@example.com", "jane.doe+17@example.com"),  # ideographic space
    ("ﬁona@example.com", "fiona@example.com"),           # ligature fi (NFKC)
    ("ALICE@EXAMPLE.COM", "ALICE@EXAMPLE.COM"),           # case kept: ids are case-sensitive
])
def test_normalise_id(raw: str, expected: str) -> None:
    assert normalise_id(raw) == expected
    assert normalise_id(expected) == expected  # idempotent


def test_one_many_array_normalise_the_same_way() -> None:
    p = Pseudonymizer(b"k" * 32)
    plain = p.one("Alice@Example.com")
    assert p.one(" Alice@Example.com ") == p.one("\uff21lice@Example.com\u00a0") == plain
    assert p.many([" Alice@Example.com", None]) == [plain, None]
    assert p.array(pa.array(["Alice@Example.com  ", None])).to_pylist() == [plain, None]
    assert p.one("alice@example.com") != plain  # no case folding (see normalise_id)


def test_pseudonyms_unchanged_for_clean_ids() -> None:
    """Normalising must not move the pseudonyms of ids already in a lake (ASCII, stripped)."""
    key = bytes(range(32))
    p = Pseudonymizer(key)
    assert p.one("alice") == hmac.new(key, b"alice", hashlib.sha256).hexdigest()[:32]
    assert p.one("s1", prefix=SESSION_PREFIX) == hmac.new(
        key, b"session:s1", hashlib.sha256).hexdigest()[:32]
    # The fingerprint formula is what every lake's report.json recorded: it must not change.
    assert p.fingerprint == "5a6a8fd3f119"


def test_prefix_keeps_kinds_apart() -> None:
    p = Pseudonymizer(b"k" * 32)
    assert len({p.one("x@example.com", prefix=ID_PREFIX[k]) for k in ID_PREFIX}) == len(ID_PREFIX)


@pytest.mark.parametrize("column,kind", [
    ("user_id", "user"), ("session_id", "session"),
    ("CustomerID", "id"), ("Customer ID", "id"), ("InvoiceNo", "id"), ("Invoice", "id"),
    ("reviewerID", "id"), ("email", "id"), ("E-Mail", "id"), ("source_user_index", "id"),
    ("visitor_id", "id"), ("user", "id"), ("username", "id"),
    ("InvoiceDate", None), ("StockCode", None), ("Description", None), ("item_id", None),
    ("source_timestamp", None), ("Country", None), ("title", None), ("price", None),
])
def test_identifier_kind(column: str, kind: str | None) -> None:
    assert identifier_kind(column) == kind


def test_key_source_is_kept_or_described(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    assert Pseudonymizer(*load_key()).source == f"${KEY_ENV}"
    assert Pseudonymizer(b"k" * 32).described_source == f"${KEY_ENV}"
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "k.key"))
    assert str(tmp_path / "k.key") in describe_key_lookup()
    monkeypatch.delenv(KEY_FILE_ENV)
    assert str(DEFAULT_KEY_FILE) in describe_key_lookup()


def test_pseudonyms_are_the_keyed_hmac_and_survive_pickling() -> None:
    """The pre-keyed HMAC is a speed-up only: the digest is HMAC-SHA256(key, prefix + id), and a
    pickled copy (what Ray ships to workers) rebuilds it from the key."""
    import pickle

    key = bytes(range(32))
    p = Pseudonymizer(key, "test")
    want = hmac.new(key, b"u:Full", hashlib.sha256).hexdigest()[:32]
    assert p.one("Full", prefix="u:") == p.one(" Ｆｕｌｌ ", prefix="u:") == want
    copy = pickle.loads(pickle.dumps(p))
    assert copy.one("Full", prefix="u:") == want
