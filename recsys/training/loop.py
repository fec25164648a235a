"""The per-worker training loop run by Ray Train (``TorchTrainer(train_loop_per_worker=...)``).

Each epoch: train on this worker's shard, evaluate the validation shard (full ranking; sums are
all-reduced so every rank sees the same metrics and takes the same early-stopping decision),
then every rank saves its part of the checkpoint and calls ``ray.train.report`` (a barrier).
Rank-dependent side effects (MLflow) are in :func:`_rank0_log` only.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.evaluation.metrics import ranking_metrics
from recsys.training.config import OptimConfig, TrainJobConfig
from recsys.training.items import ItemInputs, keep_user
from recsys.training.model_setup import build_model
from recsys.training.objective import PlatformTensors, RecommenderObjective

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


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks. NCCL reduces CUDA tensors only: there the sums make
    the round trip through this rank's GPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(on_gpu)
            return on_gpu.cpu()
        torch.distributed.all_reduce(values)
    return values


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
    sums = _all_reduce(sums)
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from recsys.data.feed import SPLIT_DATASETS, iter_batches
    from recsys.training.engine import make_engine

    entered = time.time()
    _quiet_report_logs()
    cfg = TrainJobConfig.model_validate(config["job"])  # re-validate on the worker
    inputs: ItemInputs = ray.get(config["items_ref"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.optim.seed + rank)

    platform_ids = config["platform_ids"]
    model = build_model(cfg, inputs, config.get("init_state"), config["model_platforms"])
    model.to(device)
    tensors = {inputs.items[p].platform_id: PlatformTensors.from_items(inputs.items[p], device)
               for p in inputs.items}
    objective = RecommenderObjective(model, cfg.loss, tensors)
    engine = make_engine(objective, cfg, world, on_gpu=device.type == "cuda")

    state: dict[str, Any] = {"epoch": -1, "best": -1.0, "bad_epochs": 0, "curve": [],
                             "lr_scale": 1.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = {"lr_scale": 1.0, **engine.load(Path(d))}
        engine.scale_lr(state["lr_scale"])
        log.info("rank %d resumed after epoch %d (best %s %.4f)", rank, state["epoch"], METRIC,
                 state["best"])

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    setup_seconds = time.time() - entered  # model build, item tensors, restore, shards
    for epoch in range(state["epoch"] + 1, cfg.optim.epochs):
        t0 = time.perf_counter()
        engine.train()
        losses, seen, skipped_before = [], 0, engine.skipped_steps()
        for batch in iter_batches(train_shard, cfg.optim.micro_batch_size,
                                  cfg.data.sequences.max_seq_len, shuffle_buffer=4096,
                                  seed=cfg.optim.seed + epoch * 1000 + rank,
                                  platform_ids=platform_ids, device=device,
                                  length_buckets=cfg.optim.length_buckets):
            stats = engine.step(batch["history"], batch["target"], batch["platform"])
            losses.append(stats["loss"])
            seen += len(batch["target"])
        train_seconds = time.perf_counter() - t0
        skipped = engine.skipped_steps() - skipped_before
        check_epoch(epoch, losses, skipped, len(losses) // cfg.optim.grad_accum)
        engine.eval()
        metrics = evaluate_shard(objective.model, tensors, valid_shard, cfg, platform_ids, device,
                                 part=None if "valid" in SPLIT_DATASETS else (rank, world))
        seen_all = float(_all_reduce(torch.tensor([float(seen)], dtype=torch.float64))[0])
        metrics.update(epoch=epoch, train_loss=float(np.mean(losses)) if losses else float("nan"),
                       train_seconds=train_seconds, sequences_per_s=seen_all / train_seconds,
                       epoch_seconds=time.perf_counter() - t0,  # train + validation
                       setup_seconds=setup_seconds, epoch_end_time=time.time(),
                       skipped_steps=skipped)
        if device.type == "cuda":  # this process's peak so far (weights, optimizer, activations)
            metrics["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        improved = metrics.get(METRIC, 0.0) > state["best"]
        state["best"] = max(state["best"], metrics.get(METRIC, 0.0))
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        metrics["lr"] = cfg.optim.lr * state["lr_scale"]  # the rate this epoch trained with
        scale = lr_scale_after(state["lr_scale"], state["bad_epochs"], cfg.optim)
        if scale != state["lr_scale"]:
            state["lr_scale"] = scale
            engine.scale_lr(scale)
        state["curve"].append({k: metrics[k] for k in ("epoch", "train_loss", METRIC,
                                                       "train_seconds", "sequences_per_s",
                                                       "gpu_max_memory_gib", "skipped_steps")
                               if k in metrics})
        metrics["best_" + METRIC] = state["best"]
        if rank == 0:
            # sys.__stdout__: Train's patched print also tees to a wrapped sys.stdout, which
            # showed every line twice on a `ray start` cluster.
            print(f"epoch {epoch:3d}  loss {metrics['train_loss']:.4f}  {METRIC} "
                  f"{metrics.get(METRIC, 0):.4f}  best {state['best']:.4f}  "
                  f"{metrics['sequences_per_s']:.0f} seq/s", file=sys.__stdout__, flush=True)
            _rank0_log(config, metrics, epoch)
        with tempfile.TemporaryDirectory() as d:
            wrote = engine.save(Path(d), state, rank)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if wrote else None)
        _maybe_fail(cfg, epoch, rank)
        if should_stop(state["bad_epochs"], epoch, cfg.optim):
            if rank == 0:
                print(f"early stop: no better {METRIC} for {state['bad_epochs']} epochs",
                      flush=True)
            break


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


def _rank0_log(config: dict[str, Any], metrics: dict[str, float], epoch: int) -> None:
    """The one place a worker talks to MLflow."""
    tracking = config.get("tracking")
    if not tracking:
        return
    from recsys.tracking.runs import log_metrics

    log_metrics(tracking["uri"], tracking["run_id"],
                {k: v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k != "epoch_end_time"},  # MLflow has its own
                step=epoch)
