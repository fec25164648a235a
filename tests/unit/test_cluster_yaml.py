"""ray_cluster.yaml: valid for Ray's cluster launcher, and big enough for the jobs we ship.

A static check only: the cloud provider (AWS) cannot be exercised here, so nothing is launched;
the file is validated with Ray's own schema code (``prepare_config`` + ``validate_config``, what
``ray up`` runs before it talks to the cloud) and its node types are compared with the
resources that the shipped GPU training configs and serve/config.yaml ask for.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from recsys.config import load_config
from recsys.training.config import TrainJobConfig

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
SERVE_CONFIG = REPO / "serve" / "config.yaml"
GPU_TRAIN_CONFIGS = sorted(p for p in (REPO / "configs" / "train").rglob("*.yaml")
                           if load_config(TrainJobConfig, p, [f"mode={p.stem}"]).scaling.use_gpu)
SHARED_MOUNT = "/mnt/recsys"
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSW|SECRET|CREDENTIAL", re.I)


def _raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(raw: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` validates: defaults of the provider filled in, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _prepared(_raw())


def _node_types(cluster: dict[str, Any]) -> tuple[dict, dict, dict]:
    types_ = cluster["available_node_types"]
    head = types_[cluster["head_node_type"]]
    workers = [t for name, t in types_.items() if name != cluster["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in workers if t["resources"].get("GPU", 0) == 0]
    assert len(gpu) == 1 and len(cpu) == 1, "expected one GPU and one CPU worker type"
    return head, gpu[0], cpu[0]


def test_validates_with_rays_schema(cluster: dict[str, Any]) -> None:
    assert cluster["provider"]["type"] == "aws"


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(idle_timeout_minute=5), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=0.5),
     jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="nope"), ValueError),
])
def test_schema_check_rejects_broken_variants(mutate: Any, error: type[Exception]) -> None:
    """The validation above has teeth: a misspelt key or a bad value fails it."""
    raw = _raw()
    mutate(raw)
    with pytest.raises(error):
        _prepared(raw)


def test_shape_head_without_gpu_autoscaling_gpu_and_cpu_types(cluster: dict[str, Any]) -> None:
    head, gpu, cpu = _node_types(cluster)
    assert head["resources"].get("GPU", 0) == 0
    assert gpu["min_workers"] == 0 < gpu["max_workers"], "GPU nodes must scale from zero"
    assert cpu["max_workers"] > cpu["min_workers"]
    assert cluster["max_workers"] >= gpu["max_workers"] + cpu["max_workers"]
    assert 0 < cluster["idle_timeout_minutes"] <= 30
    assert cluster["docker"]["image"]
    assert cluster["file_mounts"].get("/home/ray/recsys") == "."
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert installs and all("/home/ray/recsys" in c for c in installs)
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])


def test_shared_volume_and_job_environment(cluster: dict[str, Any]) -> None:
    """Every node sees /mnt/recsys, and the env vars set are ones the project reads."""
    from recsys.data.pseudonym import KEY_ENV, KEY_FILE_ENV
    from recsys.settings import Settings

    options = " ".join(cluster["docker"]["run_options"])
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in options
    assert any(SHARED_MOUNT in c for c in cluster["initialization_commands"])
    known = ({f"RECSYS_{name.upper()}" for name in Settings.model_fields}
             | {KEY_ENV, KEY_FILE_ENV, "RAY_AUTH_MODE"})
    set_vars = {opt.split()[1].split("=")[0] for opt in cluster["docker"]["run_options"]
                if opt.startswith("--env ")}
    assert {"RECSYS_MLFLOW_TRACKING_URI", "RECSYS_STORAGE_PATH"} <= set_vars
    assert set_vars <= known, f"unknown RECSYS_ variables: {set_vars - known}"


def _train_worker_bundle(cfg: TrainJobConfig) -> tuple[dict[str, float], int]:
    """Per-worker resources and worker count of the job's ScalingConfig, as build_trainer
    (recsys/training/trainer.py) builds it: GPU jobs take Ray's default bundle."""
    from ray.train import ScalingConfig

    on_gpu = cfg.scaling.use_gpu
    per_worker = None if on_gpu else {"CPU": cfg.scaling.cpus_per_worker}
    sc = ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=on_gpu,
                       resources_per_worker=per_worker)
    return dict(sc._resources_per_worker_not_none), sc.num_workers


def _per_node(node: dict[str, Any], bundle: dict[str, float]) -> int:
    return min(math.floor(node["resources"].get(k, 0) / v) for k, v in bundle.items() if v)


def test_a_gpu_training_config_is_shipped() -> None:
    assert GPU_TRAIN_CONFIGS, "no configs/train/**.yaml with scaling.use_gpu: true"
    cfg = load_config(TrainJobConfig, REPO / "configs/train/gpu/pretrain.yaml", ["mode=pretrain"])
    assert (cfg.scaling.engine, cfg.deepspeed.zero_stage, cfg.deepspeed.bf16) == (
        "deepspeed", 2, True)
    for path in (cfg.data.examples, cfg.encoder.cache_dir, cfg.output_dir):
        assert path.startswith(SHARED_MOUNT + "/"), f"{path} is not on the shared volume"


