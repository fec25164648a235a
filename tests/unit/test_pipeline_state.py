"""Content fingerprints decide which pipeline stages re-run: they must see content, not mtimes;
the stage record keeps typed outputs and reads them back typed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recsys.pipeline.outputs import EvaluateOutput, TrainOutput
from recsys.pipeline.state import PipelineState, StageOutput, hash_json, hash_tree


def test_hash_json_ignores_key_order_and_sees_values() -> None:
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})


def test_hash_tree_sees_content_names_and_new_files_not_mtime(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"one")
    (tmp_path / "b.parquet").write_bytes(b"two")
    first = hash_tree(tmp_path)
    os.utime(tmp_path / "a.parquet", (1, 1))  # touched, same bytes
    (tmp_path / ".staging-x").mkdir()
    (tmp_path / ".staging-x" / "junk").write_bytes(b"half-written")  # hidden: not content
    assert hash_tree(tmp_path) == first
    (tmp_path / "b.parquet").write_bytes(b"TWO")
    assert hash_tree(tmp_path) != first
    (tmp_path / "b.parquet").write_bytes(b"two")
    assert hash_tree(tmp_path) == first
    (tmp_path / "c.parquet").write_bytes(b"")
    assert hash_tree(tmp_path) != first
    (tmp_path / "c.parquet").rename(tmp_path / "d.parquet")
    assert hash_tree(tmp_path) != first


def test_hash_tree_of_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        hash_tree(tmp_path / "nope")


class _Export(StageOutput):
    export: str


def test_state_is_fresh_only_with_same_fingerprint_and_outputs(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    state = PipelineState(tmp_path / "state")
    assert not state.fresh("train/x", "f1", [out])
    state.record("train/x", "f1", _Export(export=str(out)), 1.5)
    reloaded = PipelineState(tmp_path / "state")  # survives the process
    assert reloaded.fresh("train/x", "f1", [out])
    assert not reloaded.fresh("train/x", "f2", [out])
    out.rmdir()
    assert not reloaded.fresh("train/x", "f1", [out])
    assert reloaded.get("train/x").outputs == {"export": str(out)}
    rec = reloaded.read("train/x", _Export)
    assert rec is not None and rec.output == _Export(export=str(out)) and rec.fingerprint == "f1"


def test_state_names_the_changed_input(tmp_path: Path) -> None:
    state = PipelineState(tmp_path)
    state.record("k", "f1", _Export(export="e"), 0.1, {"config": "a", "lake/x": "b"})
    assert state.why_stale("k", "f2", inputs={"config": "a", "lake/x": "c"}) == "changed: lake/x"
    assert state.why_stale("other", "f1") == "never run"


def test_train_output_keeps_its_json_keys_and_reads_back_typed(tmp_path: Path) -> None:
    out = TrainOutput(export="e", best_valid_ndcg10=0.25, report="r.json", mlflow_run_id=None,
                      model_uri="models:/m-1", epochs=3, seconds=1.0)
    PipelineState(tmp_path).record("pretrain", "f", out, 1.0)
    raw = json.loads((tmp_path / "state.json").read_text())["pretrain"]["outputs"]
    assert raw["best_valid_ndcg@10"] == 0.25 and raw["export"] == "e"
    rec = PipelineState(tmp_path).read("pretrain", TrainOutput)
    assert rec is not None and rec.output == out


def test_a_record_that_does_not_fit_its_output_type_is_stale(tmp_path: Path) -> None:
    """An evaluate record in the old flat format (label -> path) re-runs, saying why."""
    state = PipelineState(tmp_path)
    state.record("evaluate/x", "f", _Export(export="e"), 0.1)
    assert state.read("evaluate/x", EvaluateOutput) is None
    why = state.why_stale("evaluate/x", "f", output_type=EvaluateOutput)
    assert why is not None and why.startswith("recorded outputs do not fit EvaluateOutput")
    assert state.why_stale("evaluate/x", "f", output_type=_Export) is None


def test_context_runs_a_key_once_per_input_change_and_forced_stages_always(
        tmp_path: Path) -> None:
    from recsys.pipeline import PipelineConfig
    from recsys.pipeline.context import Context

    cfg = PipelineConfig.model_validate({"stages": ["examples"], "work_dir": str(tmp_path)})
    ctx = Context(cfg, PipelineState(tmp_path / "pipeline"))
    with pytest.raises(RuntimeError, match="has never run"):
        ctx.recorded("k", _Export)
    assert ctx.needed("k", "examples", {"a": 1}, [], _Export)
    ctx.finish("k", _Export(export="e"), 0.1)
    assert ctx.recorded("k", _Export).output.export == "e"
    again = Context(cfg, PipelineState(tmp_path / "pipeline"))
    assert not again.needed("k", "examples", {"a": 1}, [], _Export)
    assert again.needed("k", "examples", {"a": 2}, [], _Export)
    forced = Context(cfg.model_copy(update={"force": ["examples"]}), again.state)
    assert forced.needed("k", "examples", {"a": 1}, [], _Export)
    assert (again.result.skipped, again.result.ran, forced.result.ran) == (["k"], ["k"], ["k"])


def test_stage_overrides_reach_the_train_config_as_typed_values(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from recsys.pipeline import load_pipeline_config
    from recsys.pipeline.context import Context
    from recsys.pipeline.stages.train import train_config

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    monkeypatch.delenv("RECSYS_STORAGE_PATH", raising=False)
    cfg = load_pipeline_config("configs/pipeline/demo.yaml", [f"work_dir={tmp_path}"])
    ctx = Context(cfg, PipelineState(tmp_path / "pipeline"))
    train = train_config(ctx, "configs/train/transfer.yaml", "t", {
        "optim.lr": 1e-05, "encoder.cache_dir": "a: b", "data.sequences.max_seq_len": 7},
        mode="transfer", transfer={"init_from": "x", "strategy": "adapter_only"})
    assert train.optim.lr == 1e-05 and train.encoder.cache_dir == "a: b"
    # The pipeline's data section replaces the YAML's whole, after the dotted overrides.
    assert train.data == cfg.data and train.output_dir == str(tmp_path / "train")
    assert (train.tracking.experiment, train.resume, train.transfer.strategy) == (
        "demo", False, "adapter_only")


def test_storage_path_holds_the_pipeline_training_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """RECSYS_STORAGE_PATH set: training stages keep Ray Train storage in
    ``<it>/<pipeline name>/train`` and their exports local under the work dir; unset: the
    pipeline's work dir (the demo). Federated pretraining stays local either way."""
    from recsys.pipeline import load_pipeline_config
    from recsys.pipeline.context import Context, train_output_dir
    from recsys.pipeline.stages.train import train_config
    from recsys.training.run import run_dir

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    cfg = load_pipeline_config("configs/pipeline/demo.yaml", [f"work_dir={tmp_path}/p"])
    ctx = Context(cfg, PipelineState(tmp_path / "pipeline"))
    monkeypatch.delenv("RECSYS_STORAGE_PATH", raising=False)
    assert train_output_dir(ctx) == str(tmp_path / "p" / "train")
    monkeypatch.setenv("RECSYS_STORAGE_PATH", "s3://recsys/ray/")
    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path / "work"))
    train = train_config(ctx, "configs/train/pretrain.yaml", "pretrain", {}, mode="pretrain")
    assert train.output_dir == "s3://recsys/ray/demo/train"
    assert run_dir(train) == tmp_path / "work" / "train" / "s3" / "recsys/ray/demo/train/pretrain"
    assert train_output_dir(ctx, shared=False) == str(tmp_path / "p" / "train")
    monkeypatch.setenv("RECSYS_STORAGE_PATH", str(tmp_path / "shared"))
    assert train_output_dir(ctx) == f"{tmp_path}/shared/demo/train"
