from pathlib import Path

import pytest

from recsys.config import ConfigError, apply_overrides, load_config, parse_override, set_dotted
from recsys.data.examples import DataConfig
from recsys.pipeline import PipelineConfig

REPO = Path(__file__).resolve().parents[2]


def test_parse_override_types() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("x=[a, b]") == ("x", ["a", "b"])
    assert parse_override("flag=true") == ("flag", True)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("nonsense")


def test_apply_overrides_nested() -> None:
    data = apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e=x"])
    assert data == {"a": {"b": 1, "c": 2}, "d": {"e": "x"}}
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_set_dotted_takes_typed_values_and_creates_sections() -> None:
    data: dict = {"optim": {"lr": 1.0}, "transfer": None}
    set_dotted(data, "optim.lr", 3e-4)
    set_dotted(data, "transfer.init_from", "runs/x")
    set_dotted(data, "data", {"lake": "l"})
    assert data == {"optim": {"lr": 3e-4}, "transfer": {"init_from": "runs/x"},
                    "data": {"lake": "l"}}
    with pytest.raises(ConfigError, match="'lr' is a value"):
        set_dotted(data, "optim.lr.x", 1)
    with pytest.raises(ConfigError, match="empty key segment"):
        set_dotted(data, "optim..lr", 1)


def test_typed_values_apply_after_strings_in_order() -> None:
    """A whole section set after a dotted key replaces it; a dotted key after it wins."""
    data = apply_overrides({}, ["a.b=1"], {"a.c": "x y", "d": {"e": 1}, "d.e": 2})
    assert data == {"a": {"b": 1, "c": "x y"}, "d": {"e": 2}}
    assert apply_overrides({}, values={"d.e": 2, "d": {"f": 3}}) == {"d": {"f": 3}}


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lake: x\nsequences:\n  max_seq_lenn: 3\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, f)
    assert "unknown key 'sequences.max_seq_lenn'" in str(err.value)
    assert "unknown key 'bogus'" in str(err.value)


def test_invalid_values_fail_fast() -> None:
    with pytest.raises(ConfigError, match="min_seq_len"):
        load_config(DataConfig, None, ["sequences.min_seq_len=2"])
    with pytest.raises(ConfigError, match="event_types"):
        load_config(DataConfig, None, ["sequences.event_types=[view, teleport]"])


def test_override_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("sequences: {max_seq_len: 10}\n")
    cfg = load_config(DataConfig, f, ["sequences.max_seq_len=20"])
    assert cfg.sequences.max_seq_len == 20
    cfg = load_config(DataConfig, f, ["sequences.max_seq_len=20"],
                      values={"sequences.max_seq_len": 30, "lake": "runs/x"})
    assert cfg.sequences.max_seq_len == 30 and cfg.lake == "runs/x"
    with pytest.raises(ConfigError, match="min_seq_len"):
        load_config(DataConfig, f, values={"sequences.min_seq_len": 2})


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pipeline").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_pipeline_configs_validate(path: Path) -> None:
    cfg = load_config(PipelineConfig, path)
    assert cfg.stages


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "data").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_data_configs_validate(path: Path) -> None:
    load_config(DataConfig, path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_eval_configs_validate(path: Path) -> None:
    from recsys.evaluation.offline import EvaluateConfig

    cfg = load_config(EvaluateConfig, path)
    assert cfg.exports


def test_absolute_paths_for_processes_that_run_elsewhere(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys.training.config import TrainJobConfig, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "enc").mkdir()
    cfg = TrainJobConfig.model_validate({
        "mode": "transfer", "transfer": {"init_from": "runs/train/pretrain/export"},
        "data": {"lake": "runs/demo/lake", "examples": "s3://bucket/examples",
                 "text": {"encoder": "enc"}},
        "output_dir": "/abs/out"})
    out = with_absolute_paths(cfg)
    assert out.data.lake == str(tmp_path / "runs/demo/lake")
    assert out.data.examples == "s3://bucket/examples" and out.output_dir == "/abs/out"
    assert out.transfer.init_from == str(tmp_path / "runs/train/pretrain/export")
    assert out.encoder.cache_dir == str(tmp_path / "runs/cache/encoder")
    assert out.data.text.encoder == str(tmp_path / "enc")
    hub = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "text": cfg.data.text.model_copy(update={"encoder": "sentence-transformers/x"})})})
    assert with_absolute_paths(hub).data.text.encoder == "sentence-transformers/x"
    assert TrainJobConfig.model_validate(out.model_dump()) == out
