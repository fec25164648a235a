"""What a training run records in MLflow, as stateless helpers keyed by ``(uri, run_id)``.

Why not ``mlflow.start_run()``: fluent MLflow keeps the active run and tracking URI in process
globals, which Ray workers and concurrent Tune trials would share or lose when pickled. Here the
driver creates the run, ships ``{"uri", "run_id"}`` in the train loop config, and rank 0 calls
these functions; every call names its server and run, so nothing depends on who called before.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from recsys.tracking.metric_names import mlflow_keys, warn_unknown
from recsys.tracking.server import ensure_experiment

log = logging.getLogger(__name__)

TRUNCATION_MARK = "...[truncated]"
SYSTEM_PACKAGES = ("torch", "ray", "transformers", "deepspeed", "mlflow", "numpy", "pyarrow")


def client(uri: str) -> MlflowClient:
    """A client bound to ``uri`` (cheap: no connection until the first request)."""
    return MlflowClient(tracking_uri=uri)


# --- runs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRef:
    """A run on a server: what the driver ships to rank 0 so that it can log epochs."""

    uri: str
    run_id: str


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str,
                tags: Mapping[str, Any] | None = None,
                parent_run_id: str | None = None) -> Iterator[RunRef]:
    """``start_run`` ... ``end_run`` as a block: FINISHED when it completes, FAILED when it
    raises (KILLED on Ctrl-C), so that no failure leaves the run RUNNING in the UI."""
    run = RunRef(uri, start_run(uri, experiment, run_name, tags, parent_run_id))
    try:
        yield run
    except KeyboardInterrupt:
        end_run(uri, run.run_id, "KILLED")
        raise
    except BaseException:
        end_run(uri, run.run_id, "FAILED")
        raise
    end_run(uri, run.run_id, "FINISHED")


def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a run in experiment ``experiment`` (a name; created if missing) and return its id.

    Adds MLflow's usual context tags (user, source, git commit) that ``MlflowClient.create_run``
    alone would leave out; ``parent_run_id`` nests it (a Tune trial under its sweep).
    """
    from mlflow.tracking.context.registry import resolve_tags

    experiment_id = ensure_experiment(uri, experiment)
    all_tags = resolve_tags({k: str(v) for k, v in (tags or {}).items()})
    if parent_run_id is not None:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client(uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    return str(run.info.run_id)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED (the UI shows RUNNING forever otherwise)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    client(uri).set_terminated(run_id, status=status)


# --- params, metrics, artifacts ----------------------------------------------------------------


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists stay leaves (one param each)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _mlflow_keys(names: list[str]) -> dict[str, str]:
    """``mlflow_key`` for each name (``recsys.tracking.metric_names``: the one mapping)."""
    return mlflow_keys(names)


def _as_text(value: Any, limit: int) -> str:
    """A param/tag value MLflow accepts: JSON for containers, cut to ``limit`` with a visible mark
    (the full value is in ``config.json``)."""
    text = json.dumps(value, default=str) if isinstance(value, list | tuple | dict) else str(value)
    if len(text) > limit:
        text = text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return text


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def log_config(uri: str, run_id: str, config: Mapping[str, Any]) -> None:
    """The resolved job config: dotted params to compare runs in the UI, ``config.json`` to rerun.

    MLflow params are immutable: logging a different value under the same key to the same run
    raises, which is what should happen if a resumed run was given another config.
    """
    c = client(uri)
    flat = flatten(config)
    keys = _mlflow_keys(list(flat))
    params = [Param(keys[k], _as_text(v, MAX_PARAM_VAL_LENGTH)) for k, v in flat.items()]
    for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        c.log_batch(run_id, params=batch)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        c.log_artifact(run_id, str(path))


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Params computed during a run (a private run's noise multiplier, delta, sample rate).
    Logging a key again with the same value is a no-op; another value raises, as MLflow does."""
    keys = _mlflow_keys(list(params))
    entries = [Param(keys[k], _as_text(v, MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
    c = client(uri)
    for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        c.log_batch(run_id, params=batch)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int,
                model_id: str | None = None) -> None:
    """One step's metrics in one request (per-metric calls cost a round trip each). Names go
    through ``mlflow_key``: ``valid_ndcg@10`` is stored as ``valid_ndcg_at_10``. ``model_id``:
    the metrics also belong to that logged model (its page shows them)."""
    now = int(time.time() * 1000)
    keys = _mlflow_keys(list(metrics))
    warn_unknown(keys.values())
    entries = [Metric(keys[k], float(v), now, int(step), model_id=model_id)
               for k, v in metrics.items()]
    c = client(uri)
    for batch in _chunks(entries, MAX_METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=batch)


def system_info() -> dict[str, str]:
    """Versions and hardware that explain a run's speed or a failure to reproduce it."""
    info = {"sys.python": platform.python_version(), "sys.platform": platform.platform(),
            "sys.hostname": socket.gethostname(), "sys.cpu_count": str(os.cpu_count())}
    for package in SYSTEM_PACKAGES:
        try:
            info[f"sys.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[f"sys.{package}"] = "not installed"
    try:
        import torch
    except ImportError:
        log.info("torch not importable: no GPU info in system tags")
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        info["sys.gpu_count"] = str(count)
        info["sys.gpu"] = torch.cuda.get_device_name(0) if count else "none"
        info["sys.cuda"] = str(torch.version.cuda)
    return info


def log_system_info(uri: str, run_id: str) -> dict[str, str]:
    """``system_info()`` as ``sys.*`` tags, returned too. Tags rather than params because a run
    resumed on another host must be able to overwrite them."""
    info = system_info()
    tags = [RunTag(k, _as_text(v, MAX_TAG_VAL_LENGTH)) for k, v in info.items()]
    client(uri).log_batch(run_id, tags=tags)
    return info


def log_artifacts(uri: str, run_id: str, path: str | Path,
                  artifact_path: str | None = None) -> None:
    """Upload a file or a directory's contents under ``artifact_path`` in the run."""
    path = Path(path)
    c = client(uri)
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        c.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"no file or directory to log at {path}")


# --- models and the registry -------------------------------------------------------------------

# MLflow's model logging and registration read the process-wide tracking URI; it is swapped only for
# the duration of one call, under a lock so that two threads cannot interleave their swaps.
_URI_LOCK = threading.Lock()


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    # Private helper, but the only way to restore "unset" (get_tracking_uri() returns a default).
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _URI_LOCK, _use_tracking_uri(uri):
        yield


def log_pyfunc_model(uri: str, run_id: str, model_code: str | Path,
                     artifacts: Mapping[str, str], name: str = "model",
                     pip_requirements: list[str] | None = None, input_example: Any = None,
                     signature: Any = None, step: int = 0) -> str:
    """Log a pyfunc model from code to the run and return its ``models:/<model_id>`` URI.

    ``model_code`` is a Python file that calls ``mlflow.models.set_model(...)`` (MLflow's
    models-from-code): a loaded version runs that file, never unpickles an object, so a registry
    write cannot smuggle code into a serving replica. ``runs:/<run_id>/<name>`` resolves to the
    same model. ``artifacts`` are local files or dirs the model reads in ``load_context``;
    ``pip_requirements=None`` lets MLflow infer them (slow: it loads the model in a subprocess).

    Why not ``with mlflow.start_run(run_id): mlflow.pyfunc.log_model(...)``: leaving that block
    ends the run (FINISHED) while training may still be logging. Without an active run, MLflow 3
    files the LoggedModel under the default experiment "0" even when given the run id. So the
    LoggedModel is created here in the run's experiment and ``Model.log`` attaches it to the run.
    """
    import mlflow.pyfunc
    from mlflow.models import Model

    if not isinstance(model_code, str | Path) or not Path(model_code).is_file():
        raise TypeError(f"model_code must be a models-from-code Python file, not "
                        f"{model_code!r}: a pickled Python object is never logged")
    c = client(uri)
    run = c.get_run(run_id)
    logged = c.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
        params=dict(run.data.params))
    try:
        with _process_tracking_uri(uri):
            info = Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=logged.model_id, step=step, python_model=str(model_code),
                artifacts=dict(artifacts), pip_requirements=pip_requirements,
                input_example=input_example, signature=signature)
    except BaseException:
        # Leave no PENDING model behind that looks like it might still finish uploading.
        c.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return str(info.model_uri)


