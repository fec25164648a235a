"""infra/: KubeRay + MLflow manifests checked against a field schema, the RayService kept equal to
serve/config.yaml, one Ray/torch/DeepSpeed/MLflow version across Dockerfile, manifests and
ray_cluster.yaml, and the security settings (secrets, pod security, NetworkPolicies, MLflow and
Ray authentication).

Static checks only: this is the one part of the project that cannot run for real here. No
Kubernetes API server, kubelet, CNI plugin or KubeRay operator runs here, and the KubeRay CRDs
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
SECCOMP = obj(("type",), type={"enum": ["RuntimeDefault", "Localhost", "Unconfined"]},
              localhostProfile=STR)
SECURITY_CONTEXT = obj(runAsNonRoot=BOOL, runAsUser=INT, runAsGroup=INT,
                       readOnlyRootFilesystem=BOOL, allowPrivilegeEscalation=BOOL,
                       privileged=BOOL, capabilities=obj(drop=lst(STR), add=lst(STR)),
                       seccompProfile=SECCOMP)
POD_SECURITY_CONTEXT = obj(runAsNonRoot=BOOL, runAsUser=INT, runAsGroup=INT, fsGroup=INT,
                           fsGroupChangePolicy={"enum": ["OnRootMismatch", "Always"]},
                           supplementalGroups=lst(INT), seccompProfile=SECCOMP)
CONTAINER = obj(("name",), name=STR, image=STR, imagePullPolicy={"enum": ["Always", "IfNotPresent",
                                                                          "Never"]},
                command=lst(STR), args=lst(STR), workingDir=STR, env=lst(ENV_VAR),
                envFrom=lst(ENV_FROM), resources=RESOURCES,
                ports=lst(obj(("containerPort",), name=STR, containerPort=INT,
                              protocol={"enum": ["TCP", "UDP"]})),
                volumeMounts=lst(VOLUME_MOUNT), readinessProbe=PROBE, livenessProbe=PROBE,
                securityContext=SECURITY_CONTEXT, lifecycle=ANY)
KEY_TO_PATH = obj(("key", "path"), key=STR, path=STR, mode=INT)
VOLUME = obj(("name",), name=STR,
             persistentVolumeClaim=obj(("claimName",), claimName=STR, readOnly=BOOL),
             secret=obj(("secretName",), secretName=STR, defaultMode=INT, optional=BOOL,
                        items=lst(KEY_TO_PATH)),
             emptyDir=obj(medium={"enum": ["", "Memory"]}, sizeLimit=QTY),
             configMap=obj(("name",), name=STR, defaultMode=INT, optional=BOOL,
                           items=lst(KEY_TO_PATH)))
TOLERATION = obj(key=STR, operator={"enum": ["Exists", "Equal"]}, value=STR,
                 effect={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]})
POD_SPEC = obj(("containers",), containers=lst(CONTAINER), initContainers=lst(CONTAINER),
               volumes=lst(VOLUME), serviceAccountName=STR, nodeSelector=mapping(),
               tolerations=lst(TOLERATION), affinity=ANY, securityContext=POD_SECURITY_CONTEXT,
               automountServiceAccountToken=BOOL,
               imagePullSecrets=lst(obj(("name",), name=STR)), restartPolicy=STR)
POD_TEMPLATE = obj(("spec",), metadata=obj(labels=mapping(), annotations=mapping()),
                   spec=POD_SPEC)
SERVICE_SPEC = obj(type={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, clusterIP=STR,
                   selector=mapping(),
                   ports=lst(obj(("port",), name=STR, port=INT, targetPort=QTY,
                                 protocol={"enum": ["TCP", "UDP"]})))
LABEL_SELECTOR = obj(("matchLabels",), matchLabels=mapping())
# NetworkPolicy selectors may be empty ({}: every pod / every namespace).
SELECTOR = obj(matchLabels=mapping(),
               matchExpressions=lst(obj(("key", "operator"), key=STR, values=lst(STR),
                                        operator={"enum": ["In", "NotIn", "Exists",
                                                           "DoesNotExist"]})))
NETWORK_PEER = obj(podSelector=SELECTOR, namespaceSelector=SELECTOR,
                   ipBlock=obj(("cidr",), cidr=STR, **{"except": lst(STR)}))
NETWORK_PORT = obj(port=QTY, endPort=INT, protocol={"enum": ["TCP", "UDP", "SCTP"]})
NETWORK_POLICY_SPEC = obj(("podSelector",), podSelector=SELECTOR,
                          policyTypes=lst({"enum": ["Ingress", "Egress"]}),
                          ingress=lst(obj(**{"from": lst(NETWORK_PEER)}, ports=lst(NETWORK_PORT))),
                          egress=lst(obj(to=lst(NETWORK_PEER), ports=lst(NETWORK_PORT))))
PVC_SPEC = obj(("accessModes", "resources"),
               accessModes=lst({"enum": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany",
                                         "ReadWriteOncePod"]}),
               storageClassName=STR, resources=obj(("requests",), requests=mapping(QTY)))

# KubeRay ray.io/v1 (json tags of the Go types; "required" = no omitempty there).
AUTOSCALER_OPTIONS = obj(resources=RESOURCES, image=STR, imagePullPolicy=STR, env=lst(ENV_VAR),
                         envFrom=lst(ENV_FROM), volumeMounts=lst(VOLUME_MOUNT),
                         securityContext=SECURITY_CONTEXT, idleTimeoutSeconds=INT,
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
                       headServiceAnnotations=mapping(), suspend=BOOL,
                       # KubeRay >= 1.6 (secretName; mode alone since 1.5.1)
                       authOptions=obj(mode={"enum": ["disabled", "token"]}, secretName=STR,
                                       enableK8sTokenAuth=BOOL))
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
                                     spec=PVC_SPEC)))),
    "NetworkPolicy": resource("networking.k8s.io/v1", NETWORK_POLICY_SPEC),
    "ConfigMap": obj(("apiVersion", "kind", "metadata"), apiVersion={"enum": ["v1"]}, kind=STR,
                     metadata=OBJECT_META, data=mapping()),
    "Secret": obj(("apiVersion", "kind", "metadata"), apiVersion={"enum": ["v1"]}, kind=STR,
                  metadata=OBJECT_META, type=STR, data=mapping(), stringData=mapping()),
    "CronJob": resource("batch/v1", obj(
        ("schedule", "jobTemplate"), schedule=STR, timeZone=STR, suspend=BOOL,
        concurrencyPolicy={"enum": ["Allow", "Forbid", "Replace"]},
        startingDeadlineSeconds=INT, successfulJobsHistoryLimit=INT,
        failedJobsHistoryLimit=INT,
        jobTemplate=obj(("spec",), metadata=OBJECT_META, spec=obj(
            ("template",), backoffLimit=INT, activeDeadlineSeconds=INT,
            ttlSecondsAfterFinished=INT, template=POD_TEMPLATE)))),
    "Role": obj(("apiVersion", "kind", "metadata", "rules"),
                apiVersion={"enum": ["rbac.authorization.k8s.io/v1"]}, kind=STR,
                metadata=OBJECT_META, rules=lst(obj(("verbs",), apiGroups=lst(STR),
                                                    resources=lst(STR), verbs=lst(STR),
                                                    resourceNames=lst(STR)))),
    "RoleBinding": obj(("apiVersion", "kind", "metadata", "subjects", "roleRef"),
                       apiVersion={"enum": ["rbac.authorization.k8s.io/v1"]}, kind=STR,
                       metadata=OBJECT_META,
                       subjects=lst(obj(("kind", "name"), kind=STR, name=STR, namespace=STR,
                                        apiGroup=STR)),
                       roleRef=obj(("apiGroup", "kind", "name"), apiGroup=STR,
                                   kind={"enum": ["Role", "ClusterRole"]}, name=STR)),
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
    apps = render.cluster_applications(render.serve_applications(SERVE_CONFIG))
    assert embedded == {"applications": apps}, (
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
    # [auth]: Flask-WTF, without which `mlflow server --app-name basic-auth` does not start.
    assert f"mlflow[auth]=={v['mlflow']}" in run
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

    known = ({f"RECSYS_{n.upper()}" for n in Settings.model_fields} | {KEY_ENV, KEY_FILE_ENV}
             | {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",  # the MLflow client
                "RAY_AUTH_MODE"})                                        # Ray itself
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


def test_cronjob_runs_the_monitor_with_its_trigger_as_a_rayjob() -> None:
    """Issue 23: on a schedule, a RayJob on the RayCluster runs jobs.monitor with the trigger
    on (a drifted platform is re-fine-tuned from its champion and canaried)."""
    from recsys.monitoring.config import MonitorConfig

    cron, cluster = _one("CronJob"), _one("RayCluster")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (rayjob_file,) = [a for a in container["args"] if a.endswith(".yaml")]
    (mount,) = [m for m in container["volumeMounts"]
                if rayjob_file.startswith(m["mountPath"] + "/")]
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    config_map = [d for _, d in _all_docs() if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"] == volume["configMap"]["name"]]
    job = yaml.safe_load(config_map[0]["data"][rayjob_file.rsplit("/", 1)[1]])
    named = {**job, "metadata": {**job["metadata"], "name": "x"}}  # generateName when created
    assert check(named, SCHEMA["RayJob"]) == []
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # kubectl may create RayJobs, and nothing else, in its own namespace
    (role,) = [d for _, d in _all_docs() if d["kind"] == "Role"
               and d["metadata"]["name"] == pod["serviceAccountName"]]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list"]}]
    argv = shlex.split(job["spec"]["entrypoint"].split("&&")[-1])
    assert argv[:4] == ["python", "-m", "jobs.monitor", "--config"]
    cfg = load_config(MonitorConfig, REPO / argv[4], argv[5:])
    assert cfg.trigger.enabled and cfg.lake.startswith("/mnt/recsys/")
    pipeline = load_config(PipelineConfig, REPO / cfg.trigger.pipeline_config)
    assert str(pipeline.root).startswith("/mnt/recsys/")
    submitter = job["spec"]["submitterPodTemplate"]
    assert submitter["metadata"]["labels"] == _one("RayJob")["spec"]["submitterPodTemplate"][
        "metadata"]["labels"]  # the label network.yaml lets through to the dashboard


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


# --- secrets, pod security, network policy, authentication ---------------------------------------
# Static checks again: whether a kubelet, a CNI plugin and the KubeRay operator do what these
# manifests ask can only be seen on a real cluster, which cannot run here. What is checked is
# that the manifests ask for it: no secret value in any manifest or in the Serve config, keys as
# read-only files, every pod non-root without privileges, a default-deny NetworkPolicy whose allow
# rules are evaluated below with Kubernetes' own matching rules, MLflow and Ray with auth on.

SECRETS_DIR = "/etc/recsys/secrets"
RAY_AUTH_SECRET = "recsys-ray-auth"          # KubeRay authOptions.secretName, key auth_token
MLFLOW_CLIENT_SECRET = "recsys-mlflow-client"
OPERATOR_NS = "kuberay-system"               # infra/README.md installs the operator there
INGRESS_NS = "ingress-nginx"                 # network.yaml: the ingress controller's namespace
README = REPO / "infra" / "README.md"
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSW|SECRET|CREDENTIAL", re.I)
PLACEHOLDER = re.compile(r"^(<[^<>]+>|REPLACE[_A-Z]*|CHANGE[_-]?ME)?$")
# What the MLflow client reads from its environment (it has no *_FILE variant); every other key
# reaches a Ray pod as a file.
RAY_ENV_FROM_SECRETS = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod the manifests define, Ray pods included."""
    out = []
    for _, d in _all_docs():
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            out.append((name, d["spec"]["template"]))
        elif d["kind"] == "RayJob" and "submitterPodTemplate" in d["spec"]:
            out.append((f"{name}/submitter", d["spec"]["submitterPodTemplate"]))
        elif d["kind"] == "CronJob":
            out.append((name, d["spec"]["jobTemplate"]["spec"]["template"]))
    for kind, spec in _cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        out += [(f"{kind}/{name}", group["template"]) for name, group in groups]
    return out


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) of every container and init container."""
    return [(f"{where}/{c['name']}", t["spec"], c) for where, t in _pod_templates()
            for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]


def _ray_pod_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(w, p, c) for w, p, c in _containers() if w.split("/")[0] in RAY_KINDS
            and "/submitter/" not in w]


def _mounted_files(pod_spec: dict[str, Any], container: dict[str, Any],
                   source: str) -> dict[str, tuple[str, str]]:
    """{path: (object, key)} of the ``source`` ("secret" / "configMap") keys mounted as files."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        vol = volumes.get(mount["name"], {}).get(source)
        if vol is None:
            continue
        name = vol["secretName"] if source == "secret" else vol["name"]
        if "subPath" in mount:
            files[mount["mountPath"]] = (name, mount["subPath"])
        for item in vol.get("items", []):
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (name, item["key"])
    return files


