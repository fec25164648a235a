"""The two ways one training step runs: DDP (torch) or DeepSpeed ZeRO, behind one small API.

The loop calls ``step(batch)``, ``save(dir)``, ``load(dir)``; which ranks write what is decided
here: DDP writes one copy from rank 0, DeepSpeed writes a shard from every rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn

from recsys.config import StrictModel
from recsys.training.config import TrainJobConfig
from recsys.training.deepspeed_config import build_deepspeed_config

STATE_FILE = "train_state.json"
DS_TAG = "ckpt"


class TrainState(StrictModel):
    """The loop's progress, saved beside every checkpoint as ``train_state.json`` (and in
    DeepSpeed's client state): a resumed run continues the epochs, the early-stopping count,
    the learning-rate decay and the learning curve where they were."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a NaN loss stays NaN in JSON

    format_version: Literal[1] = 1
    epoch: int = -1
    """The last finished epoch (-1: none yet)."""
    best: float = -1.0
    """Best validation score so far (``loop.METRIC``)."""
    bad_epochs: int = 0
    """Epochs in a row without a better validation score."""
    curve: list[dict[str, int | float]] = Field(default_factory=list)
    """One entry per finished epoch: loss, validation score, speed."""
    lr_scale: float = 1.0
    """Multiplier of the configured learning rates (reduce-on-plateau)."""
    privacy: dict[str, Any] | None = None
    """A private run's accounting after this epoch (``PrivacyPlan.card``): steps taken and
    epsilon spent; a resume continues the count, the export's card copies it."""

    def write(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(self.model_dump_json())

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        """The state saved in a checkpoint directory."""
        return cls.model_validate_json((directory / STATE_FILE).read_text())

    @classmethod
    def from_client_state(cls, client_state: dict[str, Any]) -> TrainState:
        """The state inside DeepSpeed's client state (which holds DeepSpeed's own keys too)."""
        return cls.model_validate({k: v for k, v in client_state.items()
                                   if k in cls.model_fields})


class Engine:
    """Common interface; ``module`` is the unwrapped objective (its ``.model`` is exported)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, history: torch.Tensor, target: torch.Tensor, platform: torch.Tensor,
             history_platform: torch.Tensor | None = None,
             shown: torch.Tensor | None = None) -> dict[str, float]:
        """One micro-batch (``history_platform``: a cross-platform history's item platforms;
        ``shown``: the shown-not-chosen item before each label, the CTR negatives)."""
        raise NotImplementedError

    def save(self, directory: Path, state: TrainState, rank: int) -> bool:
        """Write this rank's part; return whether this rank contributed files."""
        raise NotImplementedError

    def load(self, directory: Path) -> TrainState:
        """Restore weights and optimizer from a checkpoint; return the loop's state."""
        raise NotImplementedError

    base_lrs: list[float]

    def scale_lr(self, scale: float) -> None:
        """Every parameter group at ``scale`` times its configured rate (reduce-on-plateau)."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (non-finite gradients); DDP never skips one."""
        return 0

    def privacy_metrics(self) -> dict[str, float]:
        """Epsilon spent so far and the mechanism's numbers (a private engine only)."""
        return {}

    def privacy_params(self) -> dict[str, Any]:
        """The resolved mechanism, logged once as MLflow params (a private engine only)."""
        return {}

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


class DDPEngine(Engine):
    def __init__(self, objective: nn.Module, cfg: TrainJobConfig) -> None:
        import ray.train.torch

        self.module = objective
        self.optimizer = torch.optim.AdamW(param_groups(objective, cfg), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # Frozen parameters are ignored by DDP; only a CTR head with weight 0 goes unused, and
        # looking for unused parameters costs a walk over the autograd graph every step.
        self.wrapped = ray.train.torch.prepare_model(
            objective, parallel_strategy_kwargs={
                "find_unused_parameters": cfg.loss.ctr_weight == 0})
        self.grad_clip = cfg.optim.grad_clip
        self.accum = cfg.optim.grad_accum
        self._micro = 0

    def step(self, history: torch.Tensor, target: torch.Tensor, platform: torch.Tensor,
             history_platform: torch.Tensor | None = None,
             shown: torch.Tensor | None = None) -> dict[str, float]:
        loss, stats = self.wrapped(history, target, platform, history_platform, shown)
        # Backward first, then the checks: DDP's gradient all-reduce spreads one rank's NaN to
        # every rank, so at the optimizer step all of them stop together (none waits in a
        # collective for the one that raised), and the optimizer never applies it.
        (loss / self.accum).backward()
        check_finite("training loss", stats["loss"])
        self._micro += 1
        if self._micro % self.accum == 0:
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            check_finite("gradient norm", float(norm))
            if self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return stats

    def save(self, directory: Path, state: TrainState, rank: int) -> bool:
        if rank != 0:
            return False
        torch.save({"model": self.module.model.state_dict(),
                    "optimizer": self.optimizer.state_dict()}, directory / "ddp.pt")
        state.write(directory)
        return True

    def load(self, directory: Path) -> TrainState:
        state = TrainState.read(directory)  # first: a broken state changes no weights
        blob = torch.load(directory / "ddp.pt", map_location="cpu", weights_only=True)
        self.module.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        return state


class DeepSpeedEngine(Engine):
    def __init__(self, objective: nn.Module, cfg: TrainJobConfig, world_size: int,
                 on_gpu: bool) -> None:
        import deepspeed

        bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
        ds_cfg = build_deepspeed_config(cfg.deepspeed, cfg.optim, world_size, on_gpu=on_gpu,
                                        gpu_supports_bf16=bf16_ok)
        self.ds, _, _, _ = deepspeed.initialize(
            model=objective, model_parameters=param_groups(objective, cfg), config=ds_cfg)
        self.module = objective
        self.ds_config = ds_cfg
        self.optimizer = self.ds.optimizer  # ZeRO's wrapper exposes the param_groups
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if on_gpu:
            # ZeRO keeps the 16-bit weights as views into one flat buffer, not all 16-byte
            # aligned; the fused TransformerEncoderLayer inference path hands them to cuBLASLt,
            # which failed on an H200 with "misaligned address". The regular path is unaffected.
            torch.backends.mha.set_fastpath_enabled(False)

    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    def step(self, history: torch.Tensor, target: torch.Tensor, platform: torch.Tensor,
             history_platform: torch.Tensor | None = None,
             shown: torch.Tensor | None = None) -> dict[str, float]:
        loss, stats = self.ds(history, target, platform, history_platform, shown)
        self.ds.backward(loss)
        check_finite("training loss", stats["loss"])  # bf16/fp32: DeepSpeed would apply it
        self.ds.step()
        return stats

    def save(self, directory: Path, state: TrainState, rank: int) -> bool:
        # Every rank writes its ZeRO shard into its own copy of the directory; Ray Train merges
        # the per-rank directories into one checkpoint.
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state=state.model_dump())
        if rank == 0:
            state.write(directory)
        return True

    def load(self, directory: Path) -> TrainState:
        _, client_state = self.ds.load_checkpoint(str(directory), tag=DS_TAG)
        if client_state is None:
            raise RuntimeError(f"{directory}: DeepSpeed checkpoint has no client state")
        return TrainState.from_client_state(client_state)


def check_finite(what: str, value: float) -> None:
    """Stop before an optimizer step on a NaN or infinite loss or gradient: applied, it turns
    every weight into NaN and the rest of the run trains on nothing (the loop adds the step)."""
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite {what} ({value})")


def param_groups(objective: nn.Module, cfg: TrainJobConfig) -> list[dict[str, Any]]:
    """Trainable parameters in up to two optimizer groups: the towers and heads at
    ``optim.lr``; the text encoder's trained weights (``full``: all of them, ``lora``: the
    adapters) at ``encoder.lr`` / ``encoder.lora.lr``. Groups without parameters are left out."""
    encoder_lr = (cfg.encoder.lora.lr if cfg.transfer.strategy == "lora" else cfg.encoder.lr)
    towers: list[nn.Parameter] = []
    encoder: list[nn.Parameter] = []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (encoder if ".text_encoder." in f".{name}" else towers).append(p)
    groups = [{"params": towers, "lr": cfg.optim.lr}, {"params": encoder, "lr": encoder_lr}]
    return [g for g in groups if g["params"]]


def make_engine(objective: nn.Module, cfg: TrainJobConfig, world_size: int,
                on_gpu: bool) -> Engine:
    if cfg.scaling.engine == "deepspeed":
        return DeepSpeedEngine(objective, cfg, world_size, on_gpu)
    return DDPEngine(objective, cfg)


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a DDP or DeepSpeed (any ZeRO stage) checkpoint."""
    if (checkpoint_dir / "ddp.pt").exists():
        blob = torch.load(checkpoint_dir / "ddp.pt", map_location="cpu", weights_only=True)
        return blob["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG)
    # The engine wrapped the objective: model weights are under "model.".
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
