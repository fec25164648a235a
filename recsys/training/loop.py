"""The per-worker training loop run by Ray Train (``TorchTrainer(train_loop_per_worker=...)``).

Each epoch: train on this worker's shard, evaluate the validation shard (full ranking; sums are
all-reduced so every rank sees the same metrics and takes the same early-stopping decision),
then every rank saves its part of the checkpoint and calls ``ray.train.report`` (a barrier).
Shaped like a torchtune recipe: :func:`train_loop_per_worker` calls :func:`setup`, then per
epoch :func:`train_one_epoch`, :func:`validate`, :func:`update_state` and
:func:`save_checkpoint`. Rank-dependent side effects (MLflow) are in :func:`log_epoch` only.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recsys.evaluation.metrics import ranking_metrics
from recsys.logs import WORKER_CONSOLE
from recsys.training.checkpoints import earlier_checkpoints, restore
from recsys.training.collectives import all_reduce
from recsys.training.config import OptimConfig, TrainJobConfig
from recsys.training.engine import TrainState
from recsys.training.items import ItemInputs, keep_user
from recsys.training.model_setup import build_model
from recsys.training.objective import PlatformTensors, RecommenderObjective

if TYPE_CHECKING:
    from recsys.tracking.runs import RunRef
    from recsys.training.engine import Engine

log = logging.getLogger(__name__)

METRIC = "valid_ndcg@10"
KS = (10, 50)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _filter_users(batch: Any, fraction: float, seed: int) -> Any:
    """Ray Data batch filter for the low-data setting (same users on every worker)."""
    return batch.filter(keep_user(batch["user_id"].to_pylist(), fraction, seed))


def should_stop(bad_epochs: int, epoch: int, optim: OptimConfig) -> bool:
    """Early stopping: ``patience`` epochs without a better validation score, and not before
    ``min_epochs`` epochs (0-based ``epoch`` just finished)."""
    return epoch + 1 >= optim.min_epochs and bad_epochs >= optim.early_stopping_patience


def lr_scale_after(scale: float, bad_epochs: int, optim: OptimConfig) -> float:
    """Learning-rate multiplier after an epoch that left ``bad_epochs`` epochs in a row without
    a better validation score: decays by ``lr_decay`` each ``lr_decay_patience`` of them."""
    if optim.lr_decay < 1 and bad_epochs and bad_epochs % optim.lr_decay_patience == 0:
        return scale * optim.lr_decay
    return scale


def check_epoch(epoch: int, losses: list[float], skipped_steps: int,
                optimizer_steps: int) -> None:
    """Fail loudly on an epoch that trained nothing: a non-finite loss, or every optimizer step
    skipped (DeepSpeed skips a step whose gradients are not finite, and says nothing).
    ``losses``: one per micro-batch; ``optimizer_steps``: the updates they made up."""
    if losses and not np.isfinite(losses).all():
        raise FloatingPointError(f"epoch {epoch}: non-finite training loss "
                                 f"({sum(not np.isfinite(x) for x in losses)} of {len(losses)} "
                                 "steps)")
    if optimizer_steps and skipped_steps >= optimizer_steps:
        raise FloatingPointError(f"epoch {epoch}: all {optimizer_steps} optimizer steps were "
                                 "skipped (non-finite gradients); nothing trained")


def evaluate_shard(model: torch.nn.Module, platforms: dict[int, PlatformTensors],
                   shard: Any, cfg: TrainJobConfig, platform_ids: dict[str, int],
                   device: torch.device, part: tuple[int, int] | None = None
                   ) -> dict[str, float]:
    """Full-ranking validation metrics over all workers' shards (sums all-reduced); ``part`` =
    (rank, world) when every worker reads the split whole (``feed.SPLIT_DATASETS``)."""
    from recsys.data.feed import iter_batches
    from recsys.evaluation.ranking import rank_batches

    batches = iter_batches(shard, 512, cfg.data.sequences.max_seq_len,
                           platform_ids=platform_ids, device=device, part=part,
                           length_buckets=cfg.optim.length_buckets, seed=0)
    ranks = rank_batches(model, platforms, batches)
    names = sorted(platform_ids, key=platform_ids.get)  # a fixed row order on every rank
    row = {platform_ids[name]: i for i, name in enumerate(names)}
    keys = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg")] + ["mrr"]
    # One row per platform: [count, sum of each metric]; summed over ranks.
    sums = torch.zeros(len(names), 1 + len(keys), dtype=torch.float64)
    for pid, r in ranks.items():
        m = ranking_metrics(r["rank"], ks=KS)
        n = len(r["rank"])
        sums[row[pid], 0] = n
        sums[row[pid], 1:] = torch.tensor([m[k] * n for k in keys], dtype=torch.float64)
    sums = all_reduce(sums)
    out: dict[str, float] = {}
    total = sums.sum(0)
    for i_row, name in enumerate(names):
        n = float(sums[i_row, 0])
        if n:
            for i, k in enumerate(keys):
                out[f"valid_{k}/{name}"] = float(sums[i_row, 1 + i]) / n
    if float(total[0]):
        for i, k in enumerate(keys):
            out[f"valid_{k}"] = float(total[1 + i]) / float(total[0])
    out["valid_users"] = float(total[0])
    return out


def _quiet_report_logs() -> None:
    """Ray Train V2 logs every ``report`` call with all its metrics at INFO (a logger named by
    its file path); the rank-0 epoch line already says what matters."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@dataclass(frozen=True)
