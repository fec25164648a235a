"""infra/: KubeRay + MLflow manifests checked against a field schema, the RayService kept equal to
serve/config.yaml, and one Ray/torch/DeepSpeed/MLflow version across Dockerfile, manifests and
ray_cluster.yaml.

Static checks only: no Kubernetes API server or KubeRay operator runs here, and the KubeRay CRDs
cannot be downloaded (neither the ``kuberay`` nor the ``kubernetes`` PyPI package ships them).
``SCHEMA`` below is a trimmed field tree written from KubeRay's ray.io/v1 Go types
(ray-operator/apis/ray/v1/{raycluster,rayjob,rayservice}_types.go, KubeRay v1.x) and the
Kubernetes core/apps v1 API: every field the manifests use, and the other fields of the same
objects where cheap, so that a misspelt or misplaced key fails with its path.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from recsys.config import load_config
from recsys.pipeline import PipelineConfig
from recsys.training.config import TrainJobConfig

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
SERVE_CONFIG = REPO / "serve" / "config.yaml"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")

# --- the field schema -------------------------------------------------------------------------
# A spec is a type name ("string", "integer", "number", "boolean", "quantity": int or string like
# "4" / "16Gi", "any": free-form), {"enum": [...]}, {"list": spec}, {"map": spec} (string keys),
# or {"fields": {name: spec}, "required": [...]} (an object; unknown keys are errors).

STR, INT, NUM, BOOL, QTY, ANY = "string", "integer", "number", "boolean", "quantity", "any"


def obj(required: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
    return {"fields": fields, "required": list(required)}


def lst(item: Any) -> dict[str, Any]:
    return {"list": item}


def mapping(value: Any = STR) -> dict[str, Any]:
    return {"map": value}


OBJECT_META = obj(("name",), name=STR, namespace=STR, labels=mapping(), annotations=mapping(),
                  generateName=STR)
SECRET_KEY_REF = obj(("name", "key"), name=STR, key=STR, optional=BOOL)
ENV_VAR = obj(("name",), name=STR, value=STR,
              valueFrom=obj(secretKeyRef=SECRET_KEY_REF, configMapKeyRef=SECRET_KEY_REF,
                            fieldRef=obj(("fieldPath",), fieldPath=STR)))
ENV_FROM = obj(secretRef=obj(("name",), name=STR), configMapRef=obj(("name",), name=STR))
RESOURCES = obj(requests=mapping(QTY), limits=mapping(QTY))
VOLUME_MOUNT = obj(("name", "mountPath"), name=STR, mountPath=STR, subPath=STR, readOnly=BOOL)
PROBE = obj(httpGet=obj(("port",), path=STR, port=QTY), exec=obj(command=lst(STR)),
            tcpSocket=obj(("port",), port=QTY), periodSeconds=INT, initialDelaySeconds=INT,
            timeoutSeconds=INT, failureThreshold=INT)
CONTAINER = obj(("name",), name=STR, image=STR, imagePullPolicy={"enum": ["Always", "IfNotPresent",
                                                                          "Never"]},
                command=lst(STR), args=lst(STR), workingDir=STR, env=lst(ENV_VAR),
                envFrom=lst(ENV_FROM), resources=RESOURCES,
                ports=lst(obj(("containerPort",), name=STR, containerPort=INT,
                              protocol={"enum": ["TCP", "UDP"]})),
                volumeMounts=lst(VOLUME_MOUNT), readinessProbe=PROBE, livenessProbe=PROBE,
                securityContext=ANY, lifecycle=ANY)
VOLUME = obj(("name",), name=STR,
             persistentVolumeClaim=obj(("claimName",), claimName=STR, readOnly=BOOL),
             secret=obj(("secretName",), secretName=STR), emptyDir=ANY,
             configMap=obj(("name",), name=STR))
TOLERATION = obj(key=STR, operator={"enum": ["Exists", "Equal"]}, value=STR,
                 effect={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]})
POD_SPEC = obj(("containers",), containers=lst(CONTAINER), initContainers=lst(CONTAINER),
               volumes=lst(VOLUME), serviceAccountName=STR, nodeSelector=mapping(),
               tolerations=lst(TOLERATION), affinity=ANY, securityContext=ANY,
               imagePullSecrets=lst(obj(("name",), name=STR)), restartPolicy=STR)
POD_TEMPLATE = obj(("spec",), metadata=obj(labels=mapping(), annotations=mapping()),
                   spec=POD_SPEC)
SERVICE_SPEC = obj(type={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, clusterIP=STR,
                   selector=mapping(),
                   ports=lst(obj(("port",), name=STR, port=INT, targetPort=QTY,
                                 protocol={"enum": ["TCP", "UDP"]})))
LABEL_SELECTOR = obj(("matchLabels",), matchLabels=mapping())
PVC_SPEC = obj(("accessModes", "resources"),
               accessModes=lst({"enum": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany",
                                         "ReadWriteOncePod"]}),
               storageClassName=STR, resources=obj(("requests",), requests=mapping(QTY)))

# KubeRay ray.io/v1 (json tags of the Go types; "required" = no omitempty there).
AUTOSCALER_OPTIONS = obj(resources=RESOURCES, image=STR, imagePullPolicy=STR, env=lst(ENV_VAR),
                         envFrom=lst(ENV_FROM), volumeMounts=lst(VOLUME_MOUNT),
                         securityContext=ANY, idleTimeoutSeconds=INT,
                         upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]})
HEAD_GROUP_SPEC = obj(("rayStartParams", "template"),
                      serviceType={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                      headService=ANY, enableIngress=BOOL, rayStartParams=mapping(),
                      template=POD_TEMPLATE)
WORKER_GROUP_SPEC = obj(("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
                        groupName=STR, replicas=INT, minReplicas=INT, maxReplicas=INT,
                        numOfHosts=INT, rayStartParams=mapping(), template=POD_TEMPLATE,
                        scaleStrategy=obj(workersToDelete=lst(STR)))
RAY_CLUSTER_SPEC = obj(("headGroupSpec",), headGroupSpec=HEAD_GROUP_SPEC,
                       workerGroupSpecs=lst(WORKER_GROUP_SPEC), rayVersion=STR,
                       enableInTreeAutoscaling=BOOL, autoscalerOptions=AUTOSCALER_OPTIONS,
                       headServiceAnnotations=mapping(), suspend=BOOL)
RAY_JOB_SPEC = obj(("entrypoint",), activeDeadlineSeconds=INT, backoffLimit=INT,
                   rayClusterSpec=RAY_CLUSTER_SPEC, submitterPodTemplate=POD_TEMPLATE,
                   metadata=mapping(), clusterSelector=mapping(),
                   submitterConfig=obj(backoffLimit=INT), managedBy=STR, deletionStrategy=ANY,
                   entrypoint=STR, runtimeEnvYAML=STR, jobId=STR,
                   submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                   entrypointResources=STR, entrypointNumCpus=NUM, entrypointNumGpus=NUM,
                   ttlSecondsAfterFinished=INT, shutdownAfterJobFinishes=BOOL, suspend=BOOL)
RAY_SERVICE_SPEC = obj(("serveConfigV2", "rayClusterConfig"), serveConfigV2=STR,
                       rayClusterConfig=RAY_CLUSTER_SPEC, serveService=ANY)


def resource(api: str, spec: Any = None, required: tuple[str, ...] = ("spec",)) -> dict:
    fields = {"apiVersion": {"enum": [api]}, "kind": STR, "metadata": OBJECT_META}
    if spec is not None:
        fields["spec"] = spec
    return obj(("apiVersion", "kind", "metadata", *(required if spec else ())), **fields)


SCHEMA: dict[str, dict] = {
    "RayCluster": resource("ray.io/v1", RAY_CLUSTER_SPEC),
    "RayJob": resource("ray.io/v1", RAY_JOB_SPEC),
    "RayService": resource("ray.io/v1", RAY_SERVICE_SPEC),
    "Namespace": resource("v1"),
    "ServiceAccount": resource("v1"),
    "PersistentVolumeClaim": resource("v1", PVC_SPEC),
    "Service": resource("v1", SERVICE_SPEC),
    "Deployment": resource("apps/v1", obj(("selector", "template"), replicas=INT,
                                          selector=LABEL_SELECTOR, template=POD_TEMPLATE)),
    "StatefulSet": resource("apps/v1", obj(
        ("selector", "template", "serviceName"), serviceName=STR, replicas=INT,
        selector=LABEL_SELECTOR, template=POD_TEMPLATE,
        volumeClaimTemplates=lst(obj(("metadata", "spec"), metadata=OBJECT_META,
                                     spec=PVC_SPEC))))
}

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def check(node: Any, spec: Any, path: str = "") -> list[str]:
    """Every problem of ``node`` against ``spec``, each naming its dotted path."""
    where = path or "<root>"
    if spec == ANY:
        return []
    if isinstance(spec, str):
        ok = {STR: isinstance(node, str), BOOL: isinstance(node, bool),
              INT: isinstance(node, int) and not isinstance(node, bool),
              NUM: isinstance(node, int | float) and not isinstance(node, bool),
              QTY: (isinstance(node, int) and not isinstance(node, bool))
              or (isinstance(node, str) and bool(_QUANTITY.match(node)))}[spec]
        return [] if ok else [f"{where}: expected {spec}, got {node!r}"]
    if "enum" in spec:
        return [] if node in spec["enum"] else [f"{where}: {node!r} not in {spec['enum']}"]
    if "list" in spec:
        if not isinstance(node, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(node) for e in check(item, spec["list"],
                                                                f"{path}[{i}]")]
    if not isinstance(node, dict):
        return [f"{where}: expected a mapping"]
    if "map" in spec:
        return [e for k, v in node.items() for e in check(v, spec["map"], f"{path}.{k}")]
    errors = [f"{where}: missing required field '{k}'" for k in spec["required"] if k not in node]
    for key, value in node.items():
        child = f"{path}.{key}" if path else key
        if key not in spec["fields"]:
            errors.append(f"{child}: unknown field")
        else:
            errors += check(value, spec["fields"][key], child)
    return errors


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in MANIFESTS for d in _docs(p)]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _all_docs() if d["kind"] == kind]
    return doc


def _render_module() -> ModuleType:
    """infra/render.py is a script beside the manifests, not part of the installed package."""
    spec = importlib.util.spec_from_file_location("infra_render", REPO / "infra" / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("infra_render", module)
    spec.loader.exec_module(module)
    return module


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(kind, RayClusterSpec) of every Ray CR that defines a cluster."""
    out = []
    for _, d in _all_docs():
        if d["kind"] == "RayCluster":
            out.append(("RayCluster", d["spec"]))
        elif d["kind"] == "RayService":
            out.append(("RayService", d["spec"]["rayClusterConfig"]))
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            out.append(("RayJob", d["spec"]["rayClusterSpec"]))
    return out


