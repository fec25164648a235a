import json
from pathlib import Path

import numpy as np
import pytest

from recsys.evaluation.metrics import COLD_START, RankingAccumulator, ranking_metrics
from recsys.evaluation.report import (
    PUBLISHED,
    EvalReport,
    PlatformResult,
    build_report,
    build_transfer_report,
    compare_to_published,
    read_report,
    write_report,
    write_transfer_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def accumulate(seed: int, platforms: dict[str, int]) -> RankingAccumulator:
    rng = np.random.default_rng(seed)
    acc = RankingAccumulator()
    for name, users in platforms.items():
        ranks = rng.integers(1, 300, size=users).astype(float)
        acc.add(name, ranks, {COLD_START: rng.random(users) < 0.1})
    return acc


def make_report(run: str = "run-a", seed: int = 0) -> EvalReport:
    sizes = {"scientific": 120, "online_retail": 200, "office": 80}
    return build_report(
        run, "test", accumulate(seed, sizes),
        history_excluded=accumulate(seed + 100, sizes),
        auc={"scientific": 0.71},
        curves=[{"epoch": e, "train_loss": 5.0 / (e + 1), "valid_ndcg@10": 0.02 * e}
                for e in range(1, 6)],
        n_boot=200, meta={"model": "tiny", "seed": seed},
    )


def is_png(path: Path) -> bool:
    return path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvalReport, dict[str, Path]]:
    """One report written once for the tests that only read its files (figures are slow)."""
    report = make_report()
    return report, write_report(report, tmp_path_factory.mktemp("report"))


def test_write_report_files_and_json_round_trip(
        written: tuple[EvalReport, dict[str, Path]]) -> None:
    report, paths = written
    assert {p.name for p in paths.values()} == {
        "report.json", "report.md", "metrics_by_platform.png", "learning_curves.png"}
    assert read_report(paths["json"].parent) == report
    assert json.loads(paths["json"].read_text())["platforms"]["scientific"]["auc"] == 0.71
    assert is_png(paths["metrics_png"]) and is_png(paths["curves_png"])


def test_report_numbers_come_from_the_accumulator() -> None:
    acc = accumulate(0, {"scientific": 120})
    report = build_report("r", "valid", acc, n_boot=100)
    res = report.platforms["scientific"]
    assert res.metrics == ranking_metrics(acc.ranks("scientific"))
    assert res.users == 120
    assert res.subsets[COLD_START]["count"] == int(acc.ranks("scientific", COLD_START).size)
    lo, hi = res.ci["ndcg@10"]
    assert lo <= res.metrics["ndcg@10"] <= hi
    with pytest.raises(ValueError, match="no primary"):
        build_report("r", "valid", acc, auc={"office": 0.5})


def test_empty_subset_is_null_in_json_and_round_trips(tmp_path: Path) -> None:
    acc = RankingAccumulator()
    acc.add("p", np.array([1.0, 4.0]), {COLD_START: np.array([False, False])})
    report = build_report("r", "test", acc, n_boot=10)
    assert report.platforms["p"].subsets[COLD_START]["ndcg@10"] is None
    assert "curves_png" not in write_report(report, tmp_path)  # no curves, no curve figure
    assert read_report(tmp_path / "report.json") == report
    assert "– (0)" in (tmp_path / "report.md").read_text()


def test_markdown_has_a_row_per_platform_and_labels_history_excluded(
        written: tuple[EvalReport, dict[str, Path]]) -> None:
    report, paths = written
    md = paths["markdown"].read_text()
    main = md.split("\n\n")[2].splitlines()
    assert main[0].startswith("| platform | users | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 |")
    assert [row.split(" | ")[0].lstrip("| ") for row in main[2:]] == sorted(report.platforms)
    sci = report.platforms["scientific"]
    sci_row = next(r for r in main if r.startswith("| scientific "))
    assert f"{sci.metrics['ndcg@10']:.4f}" in sci_row and "0.7100" in sci_row
    assert "History excluded" in md and "NOT masked" in md
    assert "## Published anchors" in md


def test_compare_to_published() -> None:
    report = make_report()
    lines = compare_to_published(report)
    assert lines[0].startswith("| platform | anchor | metric | ours (test) |")
    rows = lines[2:]
    assert len(rows) == sum(len(m) for p in ("scientific", "online_retail")
                            for m in PUBLISHED[p].values())
    ours = report.platforms["scientific"].metrics["ndcg@10"]
    row = next(r for r in rows if r.startswith("| scientific | VQ-Rec | NDCG@10 "))
    assert row.endswith(f"| {ours:.4f} | 0.0643 | {ours / 0.0643:.2f} |")
    only_office = report.model_copy(update={"platforms": {"office": report.platforms["office"]}})
    assert compare_to_published(only_office) == []


def fixed(run: str, ndcg: dict[str, float], users: int = 100) -> EvalReport:
    return EvalReport(run=run, split="test", platforms={
        p: PlatformResult(metrics={"count": users, "ndcg@10": v, "recall@10": 2 * v})
        for p, v in ndcg.items()})


def test_transfer_gains(tmp_path: Path) -> None:
    curve = [{"epoch": 1.0, "train_loss": 3.0}, {"epoch": 2.0, "train_loss": 2.5}]
    runs = {
        "scratch": fixed("scratch", {"office": 0.050, "scientific": 0.040}),
        "full": fixed("full", {"office": 0.060, "scientific": 0.030}).model_copy(
            update={"curves": curve}),
        "lora": fixed("lora", {"office": 0.055, "movielens": 0.1}),
    }
    tr = build_transfer_report(runs, baseline="scratch")
    row = {(r.platform, r.strategy): r for r in tr.rows}
    assert row[("office", "full")].gain_abs["ndcg@10"] == pytest.approx(0.010)
    assert row[("office", "full")].gain_rel_pct["ndcg@10"] == pytest.approx(20.0)
    assert row[("scientific", "full")].gain_rel_pct["recall@10"] == pytest.approx(-25.0)
    assert row[("office", "scratch")].gain_abs["ndcg@10"] == 0.0
    assert row[("movielens", "lora")].gain_abs["ndcg@10"] is None  # no baseline there
    assert tr.strategies == ["scratch", "full", "lora"]

    paths = write_transfer_report(runs, tmp_path)
    md = paths["markdown"].read_text()
    assert "| office | full | 100 | 0.0600 | +0.0100 (+20.0%) |" in md
    assert "no baseline" in md
    assert is_png(paths["png"]) and is_png(paths["curves_png"])
    assert json.loads(paths["json"].read_text())["baseline"] == "scratch"


def test_transfer_refuses_mismatched_comparisons() -> None:
    with pytest.raises(ValueError, match="baseline 'scratch' not among"):
        build_transfer_report({"full": fixed("full", {"a": 0.1})})
    with pytest.raises(ValueError, match="users"):
        build_transfer_report({"scratch": fixed("s", {"a": 0.1}),
                               "full": fixed("f", {"a": 0.2}, users=99)})
    valid = fixed("f", {"a": 0.2}).model_copy(update={"split": "valid"})
    with pytest.raises(ValueError, match="splits"):
        build_transfer_report({"scratch": fixed("s", {"a": 0.1}), "full": valid})