class WorkerConfig:
    """``train_loop_config`` as the worker reads it: built by the driver (``to_loop_config``),
    shipped by Ray as a plain dict, re-validated on the worker (``from_loop_config``)."""

    cfg: TrainJobConfig
    items_ref: Any
    """Object reference of the driver's ``ItemInputs``."""
    platform_ids: dict[str, int]
    model_platforms: list[str]
    init_state: dict[str, Any] | None
    """``{"config", "state_dict"}`` of the pretrained export a transfer run starts from."""
    tracking: RunRef | None

    def to_loop_config(self) -> dict[str, Any]:
        return {"job": self.cfg.model_dump(mode="json"), "items_ref": self.items_ref,
                "platform_ids": self.platform_ids, "model_platforms": self.model_platforms,
                "init_state": self.init_state,
                "tracking": None if self.tracking is None else asdict(self.tracking)}

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> WorkerConfig:
        tracking = None
        if config.get("tracking"):
            from recsys.tracking.runs import RunRef

            tracking = RunRef(**config["tracking"])
        return cls(cfg=TrainJobConfig.model_validate(config["job"]),
                   items_ref=config["items_ref"], platform_ids=dict(config["platform_ids"]),
                   model_platforms=list(config["model_platforms"]),
                   init_state=config.get("init_state"), tracking=tracking)


@dataclass
class Worker:
    """What ``setup`` built on this worker; the epoch functions read it, and only
    ``update_state`` changes it (the ``state`` it holds)."""

    cfg: TrainJobConfig
    rank: int
    world: int
    device: torch.device
    platform_ids: dict[str, int]
    tensors: dict[int, PlatformTensors]
    objective: RecommenderObjective
    engine: Engine
    state: TrainState
    train_shard: Any
    valid_shard: Any
    tracking: RunRef | None
    setup_seconds: float


