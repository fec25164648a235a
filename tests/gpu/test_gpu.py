"""The GPU paths, end to end under Ray Train with one GPU worker: DeepSpeed ZeRO-2/3 in bf16 over
NCCL, checkpoint consolidation to an export, and the two strategies that put the text encoder in
every training step (``full``, ``lora``). Marked ``gpu``: CI has no GPU, and these skip there.

``RECSYS_GPU_TESTS_ON_CPU=1`` runs the same tests on CPU workers (gloo, fp32), to check the tests
themselves on a machine without a GPU; the GPU-only assertions then do not apply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsys.config import apply_overrides
from recsys.model.export import load_export
from recsys.training.config import TrainJobConfig
from recsys.training.run import TrainOutcome, run_training

ON_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU and not os.environ.get("RECSYS_GPU_TESTS_ON_CPU"),
                       reason="needs a CUDA GPU (RECSYS_GPU_TESTS_ON_CPU=1 runs them on CPU)"),
]
SOURCES = ["shop_a", "shop_b"]
TARGET = "shop_c"


def _cfg(examples: Any, tmp: Path, name: str, **over: Any) -> TrainJobConfig:
    base: dict[str, Any] = {
        "name": name, "mode": "pretrain", "train_platforms": SOURCES,
        "data": {"examples": str(examples.path), "sequences": {"max_seq_len": 20},
                 "text": examples.manifest.config.text.model_dump(mode="json")},
        "model": {"dim": 32, "num_layers": 1, "num_heads": 2, "num_experts": 2},
        "optim": {"epochs": 2, "micro_batch_size": 128, "lr": 0.003},
        "encoder": {"cache_dir": str(tmp / "cache")},
        "deepspeed": {"zero_stage": 2, "bf16": "auto"},
        "scaling": {"engine": "deepspeed", "num_workers": 1, "use_gpu": ON_GPU,
                    "cpus_per_worker": 0.5, "max_failures": 0},
        "tracking": {"enabled": False},
        "output_dir": str(tmp / "runs"),
        "resume": False,
    }
    return TrainJobConfig.model_validate(
        apply_overrides(base, [f"{key}={value}" for key, value in over.items()]))


def _check_trained(out: TrainOutcome, epochs: int) -> dict[str, Any]:
    """Every epoch ran, on the GPU when there is one, and the export ranks the test users."""
    assert [int(p["epoch"]) for p in out.curve] == list(range(epochs))
    assert all(np.isfinite(p["train_loss"]) for p in out.curve)
    exported = load_export(out.export_dir)
    if ON_GPU:  # the worker's peak CUDA memory is part of every epoch's metrics
        assert exported.meta.metrics["gpu_max_memory_gib"] > 0
    for plat, r in out.report.platforms.items():
        assert r.users > 0 and 0.0 <= r.metrics["ndcg@10"] <= r.metrics["recall@10"] <= 1.0, plat
    return exported.meta.model_dump(by_alias=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="module")
def pretrained_zero2(ray_cluster, synthetic_examples, workdir: Path) -> TrainOutcome:
    return run_training(_cfg(synthetic_examples, workdir, "pretrain-zero2"))


def test_deepspeed_zero2_bf16_pretrains_and_exports(pretrained_zero2: TrainOutcome) -> None:
    meta = _check_trained(pretrained_zero2, 2)
    assert meta["train_config"]["scaling"]["engine"] == "deepspeed"
    if ON_GPU:
        from recsys.training.deepspeed_config import build_deepspeed_config

        cfg = TrainJobConfig.model_validate(meta["train_config"])
        ds = build_deepspeed_config(cfg.deepspeed, cfg.optim, 1, on_gpu=True,
                                    gpu_supports_bf16=torch.cuda.is_bf16_supported())
        assert ds["bf16"]["enabled"] is torch.cuda.is_bf16_supported()


def test_deepspeed_zero3_resumes_from_its_sharded_checkpoint(ray_cluster, synthetic_examples,
                                                             workdir: Path) -> None:
    """ZeRO-3 partitions the parameters themselves: a resumed run must find them all again."""
    first = run_training(_cfg(synthetic_examples, workdir, "zero3",
                              **{"deepspeed.zero_stage": 3, "optim.epochs": 1}))
    _check_trained(first, 1)
    again = run_training(_cfg(synthetic_examples, workdir, "zero3",
                              **{"deepspeed.zero_stage": 3, "optim.epochs": 2, "resume": True}))
    _check_trained(again, 2)
    assert again.curve[0]["valid_ndcg@10"] == pytest.approx(first.curve[0]["valid_ndcg@10"])


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_encoder_in_the_step_transfers_and_exports_its_own_vectors(
        pretrained_zero2: TrainOutcome, synthetic_examples, workdir: Path,
        strategy: str) -> None:
    """``full`` / ``lora`` run the text encoder in every step on the GPU; the export then holds
    catalog vectors from the fine-tuned encoder, not the frozen ones the source model used."""
    out = run_training(_cfg(
        synthetic_examples, workdir, f"transfer-{strategy}",
        **{"mode": "transfer", "train_platforms": [TARGET], "optim.epochs": 1,
           "transfer.init_from": str(pretrained_zero2.export_dir),
           "transfer.strategy": strategy, "loss.kind": "sampled_softmax",
           "loss.num_negatives": 64}))
    meta = _check_trained(out, 1)
    assert meta["strategy"] == strategy
    before = load_export(pretrained_zero2.export_dir).items["shop_a"].text_vecs
    after = load_export(out.export_dir).items["shop_a"].text_vecs
    assert before.shape == after.shape
    assert not np.allclose(before[1:], after[1:], atol=1e-6)  # the encoder itself trained