def _ray_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind, spec in _cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        for name, group in groups:
            out += [(f"{kind}/{name}", c) for c in group["template"]["spec"]["containers"]]
    return out


# --- tests --------------------------------------------------------------------------------------

def test_manifests_exist_and_cover_every_piece() -> None:
    kinds = [d["kind"] for _, d in _all_docs()]
    for kind in (*RAY_KINDS, "Deployment", "Service", "StatefulSet", "PersistentVolumeClaim"):
        assert kind in kinds, f"no {kind} in infra/k8s"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_field_schema(path: Path) -> None:
    for doc in _docs(path):
        assert doc.get("kind") in SCHEMA, f"{path.name}: kind {doc.get('kind')!r} has no schema"
        errors = check(doc, SCHEMA[doc["kind"]])
        assert not errors, f"{path.name} ({doc['kind']}):\n" + "\n".join(errors)
        assert doc["metadata"].get("namespace", "recsys") == "recsys" or doc["kind"] == "Namespace"


def test_schema_check_names_the_broken_field() -> None:
    doc = _one("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"] = "lots"
    del doc["spec"]["workerGroupSpecs"][1]["groupName"]
    errors = check(doc, SCHEMA["RayCluster"])
    assert "spec.workerGroupSpecs[0].maxReplica: unknown field" in errors
    assert any(e.startswith("spec.headGroupSpec.template.spec.containers[0].resources.limits."
                            "memory: expected quantity") for e in errors)
    assert "spec.workerGroupSpecs[1]: missing required field 'groupName'" in errors
    job = _one("RayJob")
    job["spec"]["submissionMode"] = "K8sMode"
    assert check(job, SCHEMA["RayJob"]) == [
        "spec.submissionMode: 'K8sMode' not in ['K8sJobMode', 'HTTPMode', 'InteractiveMode']"]