@dataclass(frozen=True)
class EpochTraining:
    """One epoch's training pass on this worker."""

    losses: list[float]  # one per micro-batch
    sequences: int
    seconds: float
    skipped_steps: int


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function: setup, then per epoch train, validate, keep state, report."""
    entered = time.time()
    _quiet_report_logs()
    w = setup(WorkerConfig.from_loop_config(config), entered)
    if w.rank == 0:
        log_start(w)
    for epoch in range(w.state.epoch + 1, w.cfg.optim.epochs):
        t0 = time.perf_counter()
        trained = train_one_epoch(w, epoch)
        metrics = epoch_metrics(w, epoch, trained, validate(w), t0)
        update_state(w, epoch, metrics)
        stop = should_stop(w.state.bad_epochs, epoch, w.cfg.optim)
        if w.rank == 0:
            log_epoch(w, epoch, metrics)
        save_checkpoint(w, metrics)
        _maybe_fail(w.cfg, epoch, w.rank)
        if stop:
            if w.rank == 0:
                print(f"early stop: no better {METRIC} for {w.state.bad_epochs} epochs",
                      flush=True)
            break


def setup(wc: WorkerConfig, entered: float) -> Worker:
    """Model, item tensors, engine and datasets of this worker; restores a checkpoint if Ray
    hands one over (a resumed run or a restarted worker group)."""
    import ray
    import ray.train
    import ray.train.torch

    from recsys.training.engine import make_engine

    cfg = wc.cfg
    inputs: ItemInputs = ray.get(wc.items_ref)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.optim.seed + rank)
    model = build_model(cfg, inputs, wc.init_state, wc.model_platforms)
    model.to(device)
    tensors = {inputs.items[p].platform_id: PlatformTensors.from_items(inputs.items[p], device)
               for p in inputs.items}
    objective = RecommenderObjective(model, cfg.loss, tensors,
                                     refresh_every=cfg.encoder.refresh_every_steps)
    train_shard = ray.train.get_dataset_shard("train")
    if cfg.privacy.enabled:  # draws its own Poisson batches of users from the shard
        from recsys.training.dp_engine import make_dp_engine

        engine: Engine = make_dp_engine(objective, cfg, train_shard, wc.platform_ids)
    else:
        engine = make_engine(objective, cfg, world, on_gpu=device.type == "cuda")
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore(engine, [checkpoint, *earlier_checkpoints(checkpoint)])
        engine.scale_lr(state.lr_scale)
        log.info("rank %d resumed after epoch %d (best %s %.4f)", rank, state.epoch, METRIC,
                 state.best)
    return Worker(cfg=cfg, rank=rank, world=world, device=device,
                  platform_ids=wc.platform_ids, tensors=tensors, objective=objective,
                  engine=engine, state=state, train_shard=train_shard,
                  valid_shard=ray.train.get_dataset_shard("valid"), tracking=wc.tracking,
                  setup_seconds=time.time() - entered)  # model, item tensors, restore, shards


def train_one_epoch(w: Worker, epoch: int) -> EpochTraining:
    """One pass over this worker's training shard; fails on an epoch that trained nothing."""
    from recsys.data.feed import iter_batches

    cfg, engine = w.cfg, w.engine
    t0 = time.perf_counter()
    engine.train()
    skipped_before = engine.skipped_steps()
    if cfg.privacy.enabled:
        from recsys.training.dp_engine import DPEngine

        assert isinstance(engine, DPEngine)
        losses, seen = engine.train_epoch(epoch)
        return EpochTraining(losses, seen, time.perf_counter() - t0, 0)
    batches = iter_batches(w.train_shard, cfg.optim.micro_batch_size,
                           cfg.data.sequences.max_seq_len, shuffle_buffer=4096,
                           seed=cfg.optim.seed + epoch * 1000 + w.rank,
                           platform_ids=w.platform_ids, device=w.device,
                           length_buckets=cfg.optim.length_buckets)
    losses, seen = train_steps(engine, batches, epoch)
    seconds = time.perf_counter() - t0
    skipped = engine.skipped_steps() - skipped_before
    check_epoch(epoch, losses, skipped, len(losses) // cfg.optim.grad_accum)
    return EpochTraining(losses, seen, seconds, skipped)


def train_steps(engine: Engine, batches: Iterable[dict[str, torch.Tensor]],
                epoch: int) -> tuple[list[float], int]:
    """One step per micro-batch; returns the losses and the number of sequences. A NaN or
    infinite loss or gradient fails the epoch at the step where it appears (the engine checks
    before the optimizer applies it), naming epoch and step: the run fails instead of training
    on NaN."""
    losses: list[float] = []
    seen = 0
    for step, batch in enumerate(batches):
        try:
            stats = engine.step(batch["history"], batch["target"], batch["platform"],
                                batch.get("history_platform"), batch.get("shown"))
        except FloatingPointError as e:
            raise FloatingPointError(f"epoch {epoch}, step {step}: {e}; the run stops rather "
                                     "than train on it (lower optim.lr or optim.grad_clip, or "
                                     "look for broken inputs)") from e
        losses.append(stats["loss"])
        seen += len(batch["target"])
    return losses, seen


def validate(w: Worker) -> dict[str, float]:
    """Full-ranking validation metrics, the same on every rank (a collective call)."""
    from recsys.data.feed import SPLIT_DATASETS

    w.engine.eval()
    return evaluate_shard(w.objective.model, w.tensors, w.valid_shard, w.cfg, w.platform_ids,
                          w.device,
                          part=None if "valid" in SPLIT_DATASETS else (w.rank, w.world))


def epoch_metrics(w: Worker, epoch: int, trained: EpochTraining, valid: dict[str, float],
                  t0: float) -> dict[str, float]:
    """What an epoch reports: validation, training loss and speed (all ranks' sequences)."""
    seen_all = float(all_reduce(torch.tensor([float(trained.sequences)],
                                              dtype=torch.float64))[0])
    metrics = dict(valid)
    metrics.update(epoch=epoch,
                   train_loss=float(np.mean(trained.losses)) if trained.losses else float("nan"),
                   train_seconds=trained.seconds,
                   sequences_per_s=seen_all / trained.seconds,
                   epoch_seconds=time.perf_counter() - t0,  # train + validation
                   setup_seconds=w.setup_seconds, epoch_end_time=time.time(),
                   skipped_steps=trained.skipped_steps, **w.engine.privacy_metrics())
    if w.device.type == "cuda":  # this process's peak so far (weights, optimizer, activations)
        metrics["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(w.device) / 2**30
    return metrics


def update_state(w: Worker, epoch: int, metrics: dict[str, float]) -> None:
    """Best score, bad epochs, learning-rate decay and curve after an epoch; adds ``lr`` (the
    rate this epoch trained with) and the best score to ``metrics``."""
    state, optim = w.state, w.cfg.optim
    improved = metrics.get(METRIC, 0.0) > state.best
    state.best = max(state.best, metrics.get(METRIC, 0.0))
    state.bad_epochs = 0 if improved else state.bad_epochs + 1
    state.epoch = epoch
    metrics["lr"] = optim.lr * state.lr_scale
    scale = lr_scale_after(state.lr_scale, state.bad_epochs, optim)
    if scale != state.lr_scale:
        state.lr_scale = scale
        w.engine.scale_lr(scale)
    state.curve.append({k: metrics[k] for k in ("epoch", "train_loss", METRIC,
                                                "train_seconds", "sequences_per_s",
                                                "gpu_max_memory_gib", "skipped_steps",
                                                "privacy_epsilon")
                        if k in metrics})
    metrics["best_" + METRIC] = state.best


def save_checkpoint(w: Worker, metrics: dict[str, float]) -> None:
    """Every rank saves its part (DDP: rank 0 only; DeepSpeed: every ZeRO shard), then
    ``ray.train.report`` (a barrier) with the checkpoint of the ranks that wrote one."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        wrote = w.engine.save(Path(d), w.state, w.rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if wrote else None)


def log_start(w: Worker) -> None:
    """Rank 0, once per (re)start: a private run's resolved mechanism as MLflow params (the
    noise multiplier, delta and sample rate are computed on the worker, from its users)."""
    params = w.engine.privacy_params()
    if not params:
        return
    print(f"{WORKER_CONSOLE}{w.cfg.name}  DP-SGD  " + "  ".join(
        f"{k.split('.', 1)[1]} {v:.4g}" if isinstance(v, float) else f"{k.split('.', 1)[1]} {v}"
        for k, v in params.items()), file=sys.__stdout__, flush=True)
    if w.tracking is not None:
        from recsys.tracking.runs import log_params

        log_params(w.tracking.uri, w.tracking.run_id, params)


def log_epoch(w: Worker, epoch: int, metrics: dict[str, float]) -> None:
    """Rank 0's side effects, the only ones in the loop: the progress line and MLflow."""
    # sys.__stdout__: Train's patched print also tees to a wrapped sys.stdout, which showed
    # every line twice on a `ray start` cluster.
    # The prefix puts the line on the driver's console when a job log file takes the rest.
    print(f"{WORKER_CONSOLE}{w.cfg.name}  epoch {epoch:3d}  loss {metrics['train_loss']:.4f}  "
          f"{METRIC} {metrics.get(METRIC, 0):.4f}  best {w.state.best:.4f}  "
          f"{metrics['sequences_per_s']:.0f} seq/s"
          + (f"  epsilon {metrics['privacy_epsilon']:.3g}" if "privacy_epsilon" in metrics
             else ""), file=sys.__stdout__, flush=True)
    if w.tracking is None:
        return
    from recsys.tracking.runs import log_metrics

    log_metrics(w.tracking.uri, w.tracking.run_id,
                {k: v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k != "epoch_end_time"},  # MLflow has its own
                step=epoch)


def _maybe_fail(cfg: TrainJobConfig, epoch: int, rank: int) -> None:
    """Fault injection: the process dies as a killed worker would (no cleanup, no exception)."""
    fi = cfg.fault_injection
    if fi is None or fi.after_epoch != epoch or fi.rank != rank:
        return
    marker = Path(fi.marker)
    if marker.exists():
        return
    marker.write_text(f"rank {rank} killed after epoch {epoch}\n")
    print(f"fault injection: killing rank {rank} after epoch {epoch}", flush=True)
    os._exit(1)
