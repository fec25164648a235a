"""Resuming a run: the newest checkpoint that loads on every rank, the ones before it."""

from __future__ import annotations

import logging
import pickle
import posixpath
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recsys.training.collectives import on_every_rank
from recsys.training.engine import Engine, TrainState

log = logging.getLogger(__name__)

CHECKPOINT_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError,
                     pickle.UnpicklingError)
"""What a truncated or corrupt checkpoint raises on load: torch's zip reader (RuntimeError), a
broken ``train_state.json`` (pydantic's ValidationError is a ValueError), a missing file, a
pickle that ``weights_only`` refuses, DeepSpeed finding no checkpoint (RuntimeError)."""


def restore(engine: Engine, checkpoints: Sequence[Any],
            agree: Callable[[bool], bool] | None = None) -> TrainState:
    """Load the newest of ``checkpoints`` (Ray ``Checkpoint``s, newest first) that loads on every
    rank and return its state. One that does not load (a truncated ``ddp.pt``, a broken
    ``train_state.json``) is passed over with a warning and the run resumes from the one before
    it; if none loads, the error lists them all. ``agree``: whether a load succeeded on every
    rank (default: an all-reduce; every rank tries the same list, so ranks move on together)."""
    agree = agree or on_every_rank
    failed: list[str] = []
    for checkpoint in checkpoints:
        state, error = None, None
        try:
            with checkpoint.as_directory() as d:
                state = engine.load(Path(d))
        except CHECKPOINT_ERRORS as e:
            error = f"{checkpoint.path}: {type(e).__name__}: {e}"
            log.warning("checkpoint does not load, trying the one before: %s", error)
        if agree(error is None) and state is not None:
            if failed:
                log.warning("resumed from %s (after epoch %d) instead of the latest checkpoint, "
                            "which did not load", checkpoint.path, state.epoch)
            return state
        failed.append(error or f"{checkpoint.path}: did not load on another rank")
    raise RuntimeError(f"no checkpoint of this run loads ({len(failed)} tried): "
                       + "; ".join(failed)
                       + ". Start over with resume=false, or train under a new name.")


def earlier_checkpoints(latest: Any) -> list[Any]:
    """The run's checkpoints older than ``latest``, newest first. Ray Train hands a worker only
    the latest; those kept besides it (``CheckpointConfig.num_to_keep`` best ones) are the
    ``checkpoint_<local time>`` directories beside it in the run's storage, local or remote."""
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    parent, name = posixpath.split(latest.path.rstrip("/"))
    infos = latest.filesystem.get_file_info(FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name),
                   reverse=True)
    return [Checkpoint(posixpath.join(parent, n), filesystem=latest.filesystem) for n in older]