def test_services_stay_inside_the_cluster() -> None:
    """No LoadBalancer/NodePort: access from outside goes through kubectl port-forward to
    127.0.0.1 or an Ingress the operator adds on purpose."""
    for path, doc in _all_docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name
    for kind, spec in _cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", kind


def test_rayservice_embeds_serve_config_applications() -> None:
    if not SERVE_CONFIG.exists():
        pytest.skip("serve/config.yaml does not exist yet (written by the serving issue)")
    render = _render_module()
    embedded = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])
    assert embedded == {"applications": render.serve_applications(SERVE_CONFIG)}, (
        "infra/k8s/rayservice.yaml differs from serve/config.yaml: run python -m infra.render")
    assert (K8S / "rayservice.yaml").read_text() == render.render(), (
        "infra/k8s/rayservice.yaml is stale: run python -m infra.render")


def test_render_replaces_only_the_block() -> None:
    render = _render_module()
    manifest = ("# c\nspec:\n  serveConfigV2: |\n    old: 1\n\n    more: 2\n\n"
                "  rayClusterConfig:\n    rayVersion: x\n")
    out = render.replace_block(manifest, render.serve_config_v2([{"name": "a",
                                                                  "import_path": "m:f"}]))
    assert out.startswith("# c\nspec:\n  serveConfigV2: |\n    # Generated")
    assert out.endswith("\n\n  rayClusterConfig:\n    rayVersion: x\n")
    doc = yaml.safe_load(out)
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == {
        "applications": [{"name": "a", "import_path": "m:f"}]}
    with pytest.raises(ValueError, match="expected one 'serveConfigV2"):
        render.replace_block("spec: {}\n", "x")


