"""Ray Train end to end on CPU: 2 workers over gloo, DDP and DeepSpeed, checkpoints, resume,
a killed worker, transfer, MLflow logging and the logged model loading back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow import MlflowClient

from recsys.config import ConfigError, load_config
from recsys.evaluation.offline import EvaluateConfig, run_evaluation
from recsys.model.export import load_export
from recsys.tracking import metric_names
from recsys.training.config import TrainJobConfig
from recsys.training.engine import TrainState
from recsys.training.run import run_training

SOURCES = ["shop_a", "shop_b"]
TARGET = "shop_c"


def _cfg(examples: Any, tmp: Path, name: str, **overrides: Any) -> TrainJobConfig:
    base: dict[str, Any] = {
        "name": name,
        "mode": "pretrain",
        "data": {"examples": str(examples.path), "sequences": {"max_seq_len": 20},
                 "text": examples.manifest.config.text.model_dump(mode="json")},
        "train_platforms": SOURCES,
        "model": {"dim": 16, "num_layers": 1, "num_heads": 2, "num_experts": 2},
        "optim": {"epochs": 2, "micro_batch_size": 128, "lr": 0.003},
        "encoder": {"cache_dir": str(tmp / "cache")},
        "scaling": {"engine": "ddp", "num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"enabled": False},
        "output_dir": str(tmp / "runs"),
    }
    for key, value in overrides.items():
        node = base
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return TrainJobConfig.model_validate(base)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def pretrained(ray_cluster, synthetic_examples, workdir: Path, mlflow_server,
               monkeypatch_module: pytest.MonkeyPatch):
    monkeypatch_module.setenv("RECSYS_MLFLOW_TRACKING_URI", mlflow_server.uri)
    cfg = _cfg(synthetic_examples, workdir, "pretrain", **{"tracking.enabled": True,
                                                            "tracking.experiment": "it"})
    return run_training(cfg)


def test_ddp_pretrain_reports_exports_and_evaluates(pretrained) -> None:
    assert [int(p["epoch"]) for p in pretrained.curve] == [0, 1]
    exported = load_export(pretrained.export_dir)
    assert exported.platforms == SOURCES
    report = pretrained.report
    assert set(report.platforms) == set(SOURCES)
    for res in report.platforms.values():
        assert res.users > 0
        assert 0 < res.metrics["ndcg@10"] <= res.metrics["recall@10"] <= 1
        assert res.metrics["recall@10"] <= res.metrics["recall@50"]
        assert 0 <= res.auc <= 1
        assert res.history_excluded is not None
    for f in ("report.json", "report.md", "metrics_by_platform.png", "learning_curves.png"):
        assert (pretrained.export_dir.parent / "report" / f).stat().st_size > 0


def test_beats_popularity_on_synthetic(pretrained) -> None:
    """The synthetic shops have sequential structure: a trained model beats random ranking by
    a wide margin (random NDCG@10 over ~300 items is ~0.01)."""
    for res in pretrained.report.platforms.values():
        assert res.metrics["ndcg@10"] > 0.03


def test_mlflow_run_has_config_curves_report_and_model(pretrained, mlflow_server,
                                                       synthetic_examples) -> None:
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(pretrained.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "2"
    assert run.data.tags["sys.torch"]
    history = client.get_metric_history(pretrained.run_id, "valid_ndcg_at_10")
    assert [m.step for m in history] == [0, 1]
    # Both workers read the valid split whole and each ranks its part of the users: together
    # exactly the split's users of the train platforms, each once.
    want = sum(synthetic_examples.manifest.platforms[p].valid_rows for p in SOURCES)
    assert [m.value for m in client.get_metric_history(pretrained.run_id, "valid_users")] == \
        [want, want]
    assert any(k.startswith("test_ndcg_at_10/") for k in run.data.metrics)
    assert metric_names.unknown(run.data.metrics) == []  # one spelling per metric
    artifacts = {a.path for a in client.list_artifacts(pretrained.run_id, "report")}
    assert "report/report.md" in artifacts
    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{pretrained.run_id}/model")
    item_ids = load_export(pretrained.export_dir).items["shop_a"].item_ids
    out = model.predict(pd.DataFrame({"platform": ["shop_a", "shop_b"],
                                      "history": [item_ids[:3], []], "k": [5, 3]}))
    assert len(out["items"][0]) == 5 and len(set(out["items"][0])) == 5
    assert set(out["items"][0]) <= set(item_ids)
    assert len(out["items"][1]) == 3
    assert out["scores"][0] == sorted(out["scores"][0], reverse=True)


def test_resume_continues_from_latest_checkpoint(pretrained, synthetic_examples,
                                                 workdir: Path) -> None:
    """Same name and storage, more epochs: Ray Train restores the latest checkpoint and the
    loop continues at the next epoch instead of starting over."""
    cfg = _cfg(synthetic_examples, workdir, "pretrain", **{"optim.epochs": 3})
    again = run_training(cfg)
    assert [int(p["epoch"]) for p in again.curve] == [0, 1, 2]
    first = {int(p["epoch"]): p["valid_ndcg@10"] for p in pretrained.curve}
    second = {int(p["epoch"]): p["valid_ndcg@10"] for p in again.curve}
    assert second[0] == pytest.approx(first[0]) and second[1] == pytest.approx(first[1])


def test_resume_with_a_changed_config_is_refused(pretrained, synthetic_examples,
                                                 workdir: Path) -> None:
    """Same name, another learning rate: refused before anything runs, naming the key."""
    cfg = _cfg(synthetic_examples, workdir, "pretrain", **{"optim.epochs": 5, "optim.lr": 0.01})
    with pytest.raises(ValueError, match=r"optim.lr: 0.003 -> 0.01.*resume=false"):
        run_training(cfg)


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(
        pretrained, synthetic_examples, workdir: Path) -> None:
    """The latest checkpoint's ddp.pt cut in half: both workers resume from the checkpoint
    before it (Ray hands over only the latest) and train on to the end."""
    run = workdir / "runs" / "pretrain"
    *_, before, latest = sorted(d for d in run.glob("checkpoint_*") if d.is_dir())
    weights = latest / "ddp.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    kept = TrainState.read(before)
    last = TrainState.read(latest).epoch
    out = run_training(_cfg(synthetic_examples, workdir, "pretrain",
                            **{"optim.epochs": last + 2}))
    assert [int(p["epoch"]) for p in out.curve] == list(range(last + 2))
    # Epochs up to the fallback's come from its saved curve; the later ones were trained again.
    assert out.curve[:kept.epoch + 1] == [dict(p) for p in kept.curve]


def test_killed_worker_restarts_from_checkpoint(ray_cluster, synthetic_examples,
                                                workdir: Path) -> None:
    marker = workdir / "killed.txt"
    cfg = _cfg(synthetic_examples, workdir, "chaos", **{
        "optim.epochs": 3, "scaling.max_failures": 1,
        "fault_injection": {"after_epoch": 0, "rank": 1, "marker": str(marker)}})
    out = run_training(cfg)
    assert marker.exists(), "the fault never fired"
    assert [int(p["epoch"]) for p in out.curve] == [0, 1, 2]


def test_deepspeed_zero2_two_workers(ray_cluster, synthetic_examples, workdir: Path) -> None:
    cfg = _cfg(synthetic_examples, workdir, "zero2", **{
        "scaling.engine": "deepspeed", "deepspeed.zero_stage": 2, "optim.epochs": 1})
    out = run_training(cfg)
    exported = load_export(out.export_dir)
    assert exported.platforms == SOURCES
    for res in out.report.platforms.values():
        assert res.metrics["ndcg@10"] > 0


@pytest.mark.parametrize("strategy", ["freeze_encoder", "adapter_only"])
def test_transfer_to_new_platform(pretrained, synthetic_examples, workdir: Path,
                                  strategy: str) -> None:
    cfg = _cfg(synthetic_examples, workdir, f"transfer-{strategy}", **{
        "mode": "transfer", "train_platforms": [TARGET], "optim.epochs": 1,
        "transfer": {"init_from": str(pretrained.export_dir), "strategy": strategy}})
    out = run_training(cfg)
    exported = load_export(out.export_dir)
    assert exported.platforms == [*SOURCES, TARGET]  # pretrain platforms keep their ids
    # The source catalogs travel too, so serving can embed a user's history from them.
    assert set(exported.items) == {*SOURCES, TARGET}
    source = load_export(pretrained.export_dir).items["shop_a"]
    assert exported.items["shop_a"].platform_id == source.platform_id
    assert exported.items["shop_a"].item_ids == source.item_ids
    assert set(out.report.platforms) == {TARGET}
    meta = json.loads((out.export_dir / "export.json").read_text())
    assert meta["strategy"] == strategy and meta["mode"] == "transfer"


def test_evaluate_job_writes_transfer_report(pretrained, synthetic_examples, workdir: Path):
    scratch = run_training(_cfg(synthetic_examples, workdir, "scratch", **{
        "mode": "scratch", "train_platforms": [TARGET], "optim.epochs": 1}))
    transfer = workdir / "runs" / "transfer-freeze_encoder" / "export"
    if not transfer.exists():
        pytest.skip("needs the transfer test's export (run the module in order)")
    files = run_evaluation(EvaluateConfig(
        examples=str(synthetic_examples.path), platforms=[TARGET], out_dir=str(workdir / "eval"),
        exports={"scratch": str(scratch.export_dir), "freeze_encoder": str(transfer)}))
    text = files["transfer"].with_suffix(".md").read_text()
    assert "freeze_encoder" in text and TARGET in text


def test_cross_platform_histories_with_a_platform_temperature(synthetic_examples,
                                                             workdir: Path) -> None:
    """Pooled training on a cross-platform example set (each history item embedded with its own
    platform's table, through DDP) with platforms drawn uniformly: it trains, exports every
    platform a history can hold, and reports users with and without history elsewhere."""
    from recsys.data.examples import build_example_set
    from recsys.evaluation.offline import ELSEWHERE, OWN_ONLY

    data = synthetic_examples.manifest.config
    cross = build_example_set(data.model_copy(update={
        "examples": str(workdir / "cross_examples"),
        "sequences": data.sequences.model_copy(update={"cross_platform": True})}))
    out = run_training(_cfg(cross, workdir, "cross", **{
        "optim.platform_temperature": "uniform", "optim.epochs": 1}))
    exported = load_export(out.export_dir)
    assert set(exported.items) == {*SOURCES, TARGET}  # TARGET's items are in histories
    assert set(out.report.platforms) == set(SOURCES)
    for res in out.report.platforms.values():
        assert res.subsets[ELSEWHERE]["count"] > 0 and res.subsets[OWN_ONLY]["count"] > 0
        assert res.subsets[ELSEWHERE]["count"] + res.subsets[OWN_ONLY]["count"] == res.users
        assert 0 < res.metrics["ndcg@10"] <= 1


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.1, lrr: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(TrainJobConfig, f)
    f.write_text("mode: transfer\n")
    with pytest.raises(ConfigError, match="transfer.init_from"):
        load_config(TrainJobConfig, f)
