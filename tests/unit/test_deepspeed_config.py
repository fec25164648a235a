"""DeepSpeed's JSON computed from the typed config, and the training job's config validation.

The batch sizes are derived in one place; DeepSpeed refuses a config whose
``train_batch_size != micro * accum * world``, so a mismatch would only surface on a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recsys.config import ConfigError, load_config
from recsys.training.config import DeepSpeedConfig, OptimConfig, TrainJobConfig
from recsys.training.deepspeed_config import batch_sizes, build_deepspeed_config, use_bf16

REPO = Path(__file__).resolve().parents[2]


def ds_dict(stage: int, world: int = 4, *, on_gpu: bool = False, bf16_gpu: bool = False,
            **ds: Any) -> dict[str, Any]:
    """The DeepSpeed dict for micro 8 x accum 3 on ``world`` workers (global batch 24 * world)."""
    return build_deepspeed_config(DeepSpeedConfig(zero_stage=stage, **ds),
                                  OptimConfig(micro_batch_size=8, grad_accum=3, lr=2e-3,
                                              weight_decay=0.01, grad_clip=0.5),
                                  world, on_gpu=on_gpu, gpu_supports_bf16=bf16_gpu)


# -- batch sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("micro", "accum", "world"), [(1, 1, 1), (8, 3, 4), (256, 2, 3)])
def test_global_batch_is_micro_times_accum_times_world(micro: int, accum: int, world: int) -> None:
    sizes = batch_sizes(OptimConfig(micro_batch_size=micro, grad_accum=accum), world)
    assert (sizes.micro_batch_per_worker, sizes.grad_accum, sizes.world_size) == (micro, accum,
                                                                                   world)
    assert sizes.global_batch == micro * accum * world


@pytest.mark.parametrize("world", [0, -1])
def test_batch_sizes_reject_an_empty_world(world: int) -> None:
    with pytest.raises(ValueError, match="world_size"):
        batch_sizes(OptimConfig(), world)


# -- the DeepSpeed dict ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [1, 4])
def test_deepspeed_dict_is_consistent_at_every_stage(stage: int, world: int) -> None:
    cfg = ds_dict(stage, world)
    # The identity DeepSpeed asserts in DeepSpeedConfig._batch_assertion.
    assert cfg["train_batch_size"] == (cfg["train_micro_batch_size_per_gpu"]
                                       * cfg["gradient_accumulation_steps"] * world)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 3)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 2e-3
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.01
    assert "offload_optimizer" not in cfg["zero_optimization"]
    gather = cfg["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save")
    assert gather is (True if stage == 3 else None)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_goes_to_cpu_with_a_zero_stage(stage: int) -> None:
    cfg = ds_dict(stage, offload_optimizer=True)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu",
                                                              "pin_memory": False}
    # DeepSpeedCPUAdam with offload, not torch's Adam.
    assert cfg["optimizer"]["params"]["torch_adam"] is False
    on_gpu = ds_dict(stage, on_gpu=True, bf16_gpu=True, offload_optimizer=True)
    assert on_gpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_offload_without_zero_is_refused_naming_the_keys() -> None:
    with pytest.raises(ValueError, match=r"deepspeed\.offload_optimizer.*zero_stage"):
        ds_dict(0, offload_optimizer=True)


def test_torch_adam_unless_the_optimizer_is_offloaded() -> None:
    """DeepSpeed's fused Adam would be JIT-compiled on first use (gcc on CPU, nvcc on a GPU
    node): torch's AdamW is used on both; DeepSpeedCPUAdam only with offload."""
    assert ds_dict(2)["optimizer"]["params"]["torch_adam"] is True
    assert ds_dict(2, on_gpu=True, bf16_gpu=True)["optimizer"]["params"]["torch_adam"] is True
    # Communication overlap only pays (and only works) with a GPU stream.
    assert ds_dict(2)["zero_optimization"]["overlap_comm"] is False
    assert ds_dict(2, on_gpu=True)["zero_optimization"]["overlap_comm"] is True


def test_bf16_auto_follows_the_hardware() -> None:
    assert ds_dict(2)["bf16"] == {"enabled": False}  # CPU
    assert ds_dict(2, on_gpu=True, bf16_gpu=False)["bf16"] == {"enabled": False}
    assert ds_dict(2, on_gpu=True, bf16_gpu=True)["bf16"] == {"enabled": True}
    assert use_bf16(DeepSpeedConfig(bf16=False), on_gpu=True, gpu_supports_bf16=True) is False