def _secret_env_problems(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Secret values a container gets other than from a Secret, or exposes on its command line."""
    files = _mounted_files(pod_spec, container, "secret")
    problems, secret_env = [], set()
    for e in container.get("env", []):
        if not SECRET_NAME.search(e["name"]):
            continue
        secret_env.add(e["name"])
        source = e.get("valueFrom")
        if source is not None:
            if "secretKeyRef" not in source:
                problems.append(f"{e['name']} comes from {sorted(source)}, not a Secret")
        elif e["name"].endswith(("_FILE", "_PATH")):
            if e.get("value") not in files:
                problems.append(f"{e['name']}={e.get('value')!r} is no file of a mounted Secret")
        else:
            problems.append(f"{e['name']} has a literal value")
    for arg in container.get("command", []) + container.get("args", []):
        problems += [f"argument {arg!r} expands ${ref} (argv is readable by ps)"
                     for ref in re.findall(r"\$\((\w+)\)", arg) if ref in secret_env]
        if re.search(r"://[^/@\s:]+:[^/@\s]+@", arg):
            problems.append(f"argument {arg!r} carries a password")
    return problems


def _secret_values(doc: dict[str, Any]) -> list[str]:
    """Fields of a Secret object that hold anything but a placeholder."""
    return [f"{field}.{k}" for field in ("data", "stringData")
            for k, v in (doc.get(field) or {}).items() if not PLACEHOLDER.match(str(v))]


def test_no_secret_value_in_env_args_or_secret_objects() -> None:
    problems = [f"{where}: {p}" for where, pod, c in _containers()
                for p in _secret_env_problems(pod, c)]
    for kind, spec in _cluster_specs():
        auto = {"env": (spec.get("autoscalerOptions") or {}).get("env", [])}
        problems += [f"{kind}/autoscaler: {p}" for p in _secret_env_problems({}, auto)]
    problems += [f"{p.name}: Secret {d['metadata']['name']}: {f} holds a value"
                 for p, d in _all_docs() if d["kind"] == "Secret" for f in _secret_values(d)]
    assert not problems, "\n".join(problems)
    # The checks have teeth.
    container = {"name": "c", "env": [{"name": "RECSYS_API_KEY", "value": "abc"},
                                      {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {
                                          "name": "db", "key": "password"}}},
                                      {"name": "TOKEN_FILE", "value": "/tmp/token"}],
                 "args": ["--uri=postgresql://u:$(DB_PASSWORD)@db/x"]}
    assert _secret_env_problems({}, container) == [
        "RECSYS_API_KEY has a literal value",
        "TOKEN_FILE='/tmp/token' is no file of a mounted Secret",
        "argument '--uri=postgresql://u:$(DB_PASSWORD)@db/x' expands $DB_PASSWORD (argv is "
        "readable by ps)",
        "argument '--uri=postgresql://u:$(DB_PASSWORD)@db/x' carries a password"]
    assert _secret_values({"stringData": {"password": "hunter2", "user": "<user>"},
                           "data": {"token": ""}}) == ["stringData.password"]


def test_ray_pods_get_keys_as_read_only_files() -> None:
    """Application keys reach Ray pods as files of Secrets (mode 0400, read-only mounts), named
    by *_FILE variables or app args; never as environment values (Ray workers inherit those)."""
    from recsys.data.pseudonym import KEY_ENV, KEY_FILE_ENV

    for where, template in _pod_templates():
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"].get("defaultMode") == 0o400, f"{where}: {v['name']}"
                assert v["secret"].get("items"), f"{where}: {v['name']}: mount only the keys used"
        for c in template["spec"]["containers"]:
            for m in c.get("volumeMounts", []):
                if "secret" in volumes.get(m["name"], {}):
                    assert m.get("readOnly") is True, f"{where}/{c['name']}: {m['mountPath']}"
                    assert m["mountPath"].startswith(SECRETS_DIR + "/"), m["mountPath"]
    render = _render_module()
    (app,) = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])["applications"]
    for where, pod, c in _ray_pod_containers():
        env = {e["name"]: e for e in c.get("env", [])}
        from_secrets = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
        assert from_secrets <= RAY_ENV_FROM_SECRETS, f"{where}: {from_secrets} as env values"
        assert KEY_ENV not in env, f"{where}: the pseudonym key as an env value"
        files = _mounted_files(pod, c, "secret")
        assert files.get(env.get(KEY_FILE_ENV, {}).get("value")) == ("recsys-pseudonym", "key"), (
            f"{where}: ${KEY_FILE_ENV} must name the mounted recsys-pseudonym key")
        if where.startswith("RayService"):
            assert app["args"]["api_key_file"] == render.API_KEY_FILE
            assert app["args"]["auth"] == "api_key"
            assert files.get(render.API_KEY_FILE) == ("recsys-api-keys", "keys"), where


def test_serve_config_v2_carries_no_secret(tmp_path: Path) -> None:
    """serveConfigV2 is readable through the Ray dashboard API (and `kubectl get rayservice`):
    no runtime_env env_vars or args with secret values, only file paths."""
    render = _render_module()
    apps = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])["applications"]
    assert render.find_secrets(apps) == []
    bad = yaml.safe_load(yaml.safe_dump(apps))
    bad[0]["runtime_env"] = {"env_vars": {"RECSYS_API_KEY": "0123456789abcdef",
                                          "RECSYS_PSEUDONYM_KEY_FILE": "/etc/k"}}
    bad[0]["deployments"][0].setdefault("ray_actor_options", {})["runtime_env"] = {
        "env_vars": {"MLFLOW_TRACKING_PASSWORD": "x"}}
    bad[0]["args"]["api_key"] = "0123456789abcdef"
    bad[0]["args"]["model_uri"] = "https://user:pw@example.com/model"
    problems = render.find_secrets(bad)
    assert len(problems) == 4, problems
    for needle in ("RECSYS_API_KEY", "MLFLOW_TRACKING_PASSWORD", "api_key", "model_uri"):
        assert any(needle in p for p in problems), (needle, problems)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": bad}))
    with pytest.raises(ValueError, match="secret"):
        render.render(serve_config=config)


def _writable_tmp(pod_spec: dict[str, Any], mounts: list[dict[str, Any]]) -> bool:
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return any(m["mountPath"] == "/tmp" and "emptyDir" in volumes.get(m["name"], {})
               for m in mounts)


def _container_security_problems(sc: dict[str, Any]) -> list[str]:
    problems = []
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        problems.append("capabilities: drop [ALL], add none")
    if sc.get("privileged"):
        problems.append("privileged")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
        problems.append("runs as root")
    return problems


def test_every_pod_runs_as_non_root_without_privileges() -> None:
    """The restricted Pod Security Standard, plus a read-only root filesystem (writable /tmp
    from an emptyDir; Ray keeps its session under /tmp/ray)."""
    labels = _one("Namespace")["metadata"].get("labels", {})
    for mode in ("warn", "audit"):
        assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", mode
    job = _one("RayJob")["spec"]
    assert job.get("submissionMode") != "K8sJobMode" or "submitterPodTemplate" in job, (
        "KubeRay's default submitter pod has no securityContext: give the RayJob one")
    problems = []
    for where, template in _pod_templates():
        spec = template["spec"]
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            problems.append(f"{where}: pod securityContext: runAsNonRoot true, runAsUser > 0")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod securityContext: seccompProfile RuntimeDefault")
        for c in spec["containers"] + spec.get("initContainers", []):
            problems += [f"{where}/{c['name']}: {p}"
                         for p in _container_security_problems(c.get("securityContext") or {})]
            if not _writable_tmp(spec, c.get("volumeMounts", [])):
                problems.append(f"{where}/{c['name']}: no emptyDir at /tmp")
    for kind, spec in _cluster_specs():
        if spec.get("enableInTreeAutoscaling"):
            auto = spec.get("autoscalerOptions") or {}
            problems += [f"{kind}/autoscaler: {p}"
                         for p in _container_security_problems(auto.get("securityContext") or {})]
            if not _writable_tmp(spec["headGroupSpec"]["template"]["spec"],
                                 auto.get("volumeMounts", [])):
                problems.append(f"{kind}/autoscaler: no emptyDir at /tmp")
    assert not problems, "\n".join(problems)
    assert _container_security_problems({}) == [
        "allowPrivilegeEscalation is not false", "capabilities: drop [ALL], add none",
        "readOnlyRootFilesystem is not true"]


# NetworkPolicy semantics (kubernetes.io/docs/concepts/services-networking/network-policies):
# a pod selected by any Ingress policy of its namespace accepts only what some rule of those
# policies allows; a peer with only podSelector means pods of the policy's namespace; with a
# namespaceSelector, pods of the selected namespaces (and podSelector, if also given).

def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    for key, value in ((selector or {}).get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for e in (selector or {}).get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        if {"In": not has or value not in e.get("values", []),
            "NotIn": has and value in e.get("values", []),
            "Exists": not has, "DoesNotExist": has}[e["operator"]]:
            return False
    return True


Pod = tuple[str, dict[str, str]]  # (namespace, labels)


def _peer_matches(peer: dict[str, Any], src: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" not in peer:
        return src[0] == policy_ns and _selects(peer.get("podSelector"), src[1])
    return (_selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src[0]})
            and _selects(peer.get("podSelector"), src[1]))


def _port_matches(rule_port: dict[str, Any], port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port:
        return True
    first = rule_port["port"]
    assert isinstance(first, int), f"named port {first!r}: use the number"
    return first <= port <= rule_port.get("endPort", first)


def _allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst[0]
                 and _selects(p["spec"]["podSelector"], dst[1])
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from"), rule.get("ports")
            if peers and not any(_peer_matches(peer, src, dst[0]) for peer in peers):
                continue
            if ports and not any(_port_matches(p, port) for p in ports):
                continue
            return True
    return False


def _pods() -> dict[str, Pod]:
    """The pods of the manifests with the labels they run with (KubeRay adds its own)."""
    def labels(template: dict[str, Any], **extra: str) -> dict[str, str]:
        return {**(template.get("metadata") or {}).get("labels", {}), **extra}

    def ray(spec: dict[str, Any]) -> tuple[Pod, Pod]:
        kuberay = {"ray.io/is-ray-node": "yes"}
        head = labels(spec["headGroupSpec"]["template"], **kuberay, **{"ray.io/node-type": "head"})
        worker = labels(spec["workerGroupSpecs"][0]["template"], **kuberay,
                        **{"ray.io/node-type": "worker"})
        return ("recsys", head), ("recsys", worker)

    train_head, train_worker = ray(_one("RayCluster")["spec"])
    serve_head, serve_worker = ray(_one("RayService")["spec"]["rayClusterConfig"])
    return {
        "train-head": train_head, "train-worker": train_worker,
        "serve-head": serve_head, "serve-worker": serve_worker,
        "submitter": ("recsys", labels(_one("RayJob")["spec"]["submitterPodTemplate"])),
        "mlflow": ("recsys", labels(_one("Deployment")["spec"]["template"])),
        "postgres": ("recsys", labels(_one("StatefulSet")["spec"]["template"])),
        "stranger": ("recsys", {"app": "debug-shell"}),
        "operator": (OPERATOR_NS, {"app.kubernetes.io/name": "kuberay-operator"}),
        "ingress": (INGRESS_NS, {"app.kubernetes.io/name": "ingress-nginx"}),
        "elsewhere": ("default", {"app": "ray-train"}),
    }


ALLOWED = [  # (from, to, port)
    ("train-worker", "train-head", 6379), ("train-head", "train-worker", 10002),
    ("train-worker", "train-worker", 23456), ("serve-worker", "serve-head", 6379),
    ("operator", "train-head", 8265), ("operator", "serve-head", 8265),
    ("operator", "serve-head", 8000), ("submitter", "train-head", 8265),
    ("ingress", "serve-head", 8000), ("ingress", "serve-worker", 8000),
    ("train-head", "mlflow", 5000), ("train-worker", "mlflow", 5000),
    ("serve-worker", "mlflow", 5000), ("serve-head", "mlflow", 5000),
    ("mlflow", "postgres", 5432),
]
DENIED = [
    ("serve-worker", "train-head", 6379), ("train-worker", "serve-head", 6379),
    ("stranger", "train-head", 8265), ("stranger", "train-head", 6379),
    ("stranger", "serve-head", 8000), ("stranger", "mlflow", 5000),
    ("stranger", "postgres", 5432), ("stranger", "stranger", 80),
    ("elsewhere", "train-head", 6379), ("elsewhere", "mlflow", 5000),
    ("ingress", "serve-head", 8265), ("ingress", "train-head", 8265),
    ("ingress", "mlflow", 5000), ("operator", "train-head", 6379),
    ("submitter", "train-head", 6379), ("submitter", "mlflow", 5000),
    ("train-worker", "postgres", 5432), ("serve-head", "postgres", 5432),
]


def test_network_policies_deny_by_default_and_allow_only_what_is_used() -> None:
    policies = [d for _, d in _all_docs() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {}
            and p["spec"].get("policyTypes") == ["Ingress"] and not p["spec"].get("ingress")]
    assert deny, "no default-deny ingress policy (podSelector: {}, policyTypes: [Ingress])"
    pods = _pods()
    wrong = [f"{a} -> {b}:{port} should be {'allowed' if ok else 'denied'}"
             for cases, ok in ((ALLOWED, True), (DENIED, False)) for a, b, port in cases
             if _allowed(policies, pods[a], pods[b], port) != ok]
    assert not wrong, "\n".join(wrong)
    # The evaluator itself: no policy allows all; the default deny alone denies all.
    assert _allowed([], pods["stranger"], pods["mlflow"], 5000)
    assert not _allowed(deny, pods["train-worker"], pods["train-head"], 6379)


def _load_mlflow_auth_config_module() -> ModuleType:
    """mlflow.server.auth.config without mlflow.server.auth's __init__ (which needs Flask-WTF,
    installed in the MLflow image only)."""
    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_server_runs_with_basic_auth(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.parse import urlsplit

    pod = _one("Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert "secretKeyRef" in env[name].get("valueFrom", {}), name
    backend = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--backend-store-uri="))
    assert urlsplit(backend).password is None, "the DB password goes in $PGPASSWORD"
    # The auth app's config: a ConfigMap file, no password in it (the admin's is in the Secret).
    cm_name, key = _mounted_files(pod, c, "configMap")[env["MLFLOW_AUTH_CONFIG_PATH"]["value"]]
    (cm,) = [d for _, d in _all_docs()
             if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(cm["data"][key])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    conf = _load_mlflow_auth_config_module().read_auth_config()
    assert conf.admin_password is None
    assert urlsplit(conf.database_uri).scheme == "postgresql"
    assert urlsplit(conf.database_uri).password is None
    assert conf.default_permission == "NO_PERMISSIONS"
    # Every client on the Ray pods signs in as the recsys user.
    for where, _, rc in _ray_pod_containers():
        renv = {e["name"]: e for e in rc.get("env", [])}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert renv[name]["valueFrom"]["secretKeyRef"]["name"] == MLFLOW_CLIENT_SECRET, where


def test_ray_token_auth_on_every_cluster() -> None:
    """KubeRay's authOptions makes the operator set RAY_AUTH_TOKEN from the Secret on every Ray
    container (and use it for its own dashboard calls); RAY_AUTH_MODE=token on the containers
    as well makes a cluster fail closed if an operator ignored authOptions."""
    for kind, spec in _cluster_specs():
        assert spec.get("authOptions") == {"mode": "token", "secretName": RAY_AUTH_SECRET}, kind
        major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), "Ray token authentication needs Ray 2.52"
    containers = _ray_pod_containers()
    assert {w.split("/")[1] for w, _, _ in containers} >= {"head", "cpu", "gpu"}
    for where, _, c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        assert "RAY_AUTH_TOKEN" not in env, f"{where}: KubeRay sets it from {RAY_AUTH_SECRET}"


def _documented_secrets() -> dict[str, dict[str, tuple[str, str]]]:
    """{secret: {key: (literal|file, value)}} of infra/README.md's `kubectl create secret`."""
    text = README.read_text().replace("\\\n", " ")
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for name, rest in re.findall(r"kubectl -n recsys create secret generic ([\w.-]+)(.*)", text):
        keys = out.setdefault(name, {})
        for kind, key, value in re.findall(
                r"--from-(literal|file)=([\w.-]+)=(\"[^\"]*\"|\$\([^)]*\)|\S+)", rest):
            keys[key] = (kind, value)
    return out


def _referenced_secret_keys() -> set[tuple[str, str]]:
    refs = set()
    for _, pod, c in _containers():
        refs |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                 for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        refs |= set(_mounted_files(pod, c, "secret").values())
    for _, spec in _cluster_specs():
        if (spec.get("authOptions") or {}).get("secretName"):
            refs.add((spec["authOptions"]["secretName"], "auth_token"))
    return refs


def test_every_secret_used_is_created_by_a_documented_command() -> None:
    """Secrets are created by hand from infra/README.md (random values generated on the spot),
    never committed: every Secret key a manifest uses is in those commands."""
    documented = _documented_secrets()
    missing = sorted(f"{n}/{k}" for n, k in _referenced_secret_keys()
                     if k not in documented.get(n, {}))
    assert not missing, f"used by the manifests, not created in infra/README.md: {missing}"
    for name, keys in documented.items():
        for key, (kind, value) in keys.items():
            if SECRET_NAME.search(key):
                assert kind == "file" or "$(" in value, f"{name}/{key}: a literal in the README"
    assert {(RAY_AUTH_SECRET, "auth_token"), ("recsys-api-keys", "keys"),
            ("mlflow-auth", "admin_password")} <= _referenced_secret_keys()
