"""Content fingerprints decide which pipeline stages re-run: they must see content, not mtimes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys.fingerprint import PipelineState, hash_json, hash_tree


def test_hash_json_ignores_key_order_and_sees_values() -> None:
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})


def test_hash_tree_sees_content_names_and_new_files_not_mtime(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"one")
    (tmp_path / "b.parquet").write_bytes(b"two")
    first = hash_tree(tmp_path)
    os.utime(tmp_path / "a.parquet", (1, 1))  # touched, same bytes
    (tmp_path / ".staging-x").mkdir()
    (tmp_path / ".staging-x" / "junk").write_bytes(b"half-written")  # hidden: not content
    assert hash_tree(tmp_path) == first
    (tmp_path / "b.parquet").write_bytes(b"TWO")
    assert hash_tree(tmp_path) != first
    (tmp_path / "b.parquet").write_bytes(b"two")
    assert hash_tree(tmp_path) == first
    (tmp_path / "c.parquet").write_bytes(b"")
    assert hash_tree(tmp_path) != first
    (tmp_path / "c.parquet").rename(tmp_path / "d.parquet")
    assert hash_tree(tmp_path) != first


def test_hash_tree_of_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        hash_tree(tmp_path / "nope")


def test_state_is_fresh_only_with_same_fingerprint_and_outputs(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    state = PipelineState(tmp_path / "state")
    assert not state.fresh("train/x", "f1", [out])
    state.record("train/x", "f1", {"export": str(out)}, 1.5)
    reloaded = PipelineState(tmp_path / "state")  # survives the process
    assert reloaded.fresh("train/x", "f1", [out])
    assert not reloaded.fresh("train/x", "f2", [out])
    out.rmdir()
    assert not reloaded.fresh("train/x", "f1", [out])
    assert reloaded.get("train/x").outputs == {"export": str(out)}
