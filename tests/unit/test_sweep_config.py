"""The sweep schema: every shipped sweep loads, bad keys/ranges/values fail naming the key, trial
configs are base + sampled values + resources, and the resource check refuses sweeps that would
deadlock a 2-CPU cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import ConfigError, load_config
from recsys.tuning.config import SweepConfig, load_sweep, trial_config, validate_sweep
from recsys.tuning.sweep import check_fits, param_space, registry_platform, trial_resources

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "tune" / "sweeps").glob("*.yaml"))


def _write(tmp: Path, body: str) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(body)
    return path


BASE = f"""
name: t
base_config: {REPO}/configs/train/scratch.yaml
"""


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # base_config paths in shipped sweeps are relative to the repo


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_is_valid(path: Path) -> None:
    cfg = load_sweep(path)
    assert cfg.search_space and cfg.name == path.stem
    base = validate_sweep(cfg, str(path))
    assert registry_platform(cfg, base)
    assert set(param_space(cfg)["params"]) == set(cfg.search_space)


def test_shipped_sweeps_exist() -> None:
    assert {p.name for p in SWEEPS} >= {"demo.yaml", "scientific_transfer.yaml"}


def test_unknown_search_key_is_named(tmp_path: Path) -> None:
    f = _write(tmp_path, BASE + "search_space: {optim.lrr: {kind: choice, values: [1]}}\n")
    with pytest.raises(ConfigError, match=r"search_space.optim.lrr: unknown key 'lrr' in optim"):
        load_sweep(f)
    f = _write(tmp_path, BASE + "search_space: {optim: {kind: choice, values: [1]}}\n")
    with pytest.raises(ConfigError, match="is a section"):
        load_sweep(f)
    f = _write(tmp_path, BASE + "search_space: {optim.lr.x: {kind: choice, values: [1]}}\n")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_sweep(f)


@pytest.mark.parametrize("spec,match", [
    ("{kind: loguniform, low: 0, high: 1}", "low > 0"),
    ("{kind: uniform, low: 2, high: 1}", "must be below"),
    ("{kind: choice, values: []}", "non-empty"),
    ("{kind: uniform, low: 1}", "needs `low` and `high`"),
    ("{kind: randint, low: 1.5, high: 4}", "integer"),
])
def test_bad_ranges_fail(tmp_path: Path, spec: str, match: str) -> None:
    f = _write(tmp_path, BASE + f"search_space: {{optim.lr: {spec}}}\n")
    with pytest.raises(ConfigError, match=match):
        load_sweep(f)


def test_values_the_training_schema_rejects_are_named(tmp_path: Path) -> None:
    f = _write(tmp_path, BASE + "search_space:\n  model.dropout: {kind: uniform, low: 0.1, "
               "high: 1.5}\n  model.dim: {kind: choice, values: [64, 33]}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(f)
    text = str(err.value)
    assert "search_space.model.dropout=1.5" in text and "search_space.model.dim=33" in text


def test_grid_needs_the_variant_generator(tmp_path: Path) -> None:
    f = _write(tmp_path, BASE + "search_space: {optim.lr: {kind: grid, values: [0.1, 0.2]}}\n"
               "search: {algorithm: optuna}\n")
    with pytest.raises(ConfigError, match="kind=grid needs search.algorithm=random"):
        load_config(SweepConfig, f)


def test_missing_base_config_is_named(tmp_path: Path) -> None:
    f = _write(tmp_path, "name: t\nbase_config: nowhere.yaml\n"
               "search_space: {optim.lr: {kind: choice, values: [0.1]}}\n")
    with pytest.raises(ConfigError, match="base_config: config file not found: nowhere.yaml"):
        load_sweep(f)


def test_trial_config_is_base_plus_sample_plus_resources(tmp_path: Path) -> None:
    f = _write(tmp_path, BASE + "base_overrides: [optim.epochs=3]\n"
               "search_space: {optim.lr: {kind: loguniform, low: 1e-4, high: 1e-2}}\n"
               "resources: {num_workers: 1, use_gpu: true}\n")
    cfg = load_sweep(f)
    base = validate_sweep(cfg, str(f))
    t = trial_config(base, {"optim.lr": 0.005, "model.dim": 32}, name="t-abc",
                     output_dir="/x/trials", resources=cfg.resources, resume=False)
    assert (t.optim.lr, t.model.dim, t.optim.epochs) == (0.005, 32, 3)
    assert (t.name, t.output_dir, t.resume) == ("t-abc", "/x/trials", False)
    assert (t.scaling.num_workers, t.scaling.use_gpu) == (1, True)
    assert t.train_platforms == ["shop_c"]  # from scratch.yaml


def test_resource_check_on_two_cpus(tmp_path: Path) -> None:
    f = _write(tmp_path, BASE + "search_space: {optim.lr: {kind: choice, values: [0.1]}}\n"
               "num_samples: 4\nmax_concurrent_trials: 2\n")
    cfg = load_sweep(f)
    base = validate_sweep(cfg, str(f))
    assert trial_resources(cfg, base) == {"CPU": 1.0, "GPU": 0.0}  # 2 workers x 0.5
    with pytest.raises(ConfigError, match="2 concurrent trial"):
        check_fits(cfg, base, {"CPU": 2.0})
    check_fits(cfg.model_copy(update={"max_concurrent_trials": 1}), base, {"CPU": 2.0})
    half = cfg.model_copy(update={"resources": cfg.resources.model_copy(
        update={"num_workers": 1})})
    check_fits(half, base, {"CPU": 2.0})  # two trials of 1 x 0.5 CPU fit
    gpu = cfg.model_copy(update={"resources": cfg.resources.model_copy(
        update={"use_gpu": True, "num_workers": 1})})
    assert trial_resources(gpu, base) == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ConfigError, match="GPUs"):
        check_fits(gpu, base, {"CPU": 16.0, "GPU": 1.0})
    check_fits(gpu, base, {"CPU": 16.0, "GPU": 2.0})


def test_registry_platform_needs_a_single_platform(tmp_path: Path) -> None:
    f = _write(tmp_path, f"name: t\nbase_config: {REPO}/configs/train/pretrain.yaml\n"
               "search_space: {optim.lr: {kind: choice, values: [0.1]}}\n")
    cfg = load_sweep(f)
    base = validate_sweep(cfg, str(f))
    with pytest.raises(ConfigError, match="registry.platform"):
        registry_platform(cfg, base)
    cfg2 = cfg.model_copy(update={"metric": cfg.metric.model_copy(update={"platform": "shop_a"})})
    assert registry_platform(cfg2, base) == "shop_a"
    assert cfg2.metric.key == "valid_ndcg@10/shop_a"


def test_result_table_and_plot(tmp_path: Path) -> None:
    import csv

    from recsys.tuning.sweep import TrialRow, write_results

    f = _write(tmp_path, BASE + "search_space:\n  optim.lr: {kind: loguniform, low: 1e-4, "
               "high: 1e-2}\n  model.dim: {kind: choice, values: [32, 64]}\n")
    cfg = load_sweep(f)
    rows = [TrialRow(f"abcde_0000{i}", f"t{i}", {"optim.lr": lr, "model.dim": dim}, status,
                     epochs, metric, 0, None, None, 1.5)
            for i, (lr, dim, status, epochs, metric) in enumerate([
                (1e-3, 32, "completed", 4, 0.12), (1e-4, 64, "early_stopped", 1, 0.05),
                (3e-3, 64, "completed", 4, 0.15), (5e-3, 32, "errored", 0, None)])]
    files = write_results(cfg, rows, tmp_path / "results")
    table = list(csv.DictReader(files["csv"].open()))
    assert [r["status"] for r in table] == ["completed", "early_stopped", "completed", "errored"]
    assert table[2]["valid_ndcg@10"] == "0.15" and table[1]["model.dim"] == "64"
    assert "early_stopped" in files["md"].read_text()
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
