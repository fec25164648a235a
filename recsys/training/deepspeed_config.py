"""DeepSpeed's JSON config, computed from the typed config in one place.

``train_batch_size = micro_batch * grad_accum * world_size`` is derived here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recsys.training.config import DeepSpeedConfig, OptimConfig


@dataclass(frozen=True)
class BatchSizes:
    micro_batch_per_worker: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_per_worker * self.grad_accum * self.world_size


def batch_sizes(optim: OptimConfig, world_size: int) -> BatchSizes:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return BatchSizes(optim.micro_batch_size, optim.grad_accum, world_size)


def use_bf16(ds: DeepSpeedConfig, on_gpu: bool, gpu_supports_bf16: bool) -> bool:
    if ds.bf16 == "auto":
        return on_gpu and gpu_supports_bf16
    if ds.bf16 and on_gpu and not gpu_supports_bf16:
        raise ValueError("deepspeed.bf16=true but this GPU does not support bf16")
    return bool(ds.bf16)


def build_deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, world_size: int, *,
                           on_gpu: bool, gpu_supports_bf16: bool = False) -> dict[str, Any]:
    """The dict for ``deepspeed.initialize(config=...)``.

    The optimizer is DeepSpeed's AdamW: with ``offload_optimizer`` that is DeepSpeedCPUAdam,
    otherwise torch's own (``torch_adam``), on CPU and GPU alike. DeepSpeed's FusedAdam would be
    JIT-compiled on first use (~73 s with gcc on CPU, STACK_NOTES; on a GPU node it needs nvcc,
    which CUDA *runtime* images lack), and torch's AdamW already runs as multi-tensor (foreach)
    kernels on CUDA: for a model of this size the step is not where the time goes.
    """
    sizes = batch_sizes(optim, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": sizes.global_batch,
        "train_micro_batch_size_per_gpu": sizes.micro_batch_per_worker,
        "gradient_accumulation_steps": sizes.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "weight_decay": optim.weight_decay,
                       "torch_adam": not ds.offload_optimizer},
        },
        "bf16": {"enabled": use_bf16(ds, on_gpu, gpu_supports_bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        # Gather full weights on save so a consolidated model can be exported from rank 0 too.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg
