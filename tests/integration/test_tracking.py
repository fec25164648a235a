"""The MLflow layer against a real local server: runs, models, registry, detached server reuse."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from recsys.settings import Settings
from recsys.tracking import registry, runs
from recsys.tracking.server import (
    SERVER_JSON,
    LocalMlflowServer,
    ensure_experiment,
    ensure_tracking,
    health_ok,
    read_detached,
    stop_detached,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _quiet_mlflow() -> Iterator[None]:
    """No per-file download bars in the test log (module scope: the model fixture downloads)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield


def _port_free(port: int) -> bool:
    """A new server could listen on ``port``. SO_REUSEADDR as servers set it: the closed server's
    connections may sit in TIME_WAIT for a minute, which is not "still bound"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMlflowServer]:
    srv = LocalMlflowServer(tmp_path_factory.mktemp("mlflow"))
    started = time.monotonic()
    srv.start()
    print(f"\nMLflow server ready in {time.monotonic() - started:.1f} s, "
          f"RSS {srv.rss_bytes() / 2**20:.0f} MiB")
    pid, port = srv.pid, srv.port
    assert pid is not None and port is not None
    yield srv
    srv.stop()
    assert _gone(pid), "server process still running after stop()"
    assert _port_free(port), f"port {port} still bound after stop()"


@pytest.fixture(scope="module")
def uri(server: LocalMlflowServer) -> str:
    return server.uri


def test_health_on_loopback(server: LocalMlflowServer) -> None:
    assert server.uri.startswith("http://127.0.0.1:")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{server.uri}/health", timeout=5) as response:
        assert response.status == 200
        assert response.read().strip() == b"OK"
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port}
    assert listening == {"127.0.0.1"}
    # SQLite schema created before the server started, artifacts proxied under the root.
    assert (server.root / "mlflow.db").exists()
    assert 0 < server.rss_bytes() < 2 * 2**30


def test_ensure_experiment_is_idempotent(uri: str) -> None:
    first = ensure_experiment(uri, "idempotent")
    assert ensure_experiment(uri, "idempotent") == first
    assert MlflowClient(uri).get_experiment(first).artifact_location.startswith(
        "mlflow-artifacts:/")


def test_experiments_open_on_training_runs(uri: str) -> None:
    """Tagged as the MLflow 3 UI's "Machine learning" kind; an old untagged one gets the tag;
    the printed link opens the runs in the machine-learning view."""
    from recsys.tracking.server import EXPERIMENT_KIND_TAG, TRAINING_KIND, experiment_url

    c = MlflowClient(uri)
    new = ensure_experiment(uri, "ml-kind")
    assert c.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    old = c.create_experiment("ml-kind-old")
    assert ensure_experiment(uri, "ml-kind-old") == old
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    c.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")  # a person's choice
    ensure_experiment(uri, "ml-kind-old")
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert experiment_url(uri, new).endswith(f"/#/experiments/{new}/runs"
                                             "?workflowType=machine_learning")


def test_run_logs_config_metrics_system_and_artifacts(uri: str, tmp_path: Path) -> None:
    run_id = runs.start_run(uri, "unit", "r1", tags={"mode": "pretrain"})
    config = {"name": "r1", "train": {"lr": 3e-4, "epochs": 3}, "data": {"platforms": ["a", "b"]},
              "note": "x" * 7000, "empty": {}}
    runs.log_config(uri, run_id, config)
    for step in range(4):
        runs.log_metrics(uri, run_id, {"loss": 1.0 / (step + 1), "ndcg@10": 0.1 * step}, step=step)
    with pytest.raises(ValueError, match="same MLflow key"):
        runs.log_metrics(uri, run_id, {"hr@10": 1.0, "hr_at_10": 1.0}, step=0)
    info = runs.log_system_info(uri, run_id)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.txt").write_text("1 0.5")
    (tmp_path / "report.json").write_text("{}")
    runs.log_artifacts(uri, run_id, tmp_path / "plots", "plots")
    runs.log_artifacts(uri, run_id, tmp_path / "report.json")
    runs.end_run(uri, run_id, "FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    params = run.data.params
    assert params["train.lr"] == "0.0003" and params["train.epochs"] == "3"
    assert json.loads(params["data.platforms"]) == ["a", "b"]
    assert len(params["note"]) == 6000 and params["note"].endswith("[truncated]")
    assert params["empty"] == "{}"
    assert run.data.tags["mode"] == "pretrain"
    assert run.data.tags["sys.python"] == info["sys.python"]
    assert run.data.tags["sys.torch"] == info["sys.torch"] != "not installed"
    assert {"sys.ray", "sys.hostname", "sys.cpu_count", "sys.gpu"} <= set(run.data.tags)
    history = client.get_metric_history(run_id, "ndcg_at_10")  # "@" is not allowed in MLflow
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2, 3]
    assert len(client.get_metric_history(run_id, "loss")) == 4
    assert run.data.metrics["loss"] == pytest.approx(0.25)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"config.json", "plots", "report.json"}
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss.txt"]
    logged = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path)))
                        .read_text())
    assert logged["note"] == "x" * 7000  # the full value, which the param could not hold


def test_nested_run_and_bad_status(uri: str) -> None:
    parent = runs.start_run(uri, "unit", "sweep")
    child = runs.start_run(uri, "unit", "trial-0", parent_run_id=parent)
    assert MlflowClient(uri).get_run(child).data.tags["mlflow.parentRunId"] == parent
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        runs.end_run(uri, child, "DONE")
    runs.end_run(uri, child, "KILLED")
    runs.end_run(uri, parent, "FAILED")
    assert MlflowClient(uri).get_run(child).info.status == "KILLED"


def test_tracked_run_ends_finished_or_failed(uri: str) -> None:
    with runs.tracked_run(uri, "unit", "works") as ok:
        runs.log_metrics(uri, ok.run_id, {"loss": 1.0}, step=0)
    with pytest.raises(RuntimeError, match="after fit"):
        with runs.tracked_run(uri, "unit", "fails") as bad:
            raise RuntimeError("after fit")
    client = MlflowClient(uri)
    assert client.get_run(ok.run_id).info.status == "FINISHED"
    assert client.get_run(bad.run_id).info.status == "FAILED"


def test_a_training_job_that_fails_after_fit_ends_its_run_failed(
        uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_training``: fit succeeds, the export step raises; the run must not stay RUNNING."""
    from types import SimpleNamespace

    import recsys.tracking.server as server_module
    import recsys.training.run as run_module
    from recsys.training.config import TrainJobConfig

    fitted = SimpleNamespace(metrics={}, best_checkpoints=[], checkpoint=None, error=None)
    monkeypatch.setattr(server_module, "ensure_tracking", lambda settings: uri)
    monkeypatch.setattr(run_module, "prepare", lambda cfg: SimpleNamespace(
        train_platforms=["a"], eval_platforms=["a"], inputs=SimpleNamespace(cache_stats={})))
    monkeypatch.setattr(run_module, "build_trainer",
                        lambda cfg, setup, run: SimpleNamespace(fit=lambda: fitted))
    cfg = TrainJobConfig.model_validate({
        "name": "fails-after-fit", "resume": True, "output_dir": str(tmp_path),
        "tracking": {"experiment": "after-fit", "enabled": True}})
    with pytest.raises(RuntimeError, match="reported no checkpoint"):
        run_module.run_training(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("after-fit")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "fails-after-fit" and run.info.status == "FAILED"


DOUBLER = """
from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class Doubler(mlflow.pyfunc.PythonModel):
    \"\"\"Multiplies by a factor read from an artifact file, as a model reads its weights.\"\"\"

    def load_context(self, context):
        self.factor = float(Path(context.artifacts["factor"]).read_text())

    def predict(self, context, model_input, params=None):
        return model_input * self.factor


mlflow.models.set_model(Doubler())
"""


@pytest.fixture(scope="module")
def doubler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models-from-code file: what ``log_pyfunc_model`` logs instead of a pickled object."""
    path = tmp_path_factory.mktemp("code") / "doubler.py"
    path.write_text(DOUBLER)
    return path


@pytest.fixture(scope="module")
def logged_model(uri: str, doubler: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    factor = tmp_path_factory.mktemp("model") / "factor.txt"
    factor.write_text("2")
    run_id = runs.start_run(uri, "models", "with-model")
    runs.log_metrics(uri, run_id, {"ndcg@10": 0.3}, step=0)
    model_uri = runs.log_pyfunc_model(
        uri, run_id, doubler, {"factor": str(factor)}, pip_requirements=["mlflow", "pandas"],
        input_example=pd.DataFrame({"x": [1.0, 2.0]}))
    return run_id, model_uri


def test_pyfunc_model_logs_and_loads(uri: str, logged_model: tuple[str, str]) -> None:
    run_id, model_uri = logged_model
    assert model_uri.startswith("models:/m-")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING", "logging the model must not end the run"
    model_id = model_uri.removeprefix("models:/")
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    model = client.get_logged_model(model_id)
    assert model.experiment_id == run.info.experiment_id and model.status == "READY"
    frame = pd.DataFrame({"x": [1.0, 3.0]})
    mlflow.set_tracking_uri(uri)  # load_model resolves runs:/ and models:/ via the global URI
    try:
        for source in (f"runs:/{run_id}/model", model_uri):
            predicted = mlflow.pyfunc.load_model(source).predict(frame)
            assert predicted["x"].tolist() == [2.0, 6.0], source
    finally:
        mlflow.set_tracking_uri(None)
    runs.end_run(uri, run_id)


def test_failed_model_log_marks_the_model_failed(uri: str, doubler: Path,
                                                 tmp_path: Path) -> None:
    run_id = runs.start_run(uri, "models", "bad-model")
    with pytest.raises(Exception, match="missing.txt"):
        runs.log_pyfunc_model(uri, run_id, doubler, {"factor": str(tmp_path / "missing.txt")},
                              pip_requirements=["mlflow"])
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    mine = [m for m in client.search_logged_models([experiment_id]) if m.source_run_id == run_id]
    assert [m.status for m in mine] == ["FAILED"]
    assert client.get_run(run_id).info.status == "RUNNING"
    runs.end_run(uri, run_id, "FAILED")


def test_register_and_alias(uri: str, logged_model: tuple[str, str]) -> None:
    _, model_uri = logged_model
    assert registry.alias_version(uri, "recsys-toy", "champion") is None  # no model yet
    v1 = runs.register_model(uri, model_uri, "recsys-toy", tags={"platform": "shop_a"})
    v2 = runs.register_model(uri, model_uri, "recsys-toy")
    assert (v1, v2) == ("1", "2")
    assert registry.alias_version(uri, "recsys-toy", "champion") is None  # model, no alias
    registry.set_alias(uri, "recsys-toy", "champion", v1)
    assert registry.alias_version(uri, "recsys-toy", "champion") == "1"
    assert MlflowClient(uri).get_model_version("recsys-toy", v1).tags == {"platform": "shop_a"}
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/recsys-toy@champion")
        assert model.predict(pd.DataFrame({"x": [5.0]}))["x"].tolist() == [10.0]
    finally:
        mlflow.set_tracking_uri(None)
    registry.set_alias(uri, "recsys-toy", "champion", v2)
    assert registry.alias_version(uri, "recsys-toy", "champion") == "2"


def test_ensure_tracking_keeps_configured_uri(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    for configured in ("http://mlflow.example:5000", "databricks", "sqlite:///mlflow.db"):
        monkeypatch.setenv("RECSYS_MLFLOW_TRACKING_URI", configured)
        settings = Settings(work_dir=str(tmp_path))
        assert ensure_tracking(settings) == configured
    assert not (tmp_path / "mlflow").exists(), "no local server when a URI is configured"


def test_detached_server_outlives_its_job_and_is_reused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_MLFLOW_TRACKING_URI"}
    env["RECSYS_WORK_DIR"] = str(work)
    job = ("from recsys.settings import get_settings; from recsys.tracking import ensure_tracking;"
           " print(ensure_tracking(get_settings()))")
    done = subprocess.run([sys.executable, "-c", job], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    uri = done.stdout.strip().splitlines()[-1]
    info = read_detached(work / "mlflow")
    try:
        # The job process has exited; its server still answers, in a session of its own.
        assert info is not None and info["uri"] == uri and uri.startswith("http://127.0.0.1:")
        assert health_ok(uri)
        assert os.getsid(int(info["pid"])) != os.getsid(0)
        settings = Settings(work_dir=str(work), mlflow_tracking_uri=None)
        started = time.monotonic()
        assert ensure_tracking(settings) == uri  # reused, not restarted
        assert time.monotonic() - started < 5
        assert ensure_experiment(uri, "detached") == ensure_experiment(uri, "detached")
    finally:
        stopped = stop_detached(work / "mlflow")
    assert stopped
    assert _gone(int(info["pid"]))
    assert not health_ok(uri)
    assert not (work / "mlflow" / SERVER_JSON).exists()
    assert stop_detached(work / "mlflow") is False  # nothing left to stop
