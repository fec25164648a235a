"""Write a directory elsewhere, then swap it in: readers never see a half-written output."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``final``; on success it replaces ``final`` with
    two renames (the old version is removed after), on error it is deleted and ``final`` stays
    as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
