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

    from recsys.serving.app import AppArgs, build_app

    raw = yaml.safe_load(CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw) if hasattr(
        ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    # It serves the champion that the demo pipeline registers for its first target.
    from recsys.pipeline import load_pipeline_config

    demo = load_pipeline_config(REPO / "configs" / "pipeline" / "demo.yaml")
    name = demo.registry.model_name.format(platform=demo.transfer.targets[0])
    assert args.model_uri == f"models:/{name}@champion"
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Gateway", "Recommender"}  # the two tiers compose() builds
    auto = deps["Recommender"].autoscaling_config
    assert auto["min_replicas"] <= auto["max_replicas"]
    assert auto["target_ongoing_requests"] > 0 and auto["downscale_delay_s"] > 0
    assert all(d.ray_actor_options.num_cpus > 0 for d in deps.values())
    import inspect

    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs


def test_app_args_refuse_unknown_keys_and_bad_values() -> None:
    from pydantic import ValidationError

    from recsys.serving.app import AppArgs

    with pytest.raises(ValidationError, match="model_url"):
        AppArgs.model_validate({"model_url": "x"})
    with pytest.raises(ValidationError, match="max_batch_size"):
        AppArgs(max_batch_size=0)
    assert AppArgs(model_uri="models:/recsys-shop_a@champion").poll_interval_s > 0


def test_registry_is_the_apps_the_environments_or_the_local_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys.serving.app import AppArgs, tracking_uri

    monkeypatch.delenv("RECSYS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path))  # no runs/mlflow/server.json there
    assert tracking_uri(AppArgs()) is None
    monkeypatch.setenv("RECSYS_MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(AppArgs()) == "http://127.0.0.1:5999"
    assert tracking_uri(AppArgs(tracking_uri="http://127.0.0.1:5111")) == "http://127.0.0.1:5111"
