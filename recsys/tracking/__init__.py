"""MLflow tracking: a project-owned local server (or ``RECSYS_MLFLOW_TRACKING_URI``), the
rank-0 helpers a training run logs through, and the model registry (aliases, champion).

Names resolve lazily (PEP 562) so that ``import recsys.tracking`` does not import mlflow; a CLI
that only stops the server stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_SERVER = ("LocalMlflowServer", "ensure_tracking", "ensure_experiment", "start_detached",
           "stop_detached", "read_detached")
_RUNS = ("start_run", "end_run", "log_config", "log_metrics", "log_system_info", "log_artifacts",
         "log_pyfunc_model", "log_recommender", "register_model")
_REGISTRY = ("set_alias", "alias_version")

__all__ = [*_SERVER, *_RUNS, *_REGISTRY]


def __getattr__(name: str) -> Any:
    if name in _SERVER:
        return getattr(importlib.import_module("recsys.tracking.server"), name)
    if name in _RUNS:
        return getattr(importlib.import_module("recsys.tracking.runs"), name)
    if name in _REGISTRY:
        return getattr(importlib.import_module("recsys.tracking.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
