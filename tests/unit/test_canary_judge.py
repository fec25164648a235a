"""The canary judge (``recsys.production.canary``): the pure verdict on two arms, the loop that
acts on it in a real MLflow registry, and the stats read from the gateway's feedback log."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.production.canary import (
    ArmStats,
    CanaryConfig,
    decide,
    diff_interval,
    feedback_stats,
    judge,
    reject,
    run_canary,
    wilson,
)

CFG = CanaryConfig(min_impressions=100, max_impressions=5000, margin=0.02,
                   max_error_rate=0.01)


def arm(impressions: int, clicks: int, requests: int | None = None,
        errors: int = 0) -> ArmStats:
    return ArmStats(requests=impressions // 5 if requests is None else requests, errors=errors,
                    impressions=impressions, clicks=clicks)


def test_wilson_bounds_contain_the_rate_and_shrink_with_n() -> None:
    lo, hi = wilson(10, 100, 1.96)
    assert lo < 0.1 < hi and (round(lo, 3), round(hi, 3)) == (0.055, 0.174)  # textbook values
    assert wilson(1000, 10000, 1.96)[1] - wilson(1000, 10000, 1.96)[0] < hi - lo
    assert wilson(0, 0, 1.96) == (0.0, 1.0)
    assert wilson(0, 50, 1.96)[0] == 0.0 and wilson(50, 50, 1.96)[1] == 1.0


def test_the_difference_interval_is_honest_at_the_edges() -> None:
    """CTR 1.0 against 1.0: a Wald interval would be the point [0, 0]; Newcombe's is not."""
    lo, hi = diff_interval(arm(200, 200), arm(200, 200), 1.96)
    assert lo < 0 < hi and hi - lo > 0.02
    lo, hi = diff_interval(arm(1000, 100), arm(1000, 200), 1.96)
    assert 0 < lo < 0.1 < hi


def test_waits_for_enough_impressions_on_both_arms() -> None:
    j = judge(arm(99, 50), arm(5000, 10), CFG)
    assert j.verdict == "wait" and "champion 99" in j.reason and "challenger" not in j.reason


def test_equal_ctrs_with_enough_traffic_promote() -> None:
    assert decide(arm(4000, 400), arm(4000, 400), CFG) == "promote"
    assert decide(arm(200, 200), arm(200, 200), CFG.model_copy(update={"margin": 0.05})) \
        == "promote"


def test_a_clearly_worse_challenger_is_rolled_back() -> None:
    j = judge(arm(1000, 200), arm(1000, 50), CFG)
    assert j.verdict == "rollback" and "worse by more than 0.02" in j.reason
    assert j.ctr_diff_interval is not None and j.ctr_diff_interval[1] < -0.02


def test_a_better_challenger_is_promoted() -> None:
    assert decide(arm(500, 50), arm(500, 100), CFG) == "promote"


def test_undecided_waits_then_rolls_back_at_max_impressions() -> None:
    """Slightly worse, within noise: not shown to be non-inferior, not shown to be worse."""
    assert decide(arm(300, 30), arm(300, 27), CFG) == "wait"
    j = judge(arm(300, 30), arm(300, 27), CFG.model_copy(update={"max_impressions": 300}))
    assert j.verdict == "rollback" and "undecided after 300" in j.reason


def test_challenger_errors_roll_back_before_any_ctr() -> None:
    """A challenger that fails to load: every request routed to it fell back to the champion."""
    j = judge(arm(10, 1), ArmStats(requests=0, errors=8), CFG)
    assert j.verdict == "rollback" and "failed 8 of 8" in j.reason
    # One failure in a thousand is under 1 %: judged on CTR as usual.
    assert decide(arm(4000, 400), arm(4000, 400, requests=1000, errors=1), CFG) == "promote"
    # 1 failure in 500 is no proof of a 1 % error rate: no rollback, wait for impressions.
    assert decide(arm(10, 1), ArmStats(requests=499, errors=1), CFG) == "wait"


def test_margin_zero_needs_the_challenger_to_be_better() -> None:
    strict = CFG.model_copy(update={"margin": 0.0})
    assert decide(arm(4000, 400), arm(4000, 400), strict) == "wait"
    assert decide(arm(4000, 400), arm(4000, 520), strict) == "promote"


# -- the loop, against a real registry -----------------------------------------------------------


def _versions(uri: str, n: int) -> tuple[str, list[str]]:
    from recsys.tracking.runs import client

    c, name = client(uri), f"canary-{uuid.uuid4().hex[:8]}"
    c.create_registered_model(name)
    versions = []
    for i in range(n):
        # no files behind it: the judge never downloads a version
        versions.append(str(c.create_model_version(name, f"s3://nowhere/{name}/{i}").version))
    return name, versions