@pytest.mark.parametrize("path", GPU_TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_gpu_worker_type_hosts_the_training_job(cluster: dict[str, Any], path: Path) -> None:
    head, gpu, cpu = _node_types(cluster)
    cfg = load_config(TrainJobConfig, path, [f"mode={path.stem}"])
    bundle, workers = _train_worker_bundle(cfg)
    assert bundle.get("GPU") == 1
    per_node = _per_node(gpu, bundle)
    assert per_node >= 1, f"a {gpu['node_config']['InstanceType']} cannot host one worker"
    assert per_node * gpu["max_workers"] >= workers, (
        f"{workers} workers need {math.ceil(workers / per_node)} GPU nodes, "
        f"max_workers is {gpu['max_workers']}")
    assert _per_node(head, bundle) == 0 and _per_node(cpu, bundle) == 0


def test_cpu_workers_can_host_ray_data(cluster: dict[str, Any]) -> None:
    """Ray Data tasks take 1 CPU each by default; GPU training workers take no CPU, so the CPU
    type plus the head must leave room for a parallel read/map stage beside the driver."""
    head, _, cpu = _node_types(cluster)
    assert cpu["resources"]["CPU"] >= 8
    assert head["resources"]["CPU"] + cpu["resources"]["CPU"] * cpu["max_workers"] >= 32


def _serve_replicas(serve_cfg: dict[str, Any]) -> list[tuple[str, dict[str, float], int]]:
    """(deployment, per-replica resources, max replicas) for every deployment of every app.
    Unset values take Ray Serve's defaults (1 CPU, 0 GPUs, 1 replica)."""
    out = []
    for app in serve_cfg["applications"]:
        for dep in app.get("deployments", []):
            opts = dep.get("ray_actor_options") or {}
            res = {"CPU": float(opts.get("num_cpus", 1)), "GPU": float(opts.get("num_gpus", 0))}
            auto = dep.get("autoscaling_config") or {}
            replicas = int(auto.get("max_replicas", dep.get("num_replicas", 1)))
            out.append((f"{app['name']}/{dep['name']}", res, replicas))
    return out


def test_serve_replicas_fit_head_and_cpu_workers(cluster: dict[str, Any]) -> None:
    if not SERVE_CONFIG.exists():
        pytest.skip("serve/config.yaml does not exist yet (written by the serving issue)")
    head, _, cpu = _node_types(cluster)
    replicas = _serve_replicas(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert replicas, "serve/config.yaml lists no deployments"
    total_cpu = 0.0
    for name, res, count in replicas:
        assert res["GPU"] == 0, f"{name} asks for a GPU; serving runs on CPU nodes"
        assert res["CPU"] <= max(head["resources"]["CPU"], cpu["resources"]["CPU"]), name
        total_cpu += res["CPU"] * count
    capacity = head["resources"]["CPU"] + cpu["resources"]["CPU"] * cpu["max_workers"]
    assert total_cpu <= capacity, f"Serve at max replicas needs {total_cpu} CPUs of {capacity}"


def _run_env(cluster: dict[str, Any]) -> dict[str, str]:
    """The ``--env NAME=VALUE`` options of the container on every node."""
    return dict(opt.split(None, 1)[1].split("=", 1) for opt in cluster["docker"]["run_options"]
                if opt.startswith("--env "))


def test_token_auth_on_every_node_and_no_secret_inline(cluster: dict[str, Any]) -> None:
    """Ray token authentication on every node: RAY_AUTH_MODE=token in every container's
    environment, the token a file synced from the launching machine (its ~/.ray/auth_token, where
    `ray get-auth-token --generate` writes it; the same file then authenticates `ray job submit`
    there). No secret value in the file: keys are files on the nodes, named by *_FILE variables."""
    env = _run_env(cluster)
    assert env.get("RAY_AUTH_MODE") == "token"
    docker = cluster["docker"]
    assert not {"head_run_options", "worker_run_options"} & set(docker), "one env for all nodes"
    assert all("docker" not in t for t in cluster["available_node_types"].values())
    assert cluster["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    assert ".recsys" in cluster["rsync_exclude"], "the local demo's keys must not be synced"
    for name, value in env.items():
        if SECRET_NAME.search(name):
            assert name.endswith("_FILE") and value.startswith(SHARED_MOUNT + "/secrets/"), name
    commands = " ".join(cluster[k] if isinstance(cluster[k], str) else " ".join(cluster[k])
                        for k in ("initialization_commands", "setup_commands",
                                  "head_start_ray_commands", "worker_start_ray_commands"))
    text = CLUSTER_YAML.read_text()
    for needle in ("RAY_AUTH_TOKEN=", "RAY_AUTH_MODE=disabled", "PASSWORD="):
        assert needle not in text and needle not in commands, needle