def _versions() -> dict[str, str]:
    lock = dict(line.split("==", 1) for line in
                (REPO / "requirements" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_range = re.search(r'"ray\[[^\]]*\]>=([0-9.]+),<([0-9.]+)"', pyproject)
    assert ray_range, "pyproject.toml: no ray pin"
    assert lock["ray"].startswith(ray_range.group(1)), (lock["ray"], ray_range.group(0))
    project = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert project
    return {"ray": lock["ray"], "torch": lock["torch"], "deepspeed": lock["deepspeed"],
            "mlflow": lock["mlflow"], "project": project.group(1)}


def test_dockerfile_pins_match_the_lock() -> None:
    v = _versions()
    text = (REPO / "infra" / "Dockerfile").read_text()
    run = text.replace("\\\n", " ")
    froms = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    assert (f"rayproject/ray:{v['ray']}-py311-gpu", "ray") in froms
    assert re.search(rf"pip install torch=={re.escape(v['torch'])}\b", run)
    assert f"deepspeed=={v['deepspeed']}" in run
    assert f"mlflow=={v['mlflow']}" in run
    # The project is installed with the lock minus its torch line (the CPU build's pin).
    assert "grep -v '^torch==' /tmp/constraints.txt > /tmp/constraints-gpu.txt" in run
    assert "pip install -c /tmp/constraints-gpu.txt -e ." in run
    assert "WORKDIR /home/ray/recsys" in text


def test_one_image_and_ray_version_everywhere() -> None:
    v = _versions()
    cluster = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    image = cluster["docker"]["image"]
    assert image.endswith(f":{v['project']}-ray{v['ray']}-py311-gpu"), image
    for where, container in _ray_containers():
        assert container["image"] == image, where
    for kind, spec in _cluster_specs():
        assert spec["rayVersion"] == v["ray"], kind
    mlflow = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert mlflow.endswith(f":{v['mlflow']}"), mlflow


def test_ray_pods_share_env_and_volume() -> None:
    from recsys.data.pseudonym import KEY_ENV, KEY_FILE_ENV
    from recsys.settings import Settings

    known = {f"RECSYS_{n.upper()}" for n in Settings.model_fields} | {KEY_ENV, KEY_FILE_ENV}
    service = next(d for _, d in _all_docs()
                   if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    port = service["spec"]["ports"][0]["port"]
    envs = []
    for where, container in _ray_containers():
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= known, f"{where}: unknown variables {set(env) - known}"
        assert env["RECSYS_MLFLOW_TRACKING_URI"]["value"] == (
            f"http://mlflow.recsys.svc.cluster.local:{port}"), where
        assert env["RECSYS_STORAGE_PATH"]["value"].startswith("s3://"), where
        assert {"name": "shared", "mountPath": "/mnt/recsys"} in container["volumeMounts"], where
        envs.append(sorted(env))
    assert all(e == envs[0] for e in envs)


def test_rayjob_runs_the_pipeline_on_the_raycluster() -> None:
    job, cluster = _one("RayJob"), _one("RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    command = job["spec"]["entrypoint"].split("&&")[-1]
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "jobs.pipeline", "--config"]
    config = REPO / argv[4]
    assert config.parent == REPO / "configs" / "pipeline" and config.exists(), argv[4]
    cfg = load_config(PipelineConfig, config)
    assert str(cfg.root).startswith("/mnt/recsys/"), "pipeline outputs must be on the volume"
    assert cfg.pretrain is not None
    train = load_config(TrainJobConfig, REPO / cfg.pretrain.config, ["mode=pretrain"])
    assert train.scaling.use_gpu


def test_gpu_group_hosts_the_training_job() -> None:
    cluster = _one("RayCluster")["spec"]
    assert "nvidia.com/gpu" not in str(cluster["headGroupSpec"])
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    gpu = [g for g in cluster["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) == 1 and gpu[0]["minReplicas"] == 0
    gpus_per_pod = int(gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"])
    for path in sorted((REPO / "configs" / "train").rglob("*.yaml")):
        cfg = load_config(TrainJobConfig, path, [f"mode={path.stem}"])
        if cfg.scaling.use_gpu:  # one GPU per worker (Ray's default bundle for use_gpu)
            assert gpus_per_pod * gpu[0]["maxReplicas"] >= cfg.scaling.num_workers, path.name


def test_rayservice_pods_see_the_runs_the_app_reads() -> None:
    """serve/config.yaml's relative paths resolve against /home/ray/recsys
    (recsys/serving/app.py)."""
    for where, container in _ray_containers():
        if where.startswith("RayService"):
            assert {"name": "shared", "mountPath": "/home/ray/recsys/runs",
                    "subPath": "runs"} in container["volumeMounts"], where
