"""Content fingerprints of stage inputs, and the record of what each pipeline stage last built.

A stage is skipped when the fingerprint of its inputs (config + the fingerprints of what it
reads) equals the one recorded when it last finished and its outputs still exist. Fingerprints
hash file *contents*, not modification times, so a copied or touched file does not force a
re-run and a changed one always does. Cost: one read of each input file per pipeline run
(the lake is hashed per platform, so new logs for one platform change only that platform's
fingerprint and only the stages that read it run again).

Each stage's outputs are a typed model (:class:`StageOutput`), written into ``state.json`` as
JSON and read back through the same model, so a later stage (or a later run) gets fields, not
string keys; a record that no longer fits its model makes the stage run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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


class StageOutput(BaseModel):
    """Base of every stage's typed outputs: immutable, unknown keys are errors (a record
    written by another version of a stage does not pass for this one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


OutputT = TypeVar("OutputT", bound=StageOutput)


class StageRecord(BaseModel):
    """One entry of ``state.json``: the last success of a stage key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str
    outputs: dict[str, Any] = Field(default_factory=dict)
    """The stage's :class:`StageOutput` as JSON (read it back with ``PipelineState.read``)."""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Hash of each named input, so a re-run can say which input changed."""
    seconds: float = 0.0
    finished_at: str = ""


@dataclass(frozen=True)
class Recorded(Generic[OutputT]):
    """A stage's typed outputs with the fingerprint of the inputs they were built from (what a
    downstream stage puts among its own inputs)."""

    key: str
    fingerprint: str
    output: OutputT
    finished_at: str


_RECORDS = TypeAdapter(dict[str, StageRecord])


class PipelineState:
    """``<state_dir>/state.json``: stage key -> the fingerprint and outputs of its last success.

    Written after every stage, so a pipeline interrupted half-way resumes with what is done.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "state.json"
        self.records: dict[str, StageRecord] = (
            _RECORDS.validate_json(self.path.read_bytes()) if self.path.exists() else {})

    def fresh(self, key: str, fingerprint: str, must_exist: Iterable[str | Path] = ()) -> bool:
        """Whether ``key`` last finished with ``fingerprint`` and its outputs are still there."""
        return self.why_stale(key, fingerprint, must_exist) is None

    def why_stale(self, key: str, fingerprint: str, must_exist: Iterable[str | Path] = (),
                  inputs: Mapping[str, str] | None = None,
                  output_type: type[StageOutput] | None = None) -> str | None:
        """None when ``key`` is up to date, else the reason it must run again."""
        rec = self.records.get(key)
        if rec is None:
            return "never run"
        if rec.fingerprint != fingerprint:
            changed = sorted(k for k in {**rec.inputs, **(inputs or {})}
                             if rec.inputs.get(k) != (inputs or {}).get(k))
            return "changed: " + (", ".join(changed) if changed and rec.inputs else "inputs")
        unreadable = self.unreadable(key, output_type) if output_type else None
        if unreadable:
            return unreadable
        missing = [str(p) for p in must_exist if not Path(p).exists()]
        return f"output missing: {missing[0]}" if missing else None

    def unreadable(self, key: str, output_type: type[StageOutput]) -> str | None:
        """Why the outputs recorded for ``key`` do not fit ``output_type`` (None: they do)."""
        try:
            output_type.model_validate(self.records[key].outputs)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            return (f"recorded outputs do not fit {output_type.__name__} "
                    f"({where}: {first['msg']})")
        return None

    def get(self, key: str) -> StageRecord | None:
        return self.records.get(key)

    def read(self, key: str, output_type: type[OutputT]) -> Recorded[OutputT] | None:
        """``key``'s typed outputs; None if it never ran or its record does not fit the type
        (``why_stale`` gives that as the reason to run it again)."""
        rec = self.records.get(key)
        if rec is None or self.unreadable(key, output_type):
            return None
        return Recorded(key, rec.fingerprint, output_type.model_validate(rec.outputs),
                        rec.finished_at)

    def record(self, key: str, fingerprint: str, output: StageOutput, seconds: float,
               inputs: Mapping[str, str] | None = None) -> StageRecord:
        rec = StageRecord(fingerprint=fingerprint,
                          outputs=output.model_dump(mode="json", by_alias=True),
                          inputs=dict(inputs or {}), seconds=round(seconds, 2),
                          finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.records[key] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v.model_dump(mode="json") for k, v in self.records.items()},
                                  indent=2, sort_keys=True))
        tmp.replace(self.path)
        return rec
