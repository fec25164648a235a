"""Shared fixtures. Tiers: tests/unit (no Ray), tests/integration (real local Ray/MLflow/Serve),
and anything marked ``slow`` (run with ``make test-slow``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$RECSYS_SHARED_DATA``."""
    return Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real datasets not available: {path} is absent (set RECSYS_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed key so that tests never create key files in the working tree."""
    monkeypatch.setenv("RECSYS_PSEUDONYM_KEY", "00112233445566778899aabbccddeeff")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 logical CPUs, loopback only), shut down after the session."""
    import ray

    from recsys.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
