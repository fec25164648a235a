"""The whole pipeline as one job on a real local Ray + MLflow, and a second run after new logs
arrive for one platform: only what reads that platform runs again."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recsys.data.ingest.synthetic import release_holdback, write_logs
from recsys.pipeline import PipelineConfig, run_pipeline
from recsys.pipeline.outputs import PipelineResult

TINY_TRAIN = {"model.dim": 16, "model.num_layers": 1, "model.num_heads": 2,
              "model.num_experts": 2, "optim.epochs": 2, "optim.micro_batch_size": 128,
              "optim.lr": 0.003, "data.sequences.max_seq_len": 20}


FirstRun = tuple[PipelineConfig, PipelineResult, Path]


def as_emails(logs_dir: Path) -> None:
    """Make the raw logs' user and session ids e-mail-like (``jane.doe+17@example.com``), what
    no file after ingest may hold (issue 20: pseudonyms everywhere)."""
    import pandas as pd

    for path in logs_dir.rglob("events-*.parquet"):
        events = pd.read_parquet(path)
        events["user_id"] = events["user_id"].map(lambda u: f"jane.doe+{u}@example.com")
        events["session_id"] = events["session_id"].map(
            lambda s: None if s is None else f"visit.{s}@sessions.example.org")
        events.to_parquet(path, index=False)
    for path in (logs_dir / ".holdback").glob("*.parquet"):
        events = pd.read_parquet(path)
        events["user_id"] = events["user_id"].map(lambda u: f"jane.doe+{u}@example.com")
        events.to_parquet(path, index=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp: Path, tiny_encoder: str, logs: dict[str, dict[str, Path]], port: int,
            **extra: Any) -> PipelineConfig:
    overrides = {**TINY_TRAIN, "encoder.cache_dir": str(tmp / "cache")}
    return PipelineConfig.model_validate({
        "name": "it-pipeline",
        "work_dir": str(tmp / "work"),
        "ingest": [{"source": "generic", "platform": p, "path": str(f["path"]),
                    "items_path": str(f["items_path"])} for p, f in logs.items()],
        "data": {"lake": str(tmp / "lake"), "examples": str(tmp / "examples"),
                 "sequences": {"max_seq_len": 20, "collapse_repeats": True},
                 "text": {"encoder": tiny_encoder, "max_tokens": 32}},
        "pretrain": {"platforms": ["shop_a", "shop_b"], "overrides": overrides},
        # No scratch baseline here (tests/integration/test_training.py covers the comparison):
        # two trainings on the first run, one after new logs, keep this test at ~2 minutes.
        "transfer": {"targets": ["shop_c"], "strategies": ["freeze_encoder"],
                     "scratch_config": None, "overrides": overrides},
        # The sweep stage is covered by tests/integration/test_tune.py (same run_sweep).
        "skip": ["sweep"],
        "ray": {"keep_alive": False},  # the session's cluster; the module shuts Serve down
        "deploy": {"port": port, "args": {"search": False, "poll_interval_s": 1.0,
                                          "api_key_file": str(tmp / "secrets" / "api_keys")}},
        "registry": {"model_name": "it-pipeline-{platform}"},
        **extra,
    })


@pytest.fixture(scope="module")
def first_run(ray_cluster, tiny_encoder: str, mlflow_server,
              tmp_path_factory: pytest.TempPathFactory,
              monkeypatch_module: pytest.MonkeyPatch) -> Iterator[FirstRun]:
    monkeypatch_module.setenv("RECSYS_MLFLOW_TRACKING_URI", mlflow_server.uri)
    tmp = tmp_path_factory.mktemp("pipeline")
    logs = write_logs(tmp / "logs", num_platforms=3, scale=0.2, seed=11,
                      holdback={"shop_c": 0.3})
    as_emails(tmp / "logs")
    cfg = _config(tmp, tiny_encoder, logs, _free_port())
    try:
        yield cfg, run_pipeline(cfg), tmp
    finally:
        from ray import serve

        serve.shutdown()


def test_first_run_runs_every_stage_and_compares_transfer_with_scratch(first_run) -> None:
    cfg, res, _ = first_run
    assert res.skipped == []
    assert {"pretrain", "transfer/shop_c/freeze_encoder", "evaluate/shop_c",
            "examples"} <= set(res.ran)
    report = json.loads(Path(res.evaluate["shop_c"].reports["freeze_encoder"]).read_text())
    assert report["split"] == "test"
    assert 0 < report["platforms"]["shop_c"]["metrics"]["ndcg@10"] <= 1
    state = json.loads((cfg.root / "pipeline" / "state.json").read_text())
    assert Path(state["pretrain"]["outputs"]["export"]).is_dir()
    reg = res.register["shop_c"]
    assert reg.version == "1" and reg.promoted and reg.champion == "1"


def test_first_run_deploys_the_champion_and_answers(first_run) -> None:
    import requests

    _, res, _ = first_run
    assert res.deploy is not None and res.smoke is not None
    assert res.deploy.model == "models:/it-pipeline-{platform}@champion"
    assert res.deploy.versions == {"shop_c": "1"}
    smoke = res.smoke.response
    assert smoke.source == "model" and smoke.model_version == "1"
    ids = [it.item_id for it in smoke.items]
    assert len(ids) == 5 == len(set(ids))
    assert requests.get(f"{res.deploy.url}/model?platform=shop_c", timeout=10).status_code == 401
    key_file = Path(res.deploy.api_key_file)  # made by the deploy stage: owner-only
    assert key_file.stat().st_mode & 0o077 == 0
    key = key_file.read_text().split()[1]
    model = requests.get(f"{res.deploy.url}/model?platform=shop_c", headers={"x-api-key": key},
                         timeout=10)
    assert "shop_c" in json.dumps(model.json())


def test_no_raw_identifier_leaves_ingest(first_run, mlflow_server) -> None:
    """Issue 20: the raw logs hold e-mail-like user and session ids; nothing the pipeline wrote
    (lake, quarantine, example set, reports, pipeline state, the job logs) nor the MLflow
    server (its database and artifacts) holds one. The same scan finds them in the raw logs."""
    from recsys.data.audit import scan

    cfg, _, tmp = first_run
    assert len(scan([tmp / "logs"])) > 100, "the scan cannot find what it looks for"
    roots = [tmp / "lake", tmp / "examples", cfg.root, Path(cfg.work_dir), mlflow_server.root]
    hits = scan(roots)
    assert hits == [], hits[:5]


def test_second_run_with_nothing_new_runs_nothing(first_run) -> None:
    cfg, _, _ = first_run
    res = run_pipeline(cfg)
    assert res.ran == []
    # ingest x3, examples, 2 trainings, eval, register, deploy (the smoke request always runs)
    assert len(res.skipped) == 3 + 1 + 2 + 1 + 1 + 1  # ... and deploy


def test_new_logs_for_one_platform_retrain_only_what_reads_it(first_run) -> None:
    cfg, first, tmp = first_run
    release_holdback(tmp / "logs", "shop_c")
    res = run_pipeline(cfg)
    assert "pretrain" in res.skipped  # sources unchanged: the pretrained model is reused
    assert any(k.startswith("ingest/") and "shop_a" in k for k in res.skipped)
    assert any(k.startswith("ingest/") and "shop_c" in k for k in res.ran)
    assert {"examples", "transfer/shop_c/freeze_encoder", "evaluate/shop_c",
            "register/shop_c"} <= set(res.ran)
    # The retrained model is a new version; it is champion only if it beat v1 on the same
    # (new) validation data, as re-evaluated by the register stage.
    reg = res.register["shop_c"]
    assert reg.version == "2"
    assert reg.champion == ("2" if reg.promoted else "1")
    assert ("beat" in reg.reason) or (">" in reg.reason) or ("catalog" in reg.reason)
    assert res.examples is not None and first.examples is not None
    assert res.examples is not None and first.examples is not None
    users = res.examples.platforms["shop_c"].lake_users
    assert users >= first.examples.platforms["shop_c"].lake_users


def test_a_stage_alone_uses_the_recorded_inputs(first_run) -> None:
    cfg, _, _ = first_run
    alone = cfg.model_copy(update={"stages": ["evaluate"], "force": ["evaluate"]})
    res = run_pipeline(alone)
    assert res.ran == ["evaluate/shop_c"]


def test_pipeline_config_needs_sections_for_its_stages() -> None:
    with pytest.raises(ValueError, match="needs a 'pretrain' section"):
        PipelineConfig.model_validate({"stages": ["pretrain"]})
    assert PipelineConfig.model_validate({"stages": ["pretrain"], "skip": ["pretrain"]}).active \
        == []
