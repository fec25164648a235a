"""A real multi-node run on one machine: a Ray head and a second node (each its own process
session, resources and temp dir), moto's server as S3 for Ray Train's checkpoints and MLflow's
artifacts, and the training job a user runs (``python -m jobs.pretrain`` joining the cluster
through ``RAY_ADDRESS``). Then the worker node is killed mid-run, a fresh one joins, and the run
finishes from its last checkpoint.

    .venv/bin/python -m pytest -m slow tests/integration/test_multinode.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

BUCKET = "recsys"
HEAD_RESOURCES = {"node_a": 1}
WORKER_RESOURCES = {"node_b": 1}
REPO = Path(__file__).resolve().parents[2]
EPOCH_LINE = re.compile(r"epoch\s+(\d+)\s+loss")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch):
    from recsys.cluster_local import start_local_s3

    server = start_local_s3(tmp_path_factory.mktemp("moto"), bucket=BUCKET)
    for key, value in server.env().items():
        monkeypatch_module.setenv(key, value)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def temp_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # Ray's socket paths stay short
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3, temp_root: Path) -> Iterator[dict[str, Any]]:
    """The head (2 logical CPUs, resource node_a) and a worker node (node_b); the test may
    replace the worker node, and every node started is stopped at the end."""
    from recsys.cluster_local import start_ray_node

    nodes: dict[str, Any] = {}
    try:
        nodes["head"] = start_ray_node(temp_root / "h", num_cpus=2, resources=HEAD_RESOURCES)
        nodes["worker"] = start_ray_node(temp_root / "w1", address=nodes["head"].address,
                                         num_cpus=2, resources=WORKER_RESOURCES)
        nodes["all"] = [nodes["head"], nodes["worker"]]
        yield nodes
    finally:
        for node in reversed(nodes.get("all", list(nodes.values()))):
            node.stop()


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory: pytest.TempPathFactory):
    from recsys.tracking.server import LocalMlflowServer

    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow"),
                               artifacts_destination=f"s3://{BUCKET}/mlflow").start()
    yield server
    server.stop()


def _config(tmp_path: Path, es: Any, name: str, epochs: int, **extra: Any) -> Path:
    cfg = {
        "name": name,
        "data": {"examples": str(es.path), "sequences": {"max_seq_len": 20},
                 "text": es.manifest.config.text.model_dump(mode="json")},
        "train_platforms": ["shop_a", "shop_b"],
        "model": {"dim": 16, "num_layers": 1, "num_heads": 2, "num_experts": 2},
        "optim": {"epochs": epochs, "micro_batch_size": 128,
                  "early_stopping_patience": 100},
        "encoder": {"cache_dir": str(tmp_path / "cache")},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5,
                    "placement_strategy": "STRICT_SPREAD", "max_failures": 2},
        "output_dir": f"s3://{BUCKET}/ray",
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job(config: Path, head: Any, tmp_path: Path, mlflow_uri: str | None,
         log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "token",
           "RECSYS_WORK_DIR": str(tmp_path / "work")}
    if mlflow_uri:
        env["RECSYS_MLFLOW_TRACKING_URI"] = mlflow_uri
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "jobs.pretrain", "--config", str(config)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO,
                                start_new_session=True)


def _wait(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-5000:]
    return text


def _train_workers(head: Any) -> list[Any]:
    """Every Ray Train worker actor the cluster has seen (alive or dead), with its node."""
    from ray.util.state import list_actors

    return list_actors(address=head.dashboard_url, detail=True, limit=10_000,
                       filters=[("class_name", "=", "RayTrainWorker")],
                       raise_on_missing_output=False)


def test_two_nodes_s3_checkpoints_and_mlflow_artifacts(cluster, s3, tracking, synthetic_examples,
                                                      tmp_path: Path) -> None:
    head, worker = cluster["head"], cluster["worker"]
    config = _config(tmp_path, synthetic_examples, "two-node", epochs=2,
                     tracking={"enabled": True, "experiment": "multinode"})
    log = tmp_path / "job.log"
    text = _wait(_job(config, head, tmp_path, tracking.uri, log), log, timeout=600)
    assert [int(e) for e in EPOCH_LINE.findall(text)] == [0, 1], text[-3000:]

    # One training worker on each node (STRICT_SPREAD over the two nodes).
    nodes = {a.node_id for a in _train_workers(head)}
    assert nodes == {head.node_id, worker.node_id}, nodes

    # Ray Train's run storage and checkpoints are in the bucket, not on a local disk.
    keys = s3.keys("ray/two-node/")
    assert any("/checkpoint_" in k for k in keys), keys[:20]
    assert "ray/two-node/resume_config.json" in keys
    assert not (REPO / "s3:").exists()  # no local path made of the URI
    export = tmp_path / "work" / "train" / "two-node" / "export" / "export.json"
    assert json.loads(export.read_text())["platforms"] == ["shop_a", "shop_b"]

    # The MLflow run's artifacts (report, logged model) went to s3://recsys/mlflow.
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", text).group(1)
    mlflow_keys = s3.keys("mlflow/")
    assert any(run_id in k and "/report/" in k for k in mlflow_keys), mlflow_keys[:20]
    assert any("/models/" in k for k in mlflow_keys), mlflow_keys[:20]
    from mlflow import MlflowClient

    names = {a.path for a in MlflowClient(tracking.uri).list_artifacts(run_id)}
    assert "report" in names, names


def test_resume_after_losing_the_worker_node(cluster, s3, synthetic_examples,
                                             temp_root: Path, tmp_path: Path) -> None:
    from recsys.cluster_local import start_ray_node

    head, worker = cluster["head"], cluster["worker"]
    before = {a.actor_id for a in _train_workers(head)}
    name, epochs = "two-node-resume", 6
    config = _config(tmp_path, synthetic_examples, name, epochs=epochs,
                     tracking={"enabled": False},
                     # Re-read each epoch: no dataset blocks held in the lost node's store.
                     materialize_datasets=False)
    log = tmp_path / "job.log"
    started = time.monotonic()
    job = _job(config, head, tmp_path, None, log)
    try:
        # Rank 0 prints epoch k's line before saving its checkpoint: once epoch 1's line is
        # out, epoch 0's checkpoint is in S3 and reported.
        deadline = time.monotonic() + 300
        while 1 not in [int(e) for e in EPOCH_LINE.findall(log.read_text(errors="replace"))]:
            assert job.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "epoch 1 not done after 300 s"
            time.sleep(0.5)
        assert any("/checkpoint_" in k for k in s3.keys(f"ray/{name}/"))
        running = [a for a in _train_workers(head)
                   if a.actor_id not in before and a.state == "ALIVE"]
        assert {a.node_id for a in running} == {head.node_id, worker.node_id}, running
        seen_before_kill = [int(e) for e in EPOCH_LINE.findall(log.read_text(errors="replace"))]
        killed_at = time.monotonic()
        killed = worker.kill()
        assert killed.stopped and not killed.failed, killed.lines()
        fresh = start_ray_node(temp_root / "w2", address=head.address, num_cpus=2,
                               resources=WORKER_RESOURCES)
        cluster["all"].append(fresh)
        joined_at = time.monotonic()
        text = _wait(job, log, timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)
    epochs_seen = [int(e) for e in EPOCH_LINE.findall(text)]
    print(f"epochs before the kill {seen_before_kill}; all {epochs_seen}; kill: "
          f"{killed.lines()[0]}; killed at {killed_at - started:.0f} s, fresh node joined "
          f"{joined_at - killed_at:.0f} s later, job done {time.monotonic() - joined_at:.0f} s "
          "after that")
    print("\n".join(line[:300] for line in text.splitlines()
                    if re.search(r"fail|restart|resum|error|epoch", line, re.I))[-6000:])
    assert epochs_seen[-1] == epochs - 1, text[-3000:]
    # Resumed from the checkpoint: no epoch restarted at 0, and none trained twice except the
    # one in flight when the node died (its checkpoint may not have been reported).
    assert epochs_seen.count(0) == 1, epochs_seen
    assert len(epochs_seen) - len(set(epochs_seen)) <= 1, epochs_seen
    assert sorted(set(epochs_seen)) == list(range(epochs)), epochs_seen

    # The worker group was restarted (new actors), the new one spread over the head and the
    # fresh node, and the lost node is dead in the cluster's view.
    from ray.util.state import list_nodes

    first = {a.actor_id for a in running}
    restarted = [a for a in _train_workers(head)
                 if a.actor_id not in before and a.actor_id not in first]
    assert {a.node_id for a in restarted} == {head.node_id, fresh.node_id}, \
        [(a.state, a.node_id) for a in restarted]
    states = {n.node_id: n.state for n in list_nodes(address=head.dashboard_url, detail=True,
                                                        raise_on_missing_output=False)}
    assert states.get(worker.node_id) == "DEAD" and states.get(fresh.node_id) == "ALIVE", states
