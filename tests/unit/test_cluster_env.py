"""``init_ray``'s start-up environment: set for the cluster's processes, restored afterwards."""

from __future__ import annotations

import os

import pytest

from recsys.cluster import GCS_PORT_ENV, _own_address_env


def test_address_env_is_set_while_starting_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(GCS_PORT_ENV, raising=False)
    with _own_address_env():
        port = os.environ[GCS_PORT_ENV]
        assert os.environ["RAY_ADDRESS"] == f"127.0.0.1:{port}"
        assert int(port) > 0
    assert "RAY_ADDRESS" not in os.environ and GCS_PORT_ENV not in os.environ


def test_a_chosen_gcs_port_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GCS_PORT_ENV, "45678")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with _own_address_env():
        assert os.environ["RAY_ADDRESS"] == "127.0.0.1:45678"
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert os.environ[GCS_PORT_ENV] == "45678"