def log_recommender(uri: str, run_id: str, export: Path, name: str = "model",
                    pip_requirements: list[str] | None = None, step: int | None = None) -> str:
    """Log an export as the recommender pyfunc (``recsys.model.pyfunc``): from code, with its
    signature and an input example taken from the export.

    ``step``: the epoch whose run metrics the LoggedModel takes over (MLflow 3 copies the run's
    metrics of that step onto the model); None: the epoch of the exported checkpoint, as its
    ``export.json`` records it, so that the model page shows its best epoch, not epoch 0."""
    from recsys.model.export import read_meta
    from recsys.model.pyfunc import CODE_FILE, SIGNATURE, input_example

    if step is None:
        step = int(read_meta(export).metrics.get("epoch", 0))
    return log_pyfunc_model(uri, run_id, CODE_FILE, artifacts={"export": str(export)},
                            name=name, pip_requirements=pip_requirements,
                            input_example=input_example(Path(export)), signature=SIGNATURE,
                            step=step)


def logged_model_id(model_uri: str) -> str | None:
    """The LoggedModel id in ``models:/<model_id>`` (a version's ``source``), else None."""
    prefix = "models:/m-"
    return model_uri[len("models:/"):] if model_uri.startswith(prefix) else None


def register_model(uri: str, model_uri: str, name: str,
                   tags: Mapping[str, Any] | None = None) -> str:
    """Register ``model_uri`` (``models:/<id>`` or ``runs:/<run>/<name>``) as a new version of
    ``name`` (created if missing); return the version number as MLflow's string."""
    import mlflow

    with _process_tracking_uri(uri):
        version = mlflow.register_model(
            model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    return str(version.version)