def test_run_canary_promotes_under_the_lock_and_clears_the_challenger(
        mlflow_server) -> None:
    from recsys.tracking import registry

    uri = mlflow_server.uri
    name, (v1, v2) = _versions(uri, 2)
    registry.set_alias(uri, name, "champion", v1)
    registry.set_alias(uri, name, "challenger", v2)  # as the offline gate leaves it
    registry.set_alias(uri, name, "canary", v2)
    reads = iter([(arm(10, 1), arm(10, 1)), (arm(2000, 200), arm(2000, 210))])
    slept: list[float] = []
    out = run_canary(uri, name, lambda: next(reads), CFG.model_copy(update={"poll_s": 7}),
                     sleep=slept.append)
    assert out.verdict == "promote" and slept == [7] and out.champion_version == v1
    info = registry.describe(uri, name)
    assert info["champion"] == v2 and info["challenger"] is None
    assert registry.alias_version(uri, name, "canary") is None
    assert info["champion_history"] == [v1]
    tags = {v["version"]: v["tags"] for v in info["versions"]}[v2]
    assert tags["canary_verdict"] == "promote" and tags["canary_challenger_clicks"] == "210"
    assert tags["promotion_reason"].startswith("canary: CTR challenger")


def test_run_canary_rolls_back_and_times_out(mlflow_server) -> None:
    from recsys.tracking import registry

    uri = mlflow_server.uri
    name, (v1, v2, v3) = _versions(uri, 3)
    registry.set_alias(uri, name, "champion", v1)
    registry.set_alias(uri, name, "challenger", v2)
    registry.set_alias(uri, name, "canary", v2)
    out = run_canary(uri, name, lambda: (arm(1000, 200), arm(1000, 40)), CFG)
    assert out.verdict == "rollback"
    info = registry.describe(uri, name)
    assert info["champion"] == v1 and info["challenger"] is None
    assert registry.alias_version(uri, name, "canary") is None
    tags = {v["version"]: v["tags"] for v in info["versions"]}[v2]
    assert tags["role"] == "rejected" and tags["decision"].startswith("canary: CTR")
    # No traffic at all: the timeout rolls back.
    registry.set_alias(uri, name, "canary", v3)
    now = iter(range(0, 10_000, 100))
    out = run_canary(uri, name, lambda: (ArmStats(), ArmStats()),
                     CFG.model_copy(update={"timeout_s": 250}), sleep=lambda s: None,
                     clock=lambda: float(next(now)))
    assert out.verdict == "rollback" and "undecided after 250 s" in out.reason
    # A stats source that fails throughout: the same, with the failure as the reason.
    registry.set_alias(uri, name, "canary", v2)
    now = iter(range(0, 10_000, 100))

    def down() -> tuple[ArmStats, ArmStats]:
        raise ConnectionError("feedback volume not mounted")

    out = run_canary(uri, name, down, CFG.model_copy(update={"timeout_s": 250}),
                     sleep=lambda s: None, clock=lambda: float(next(now)))
    assert out.verdict == "rollback" and "feedback volume not mounted" in out.reason
    assert registry.alias_version(uri, name, "canary") is None


def test_run_canary_abandons_when_the_champion_moved(mlflow_server) -> None:
    from recsys.tracking import registry

    uri = mlflow_server.uri
    name, (v1, v2, v3) = _versions(uri, 3)
    registry.set_alias(uri, name, "champion", v1)
    registry.set_alias(uri, name, "canary", v2)

    def stats() -> tuple[ArmStats, ArmStats]:
        registry.promote(uri, name, v3, "a person")  # meanwhile
        return arm(2000, 200), arm(2000, 200)

    out = run_canary(uri, name, stats, CFG)
    assert out.verdict == "abandoned" and f"not v{v1}" in out.reason
    assert registry.alias_version(uri, name, "champion") == v3
    assert registry.alias_version(uri, name, "canary") == v2  # left for a person
    reject(uri, name, v2, "by hand")
    with pytest.raises(LookupError, match="no @canary"):
        run_canary(uri, name, stats, CFG)


# -- stats from the feedback log -----------------------------------------------------------------


def test_feedback_stats_join_clicks_to_the_arm_that_showed_the_item(tmp_path: Path) -> None:
    rows = []
    for r, (served_by, version) in enumerate([("champion", "1"), ("challenger", "2"),
                                              ("challenger", "2"), ("champion", "0")]):
        rows += [{"request_id": f"r{r}", "item_id": f"i{k}", "event_type": "impression",
                  "served_by": served_by, "model_version": version, "position": k,
                  "timestamp": 100.0 + r, "platform": "shop"} for k in range(3)]
    clicks = [("r0", "i0"), ("r1", "i1"), ("r1", "i2"), ("r1", "i2"), ("r3", "i0"),
              ("r2", "i9")]  # r1/i2 twice: one click; r2/i9 was never shown; r3 is an old model
    rows += [{"request_id": q, "item_id": i, "event_type": "click", "served_by": None,
              "model_version": None, "position": None, "timestamp": 200.0, "platform": "shop"}
             for q, i in clicks]
    (tmp_path / "shop").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "shop" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "shop" / "b.parquet")
    a, b = feedback_stats(tmp_path, "shop", "1", "2")
    assert a == ArmStats(requests=1, impressions=3, clicks=1)
    assert b == ArmStats(requests=2, impressions=6, clicks=2)
    a, b = feedback_stats(tmp_path, "shop", "1", "2", since=101.5)
    assert a == ArmStats() and b == ArmStats(requests=1, impressions=3, clicks=0)
    assert feedback_stats(tmp_path, "other", "1", "2") == (ArmStats(), ArmStats())
