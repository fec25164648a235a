"""Content fingerprints of stage inputs, and the record of what each pipeline stage last built.

A stage is skipped when the fingerprint of its inputs (config + the fingerprints of what it
reads) equals the one recorded when it last finished and its outputs still exist. Fingerprints
hash file *contents*, not modification times, so a copied or touched file does not force a
re-run and a changed one always does. Cost: one read of each input file per pipeline run
(the lake is hashed per platform, so new logs for one platform change only that platform's
fingerprint and only the stages that read it run again).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def hash_json(value: Any) -> str:
    """Stable hash of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """Hash of file names (relative to ``root``) and contents, order-independent."""
    h = hashlib.sha256()
    files = sorted(Path(p) for p in paths)
    for path in files:
        h.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def hash_tree(path: str | Path, patterns: tuple[str, ...] = ("**/*",)) -> str:
    """Hash of every file under ``path`` matching ``patterns`` (a single file: that file)."""
    root = Path(path)
    if root.is_file():
        return hash_files([root])
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint {root}: it does not exist")
    files = {p for pat in patterns for p in root.glob(pat) if p.is_file()}
    # Staging leftovers and hidden files are not content.
    files = {p for p in files
             if not any(part.startswith(".") for part in p.relative_to(root).parts)}
    return hash_files(files, root)


def lake_platform_fingerprint(lake: str | Path, platform: str) -> str:
    """A platform's canonical events and catalog (what every later stage reads)."""
    from recsys.data.lake import platform_dir

    d = platform_dir(lake, platform)
    return hash_tree(d, ("events/*.parquet", "items/*.parquet"))


@dataclass
class StageRecord:
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    """Hash of each named input, so a re-run can say which input changed."""
    seconds: float = 0.0
    finished_at: str = ""


class PipelineState:
    """``<state_dir>/state.json``: stage key -> the fingerprint and outputs of its last success.

    Written after every stage, so a pipeline interrupted half-way resumes with what is done.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "state.json"
        raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.records: dict[str, StageRecord] = {k: StageRecord(**v) for k, v in raw.items()}

    def fresh(self, key: str, fingerprint: str, must_exist: Iterable[str | Path] = ()) -> bool:
        """Whether ``key`` last finished with ``fingerprint`` and its outputs are still there."""
        return self.why_stale(key, fingerprint, must_exist) is None

    def why_stale(self, key: str, fingerprint: str, must_exist: Iterable[str | Path] = (),
                  inputs: Mapping[str, str] | None = None) -> str | None:
        """None when ``key`` is up to date, else the reason it must run again."""
        rec = self.records.get(key)
        if rec is None:
            return "never run"
        if rec.fingerprint != fingerprint:
            changed = sorted(k for k in {**rec.inputs, **(inputs or {})}
                             if rec.inputs.get(k) != (inputs or {}).get(k))
            return "changed: " + (", ".join(changed) if changed and rec.inputs else "inputs")
        missing = [str(p) for p in must_exist if not Path(p).exists()]
        return f"output missing: {missing[0]}" if missing else None

    def get(self, key: str) -> StageRecord | None:
        return self.records.get(key)

    def record(self, key: str, fingerprint: str, outputs: Mapping[str, Any],
               seconds: float, inputs: Mapping[str, str] | None = None) -> StageRecord:
        rec = StageRecord(fingerprint, dict(outputs), dict(inputs or {}), round(seconds, 2),
                          time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.records[key] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: vars(v) for k, v in self.records.items()}, indent=2,
                                  sort_keys=True, default=str))
        tmp.replace(self.path)
        return rec
