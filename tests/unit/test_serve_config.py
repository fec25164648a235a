"""serve/config.yaml is a valid Serve config (the schema `serve deploy` and KubeRay's RayService
use), its args validate against the typed app builder's ``AppArgs``, and it binds to loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve" / "config.yaml"


def test_shipped_serve_config_is_valid() -> None:
    from recsys.serving.app import AppArgs, build_app
    from recsys.serving.deploy import load_serve_config

    config = load_serve_config(CONFIG, deployments=("Gateway", "Recommender"))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    # It serves each platform's champion as the demo pipeline registers them, its targets
    # loaded at start.
    from recsys.pipeline import load_pipeline_config

    demo = load_pipeline_config(REPO / "configs" / "pipeline" / "demo.yaml")
    assert args.model_uri == f"models:/{demo.model_name('{platform}')}@champion"
    assert args.platforms == demo.transfer.targets
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
    from recsys.serving.args import AppArgs, tracking_uri

    monkeypatch.delenv("RECSYS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path))  # no runs/mlflow/server.json there
    assert tracking_uri(AppArgs()) is None
    monkeypatch.setenv("RECSYS_MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(AppArgs()) == "http://127.0.0.1:5999"
    assert tracking_uri(AppArgs(tracking_uri="http://127.0.0.1:5111")) == "http://127.0.0.1:5111"


def _broken(tmp_path: Path, edit) -> Path:  # noqa: ANN001 (a function editing the raw dict)
    raw = yaml.safe_load(CONFIG.read_text())
    edit(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("edit", "message"), [
    # Ray's schema ignores unknown keys; a typo would silently deploy the default.
    (lambda r: r["applications"][0]["deployments"][1].update(max_queued_request=5),
     r"applications\[0\]\.deployments\[1\]\.max_queued_request: unknown key "
     r"'max_queued_request' \(did you mean 'max_queued_requests'\?\)"),
    (lambda r: r["applications"][0]["deployments"][1]["autoscaling_config"].update(
        max_replica=3), r"autoscaling_config\.max_replica: unknown key"),
    (lambda r: r["http_options"].update(hots="0.0.0.0"), r"http_options\.hots: unknown key"),
    (lambda r: r["applications"][0]["deployments"][0].update(name="Gatway"),
     r"no deployment named 'Gatway' .*did you mean 'Gateway'"),
    (lambda r: r["applications"][0]["deployments"][0].update(max_ongoing_requests=-1),
     r"max_ongoing_requests"),
])
def test_serve_config_errors_name_the_file_and_the_key(tmp_path: Path, edit, message: str
                                                      ) -> None:  # noqa: ANN001
    from recsys.serving.deploy import ServeConfigError, load_serve_config

    path = _broken(tmp_path, edit)
    with pytest.raises(ServeConfigError, match=message) as err:
        load_serve_config(path, deployments=("Gateway", "Recommender"))
    assert str(path) in str(err.value)


def test_deployment_options_are_what_the_config_sets_plus_secrets_in_env() -> None:
    from recsys.serving.deploy import deployment_options, load_serve_config, with_env_vars

    app = load_serve_config(CONFIG).applications[0]
    model = deployment_options(app, "Recommender")
    assert model["max_ongoing_requests"] == 64
    assert model["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in model  # unset options stay at the deployment's defaults
    assert deployment_options(app, "Nope") == {}
    merged = with_env_vars(model, {"RECSYS_API_KEY": "k"})
    assert merged["ray_actor_options"]["runtime_env"]["env_vars"] == {"RECSYS_API_KEY": "k"}
    assert merged["ray_actor_options"]["num_cpus"] == model["ray_actor_options"]["num_cpus"]
    assert "runtime_env" not in model.get("ray_actor_options", {})  # the input is not mutated
