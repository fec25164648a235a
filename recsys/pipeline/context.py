"""What the stages of one pipeline run share: the config, the stage record, and the decision
whether a stage key must run (its inputs changed, an output is gone, or it is forced)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.pipeline.config import PipelineConfig
from recsys.pipeline.outputs import PipelineResult
from recsys.pipeline.state import (
    OutputT,
    PipelineState,
    Recorded,
    StageOutput,
    hash_json,
    lake_platform_fingerprint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """A stage key that ``needed`` let run: what ``finish`` records when it succeeds."""

    fingerprint: str
    digest: dict[str, str]
    """Input name -> its hash (so a later run can name the input that changed)."""


@dataclass
class Context:
    """What the stages share during one pipeline run."""

    cfg: PipelineConfig
    state: PipelineState
    result: PipelineResult = field(default_factory=PipelineResult)
    lake_fps: dict[str, str] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)

    def lake_fp(self, platform: str) -> str:
        """A platform's lake fingerprint, hashed once per run."""
        if platform not in self.lake_fps:
            self.lake_fps[platform] = lake_platform_fingerprint(self.cfg.data.lake, platform)
        return self.lake_fps[platform]

    def needed(self, key: str, stage: str, inputs: Mapping[str, Any],
               outputs: Sequence[str | Path], output_type: type[StageOutput],
               also: str | None = None) -> bool:
        """Whether ``key`` must run (its inputs changed, its record does not fit
        ``output_type``, an output is gone, it is forced, or ``also`` gives another reason);
        logs the decision and the reason either way. ``inputs``: name -> any JSON-able value."""
        digest = {name: hash_json(value) for name, value in inputs.items()}
        fp = hash_json(digest)
        self.pending[key] = Pending(fp, digest)
        reason = ("forced" if stage in self.cfg.force
                  else self.state.why_stale(key, fp, outputs, digest, output_type) or also)
        if reason is None:
            log.info("%s: inputs unchanged since %s, skipped", key,
                     self.state.records[key].finished_at)
            self.result.skipped.append(key)
            return False
        log.info("%s: running (%s)", key, reason)
        self.result.ran.append(key)
        return True

    def finish(self, key: str, output: StageOutput, seconds: float) -> None:
        """Record ``key``'s success (after ``needed`` said it must run)."""
        pending = self.pending.pop(key)
        self.state.record(key, pending.fingerprint, output, seconds, pending.digest)

    def recorded(self, key: str, output_type: type[OutputT]) -> Recorded[OutputT]:
        """``key``'s outputs from this run or an earlier one; an error if there are none."""
        rec = self.state.read(key, output_type)
        if rec is None:
            why = ("has never run" if self.state.get(key) is None
                   else self.state.unreadable(key, output_type))
            raise RuntimeError(f"{key} {why} in {self.state.path.parent}; run its stage "
                               f"first (stages: [...]) ")
        return rec


def tracking_uri() -> str:
    """The MLflow server the stages register to (started locally unless configured)."""
    from recsys.settings import get_settings
    from recsys.tracking.server import ensure_tracking

    return ensure_tracking(get_settings())


def train_output_dir(ctx: Context, *, shared: bool = True) -> str:
    """The ``output_dir`` of the pipeline's training runs: with ``RECSYS_STORAGE_PATH`` set
    (``settings.storage_path``, what every node of a cluster reaches, e.g. ``s3://...``)
    ``<storage_path>/<pipeline name>/train``, where Ray Train keeps each run's checkpoints (the
    exports and reports stay local, under the URI's mirror in ``<RECSYS_WORK_DIR>/train``:
    ``training.run.run_dir``); else, or with ``shared=False`` (a job without Ray Train
    storage: federated), ``<work dir>/train``."""
    from recsys.settings import get_settings

    root = get_settings().storage_path
    if shared and root:
        return f"{root.rstrip('/')}/{ctx.cfg.name}/train"
    return str(ctx.cfg.root / "train")
