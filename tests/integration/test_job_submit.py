"""`ray job submit` against a `ray start --head` cluster on 127.0.0.1, as a user runs a job.

The head runs with ``--block`` in its own process group: stopping it stops only this cluster
(``ray stop`` would kill every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("head") / "head.log"
    dash = _free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(_free_port()), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(_free_port()),
           # Every agent port explicit: a second cluster on the machine (the test session's own)
           # holds the defaults, and a job agent that cannot bind takes no jobs.
           "--dashboard-agent-listen-port", str(_free_port()),
           "--dashboard-agent-grpc-port", str(_free_port()),
           "--runtime-env-agent-port", str(_free_port()),
           "--metrics-export-port", str(_free_port()),
           "--num-cpus", "2", "--disable-usage-stats"]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while time.time() < deadline:
        ok = subprocess.run([RAY, "job", "list", "--address", address], env=_env(),
                            capture_output=True, text=True, timeout=60).returncode == 0
        if ok:
            break
        if proc.poll() is not None:
            pytest.fail(f"ray start exited early:\n{log.read_text()[-3000:]}")
        time.sleep(3)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"Ray head not ready in 180 s:\n{log.read_text()[-3000:]}")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the ray start process stops its cluster
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _submit_and_wait(head: str, monkeypatch: pytest.MonkeyPatch, *entrypoint: str) -> str:
    """``ray job submit --working-dir <repo>`` of ``python -m <entrypoint>``, waited for; checks
    that ``ray job status`` says it succeeded and returns what ``ray job logs`` prints."""
    cmd = [RAY, "job", "submit", "--address", head, "--working-dir", str(REPO), "--no-wait",
           "--", sys.executable, "-m", *entrypoint]
    deadline = time.time() + 180
    while True:  # the head's job agent starts some seconds after the dashboard answers
        submit = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr \
                or time.time() > deadline:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout + submit.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the SDK client authenticates like the CLI
    client = JobSubmissionClient(head)
    deadline = time.time() + 900
    while time.time() < deadline and not client.get_job_status(job_id).is_terminal():
        time.sleep(5)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    r = subprocess.run([RAY, "job", "status", "--address", head, job_id], env=_env(),
                       capture_output=True, text=True, timeout=60)
    status = (r.stdout + r.stderr).lower()  # "Job '...' succeeded", through the CLI's logger
    r = subprocess.run([RAY, "job", "logs", "--address", head, job_id], env=_env(),
                       capture_output=True, text=True, timeout=120)
    logs = r.stdout + r.stderr
    assert "succeeded" in status, f"{status}\n{logs[-4000:]}"
    return logs


def test_pretrain_job_via_ray_job_submit(head: str, synthetic_examples, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {
        "name": "submitted",
        "data": {"examples": str(synthetic_examples.path), "sequences": {"max_seq_len": 20},
                 "text": synthetic_examples.manifest.config.text.model_dump(mode="json")},
        "train_platforms": ["shop_a", "shop_b"],
        "model": {"dim": 16, "num_layers": 1, "num_heads": 2, "num_experts": 2},
        "optim": {"epochs": 1, "micro_batch_size": 128},
        "encoder": {"cache_dir": str(tmp_path / "cache")},
        "tracking": {"enabled": False},
        "output_dir": str(tmp_path / "runs"),
    }
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(cfg))
    logs = _submit_and_wait(head, monkeypatch, "jobs.pretrain", "--config", str(config),
                            "optim.lr=0.003")
    assert "epoch   0" in logs
    assert "best valid NDCG@10" in logs
    export = tmp_path / "runs" / "submitted" / "export" / "export.json"
    assert json.loads(export.read_text())["platforms"] == ["shop_a", "shop_b"]


def test_pipeline_job_via_ray_job_submit(head: str, synthetic_examples, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-pipeline job as a cluster user submits it (here: its pretrain stage)."""
    es = synthetic_examples
    cfg = {
        "name": "submitted-pipeline",
        "work_dir": str(tmp_path / "work"),
        "stages": ["pretrain"],
        "tracking": False,
        "data": {"lake": str(Path(es.path).parent / "lake"), "examples": str(es.path),
                 "sequences": {"max_seq_len": 20, "collapse_repeats": True},
                 "text": es.manifest.config.text.model_dump(mode="json")},
        "pretrain": {"platforms": ["shop_a", "shop_b"], "overrides": {
            "model.dim": 16, "model.num_layers": 1, "model.num_heads": 2,
            "model.num_experts": 2, "optim.epochs": 1, "optim.micro_batch_size": 128,
            "encoder.cache_dir": str(tmp_path / "cache")}},
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(cfg))
    logs = _submit_and_wait(head, monkeypatch, "jobs.pipeline", "--config", str(config))
    assert "=== [1/1] pretrain" in logs and "epoch   0" in logs, logs[-4000:]
    state = json.loads((tmp_path / "work" / "pipeline" / "state.json").read_text())
    export = Path(state["pretrain"]["outputs"]["export"])
    assert json.loads((export / "export.json").read_text())["platforms"] == ["shop_a", "shop_b"]
