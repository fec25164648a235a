"""The metric-name audit: one spelling per metric in MLflow (``recsys.tracking.metric_names``).

Fails when a module starts logging metrics to MLflow somewhere new (its names must be added to
``KNOWN`` first), when a known spelling is not a valid MLflow name, or when a metric the platform
produces is logged under a spelling ``KNOWN`` does not list."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from mlflow.utils.validation import _validate_metric_name

from recsys.evaluation.metrics import ranking_metrics
from recsys.tracking import metric_names as names

REPO = Path(__file__).resolve().parents[2]
LOGGING_CALLS = {"log_metric", "log_metrics", "log_batch"}
# Every place that logs metrics to MLflow (file -> functions). A new one: add its names to
# metric_names.KNOWN, then here.
SITES = {
    "recsys/federated/server.py": {"_evaluate", "_log_round"},
    "recsys/monitoring/report.py": {"log_check"},
    "recsys/tracking/runs.py": {"log_config", "log_params", "log_metrics", "log_system_info"},
    "recsys/training/loop.py": {"log_epoch"},
    "recsys/training/run.py": {"run_training"},
    "recsys/tuning/results.py": {"_finish_child"},
    "recsys/tuning/sweep.py": {"run_sweep"},
}


def _sites() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for top in ("recsys", "jobs", "tune", "serve", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call):
                        f = node.func
                        called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                        if called in LOGGING_CALLS:
                            out.setdefault(str(path.relative_to(REPO)), set()).add(fn.name)
    return out


def test_every_place_that_logs_metrics_is_audited() -> None:
    found = _sites()
    nested = {f: {n for n in fns if n in SITES.get(f, set())} for f, fns in found.items()}
    assert set(found) == set(SITES), "a new module logs metrics: add its names to KNOWN"
    assert nested == SITES, "a new function logs metrics: add its names to KNOWN, then here"


@pytest.mark.parametrize("name,key", [
    ("valid_ndcg@10", "valid_ndcg_at_10"), ("test_recall@50/shop_c", "test_recall_at_50/shop_c"),
    ("best_valid_ndcg@10", "best_valid_ndcg_at_10"), ("valid_mrr", "valid_mrr"),
    ("test_ctr_auc/shop_a", "test_ctr_auc/shop_a"), ("a:b", "a_b")])
def test_one_mapping_to_mlflow_names(name: str, key: str) -> None:
    assert names.mlflow_key(name) == key
    _validate_metric_name(key)  # raises for a name MLflow refuses


def test_what_the_platform_logs_is_known() -> None:
    """Every name the evaluation produces, on every split the platform logs, per platform and
    as the mean; the loop's training and privacy metrics; the sweep's summary."""
    evaluated = ranking_metrics(np.array([1, 3, 60]), ks=(10, 50))  # the real producer
    produced = [names.metric_key(split, m, p) for split in ("valid", "test")
                for m in evaluated for p in (None, "shop_c")]
    produced += [names.metric_key("test", "ctr_auc", "shop_c"), "best_valid_ndcg_at_10",
                 "valid_users", "valid_users/shop_c", "train_loss", "lr", "epoch",
                 "sequences_per_s", "privacy_epsilon", "trials_errored", "sweep_fit_seconds",
                 "round", "bytes_up", "mean_update_norm", "client_dp_epsilon"]
    from recsys.monitoring.monitor import SIGNALS
    produced += [names.mlflow_key(f"monitor_{s}/shop_c") for s in SIGNALS]
    produced += ["monitor_drifted/shop_c", "monitor_new_events/shop_c"]
    assert names.unknown(produced) == []


@pytest.mark.parametrize("second_spelling", [
    "valid/ndcg@10", "ndcg_10", "valid_ndcg@10", "tune_best_metric", "valid_NDCG_at_10",
    "test_ndcg_at_10_shop_c"])
def test_a_second_spelling_is_caught(second_spelling: str) -> None:
    assert names.unknown([second_spelling]) == [second_spelling]


def test_two_names_for_one_key_are_refused() -> None:
    with pytest.raises(ValueError, match="same MLflow key"):
        names.mlflow_keys(["hr@10", "hr_at_10"])
