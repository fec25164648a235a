"""A real multi-node run on one machine: a Ray head and a second node (each its own process
session, resources and temp dir), moto's server as S3 for Ray Train's checkpoints and MLflow's
artifacts. First the pipeline a user runs (``python -m jobs.pipeline`` joining the cluster
through ``RAY_ADDRESS``, ``RECSYS_STORAGE_PATH`` in the bucket): ingest, examples, pretrain
spread over both nodes, transfer, evaluate, register. Then a training job whose worker node is
killed mid-run: a fresh node joins, and the run finishes from its last checkpoint.

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


def _job(args: list[str], head: Any, tmp_path: Path, log: Path,
         **env_extra: str) -> subprocess.Popen[bytes]:
    """``python -m <args>`` joining the cluster, its state under ``tmp_path``."""
    env = {**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "token",
           "RECSYS_WORK_DIR": str(tmp_path / "work"), **env_extra}
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO,
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


def _pipeline_overrides(tmp_path: Path, encoder: str, name: str) -> list[str]:
    """The demo pipeline, small: a fifth of the synthetic scale, the tiny encoder, a small
    model, two epochs of pretraining spread one worker per node, one transfer strategy and no
    scratch baseline, no sweep and no deploy; every path in ``tmp_path``."""
    cache = str(tmp_path / "cache")
    pretrain = {"optim.epochs": 2, "optim.micro_batch_size": 128,
                "optim.early_stopping_patience": 100, "encoder.cache_dir": cache,
                "model.dim": 16, "model.num_layers": 1, "model.num_heads": 2,
                "model.num_experts": 2, "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5,
                "scaling.placement_strategy": "STRICT_SPREAD", "scaling.max_failures": 1}
    transfer = {"optim.epochs": 1, "optim.micro_batch_size": 128, "encoder.cache_dir": cache,
                "scaling.num_workers": 1, "scaling.cpus_per_worker": 1}
    ingest = [{"source": "synthetic", "num_platforms": 3, "scale": 0.2, "seed": 11}]
    values: dict[str, Any] = {
        "name": name, "work_dir": str(tmp_path / "pipe"),
        "stages": ["ingest", "examples", "pretrain", "transfer", "evaluate", "register"],
        "ingest": ingest, "data.lake": str(tmp_path / "lake"),
        "data.examples": str(tmp_path / "examples"), "data.sequences.max_seq_len": 20,
        "data.text.encoder": encoder, "data.text.max_tokens": 32,
        "pretrain.overrides": pretrain, "transfer.overrides": transfer,
        "transfer.strategies": ["freeze_encoder"], "transfer.scratch_config": None}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def test_pipeline_on_two_nodes_with_s3_storage(cluster, s3, tracking, tiny_encoder: str,
                                              ray_cluster, tmp_path: Path) -> None:
    """``ray_cluster``: Ray initialised in this process as the tests' clusters are (token auth),
    which the state API (``_train_workers``) needs."""
    from mlflow import MlflowClient

    head, worker = cluster["head"], cluster["worker"]
    name = "multinode"
    log = tmp_path / "pipeline.log"
    args = ["jobs.pipeline", "--config", "configs/pipeline/demo.yaml",
            *_pipeline_overrides(tmp_path, tiny_encoder, name)]
    text = _wait(_job(args, head, tmp_path, log, RECSYS_STORAGE_PATH=f"s3://{BUCKET}/ray",
                      RECSYS_MLFLOW_TRACKING_URI=tracking.uri), log, timeout=900)
    assert f"pipeline {name}: done" in text, text[-3000:]

    # The pretrain run's workers (the only worker group of two) were one on each node.
    groups: dict[Any, set[str]] = {}
    for actor in _train_workers(head):
        groups.setdefault(actor.placement_group_id, set()).add(actor.node_id)
    assert None not in groups and {head.node_id, worker.node_id} in groups.values(), groups

    # Ray Train's storage of the training stages: RECSYS_STORAGE_PATH/<pipeline>/train.
    prefix = f"ray/{name}/train/"
    keys = s3.keys(prefix)
    for run in ("pretrain", "transfer-freeze_encoder-shop_c"):
        assert any(k.startswith(f"{prefix}{run}/checkpoint_") for k in keys), (run, keys[:30])
        assert f"{prefix}{run}/resume_config.json" in keys, (run, keys[:30])
    assert not (REPO / "s3:").exists()  # no local path made of the URI
    # The exports are local (under RECSYS_WORK_DIR), and the later stages read them there.
    local = tmp_path / "work" / "train" / "s3" / BUCKET / prefix  # the bucket's mirror
    export = local / "pretrain" / "export" / "export.json"
    assert json.loads(export.read_text())["platforms"] == ["shop_a", "shop_b"]
    assert (local / "transfer-freeze_encoder-shop_c" / "export" / "export.json").is_file()

    # Both training runs logged to the test's MLflow server, their artifacts in the bucket.
    client = MlflowClient(tracking.uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = {r.info.run_name: r.info.run_id
            for r in client.search_runs([experiment.experiment_id])}
    assert {"pretrain", "transfer-freeze_encoder-shop_c"} <= set(runs), runs
    mlflow_keys = s3.keys("mlflow/")
    for run_name, run_id in runs.items():
        assert any(run_id in k and "/report/" in k for k in mlflow_keys), (run_name,
                                                                          mlflow_keys[:20])
    assert any("/models/" in k for k in mlflow_keys), mlflow_keys[:20]

    # The register stage registered the transfer run (the one candidate) as shop_c's model.
    versions = client.search_model_versions("name='recsys-shop_c'")
    assert [v.tags.get("pipeline") for v in versions] == [name], versions
    assert versions[0].run_id == runs["transfer-freeze_encoder-shop_c"], versions[0]


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
    job = _job(["jobs.pretrain", "--config", str(config)], head, tmp_path, log)
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