def test_explicit_bf16_on_a_gpu_without_bf16_is_refused() -> None:
    with pytest.raises(ValueError, match=r"deepspeed\.bf16"):
        ds_dict(2, on_gpu=True, bf16_gpu=False, bf16=True)
    assert ds_dict(2, on_gpu=True, bf16_gpu=True, bf16=True)["bf16"] == {"enabled": True}


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_accepts_the_dict(monkeypatch: pytest.MonkeyPatch, offload: bool) -> None:
    """DeepSpeed's own parser (batch assertion, sanity checks) on every stage; no process group:
    the world size comes from a stand-in model-parallel unit."""
    dsc = pytest.importorskip("deepspeed.runtime.config")

    class FourWorkers:
        def get_data_parallel_world_size(self) -> int:
            return 4

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    for stage in (1, 2, 3) if offload else (0, 1, 2, 3):
        parsed = dsc.DeepSpeedConfig(ds_dict(stage, 4, offload_optimizer=offload),
                                     mpu=FourWorkers())
        assert parsed.world_size == 4
        assert parsed.train_batch_size == 8 * 3 * 4
        assert parsed.zero_optimization_stage == stage
        assert (parsed.zero_config.offload_optimizer is not None) == offload


# -- TrainJobConfig validation --------------------------------------------------------------------


def job(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, list(overrides))


def test_transfer_needs_init_from() -> None:
    with pytest.raises(ConfigError, match=r"transfer\.init_from"):
        job("mode=transfer")
    assert job("mode=transfer", "transfer.init_from=runs/x/export").mode == "transfer"


@pytest.mark.parametrize("mode", ["pretrain", "scratch"])
@pytest.mark.parametrize("strategy", ["lora", "adapter_only"])
def test_transfer_strategies_only_apply_to_transfer(mode: str, strategy: str) -> None:
    with pytest.raises(ConfigError, match=rf"transfer\.strategy='{strategy}'.*mode=transfer"):
        job(f"mode={mode}", f"transfer.strategy={strategy}")
    cfg = job("mode=transfer", "transfer.init_from=x", f"transfer.strategy={strategy}")
    assert cfg.transfer.strategy == strategy


def test_scratch_trains_one_platform() -> None:
    with pytest.raises(ConfigError, match="train_platforms"):
        job("mode=scratch", "train_platforms=[a, b]")
    assert job("mode=scratch", "train_platforms=[a]").train_platforms == ["a"]


def test_problems_are_collected_and_raised_once() -> None:
    with pytest.raises(ConfigError) as err:
        job("mode=scratch", "train_platforms=[a, b]", "transfer.strategy=lora")
    assert "train_platforms" in str(err.value) and "transfer.strategy" in str(err.value)


def test_model_dim_must_divide_by_heads_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.dim.*model\.num_heads"):
        job("model.dim=30", "model.num_heads=4")
    assert job("model.dim=32", "model.num_heads=4").model.num_heads == 4


def test_unknown_keys_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'"):
        job("optim.learning_rate=0.1")
    with pytest.raises(ConfigError, match=r"unknown key 'deepspeed\.stage'"):
        job("deepspeed.stage=3")


def test_finetunes_encoder_follows_the_strategy() -> None:
    assert not job().finetunes_encoder
    for strategy, runs_encoder in [("full", True), ("lora", True), ("freeze_encoder", False),
                                   ("adapter_only", False)]:
        cfg = job("mode=transfer", "transfer.init_from=x", f"transfer.strategy={strategy}")
        assert cfg.finetunes_encoder is runs_encoder, strategy


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_train_configs_validate(path: Path) -> None:
    """``mode`` is injected by the job (jobs.pretrain / transfer / scratch), as here."""
    assert path.stem in ("pretrain", "transfer", "scratch"), f"no job for {path.name}"
    cfg = load_config(TrainJobConfig, path, [f"mode={path.stem}"])
    assert cfg.mode == path.stem and cfg.name
    assert batch_sizes(cfg.optim, cfg.scaling.num_workers).global_batch > 0
