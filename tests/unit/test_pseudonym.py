import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from recsys.data.pseudonym import KEY_ENV, Pseudonymizer, load_key


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
