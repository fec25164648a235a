"""serve/config.yaml is a valid Serve config (the schema `serve deploy` and KubeRay's RayService
use), its args validate against the typed app builder's ``AppArgs``, and it binds to loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve" / "config.yaml"


def test_shipped_serve_config_is_valid() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs, build_app

    raw = yaml.safe_load(CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw) if hasattr(
        ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    assert not args.model_uri.startswith("models:/")  # works before anything is registered
    (dep,) = app.deployments
    auto = dep.autoscaling_config
    assert dep.name == "Recommender" and auto["min_replicas"] <= auto["max_replicas"]
    assert auto["target_ongoing_requests"] > 0 and auto["downscale_delay_s"] > 0
    assert dep.ray_actor_options.num_cpus > 0
    import inspect

    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs


def test_app_args_refuse_unknown_keys_and_bad_values() -> None:
    from pydantic import ValidationError

    from serve.app import AppArgs

    with pytest.raises(ValidationError, match="model_url"):
        AppArgs.model_validate({"model_url": "x"})
    with pytest.raises(ValidationError, match="max_batch_size"):
        AppArgs(max_batch_size=0)
    assert AppArgs(model_uri="models:/recsys-shop_a@champion").poll_interval_s > 0
