"""Evaluation library: full-ranking metrics and reports. Pure functions, no Ray, no models.

``metrics`` turns scores into ranks and ranks into metrics (one path for validation and test);
``report`` builds, saves and renders per-run and transfer reports (matplotlib is imported only
when a figure is drawn).
"""

from recsys.evaluation.metrics import (
    ALL,
    COLD_START,
    RankingAccumulator,
    auc,
    bootstrap_ci,
    cold_start_mask,
    per_user,
    rank_of_target,
    ranking_metrics,
    training_items,
)
from recsys.evaluation.report import (
    PUBLISHED,
    PUBLISHED_SOURCE,
    EvalReport,
    PlatformResult,
    TransferReport,
    TransferRow,
    build_report,
    build_transfer_report,
    compare_to_published,
    read_report,
    write_report,
    write_transfer_report,
)

__all__ = [
    "ALL",
    "COLD_START",
    "PUBLISHED",
    "PUBLISHED_SOURCE",
    "EvalReport",
    "PlatformResult",
    "RankingAccumulator",
    "TransferReport",
    "TransferRow",
    "auc",
    "bootstrap_ci",
    "build_report",
    "build_transfer_report",
    "cold_start_mask",
    "compare_to_published",
    "per_user",
    "rank_of_target",
    "ranking_metrics",
    "read_report",
    "training_items",
    "write_report",
    "write_transfer_report",
]
