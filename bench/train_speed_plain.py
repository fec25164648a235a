"""``bench/train_speed.py``, part 1a: the training step of the Ray loop in one plain process.

The same model, objective, AdamW, clipping, batch size, length-grouped batches and epochs as
``recsys.training``'s DDP engine with 1 worker, without Ray, at the worker's thread count and
niceness: the baseline that Ray Train's own ``sequences_per_s`` is divided by.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from common import Niceness, loadavg, stderr_log

if TYPE_CHECKING:
    from recsys.data.examples import ExampleSet
    from recsys.training.config import TrainJobConfig
    from recsys.training.trainer import TrainSetup

log = stderr_log("train_speed")



def summarise_epochs(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median sequences/s over the epochs after the first (warm-up), and the pooled rate: the
    same summary for the plain loop's epochs and for the Ray loop's reports."""
    counted = [e for e in epochs if e["epoch"] >= 1]
    if not counted:
        return {"sequences_per_s": float("nan"), "sequences_per_cpu_s": float("nan"),
                "epochs_counted": 0}
    sps = [e["sequences_per_s"] for e in counted]
    per_cpu = [e["sequences_per_cpu_s"] for e in counted if "sequences_per_cpu_s" in e]
    return {
        "sequences_per_cpu_s": statistics.median(per_cpu) if per_cpu else float("nan"),
        "sequences_per_s": statistics.median(sps),
        "sequences_per_s_pooled": (sum(e["sequences"] for e in counted)
                                   / sum(e["train_seconds"] for e in counted)),
        "sequences_per_s_min": min(sps), "sequences_per_s_max": max(sps),
        "spread_pct": 100 * (max(sps) - min(sps)) / statistics.median(sps),
        "epochs_counted": len(counted),
    }


def train_arrays(es: ExampleSet, platforms: list[str]) -> dict[str, np.ndarray]:
    """The train split as Ray Data's numpy batches look (history: object array of int32)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from recsys.data.examples import read_split

    table = read_split(es, "train")
    table = table.filter(pc.is_in(table["platform"], pa.array(platforms, pa.string())))
    hist = table["history"].combine_chunks()
    values = hist.values.to_numpy()
    offsets = hist.offsets.to_numpy()
    histories = np.empty(len(hist), dtype=object)
    for i in range(len(hist)):
        histories[i] = values[offsets[i]:offsets[i + 1]]
    return {"history": histories,
            "target": table["target"].to_numpy(),
            "platform": np.asarray(table["platform"].to_pylist(), dtype=object)}


def batch_order(history: np.ndarray, bs: int, buckets: int,
                rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of one epoch's batches as the Ray loop cuts them
    (``recsys.data.feed.iter_batches``): reads of ``buckets`` batches' worth of shuffled rows,
    each read grouped by history length (``buckets=1``: random batches)."""
    from recsys.data.feed import length_batches

    n = len(history)
    perm = rng.permutation(n)
    order = []
    for start in range(0, n, bs * buckets):
        read = perm[start:start + bs * buckets]
        order += [read if b is None else read[b]
                  for b in length_batches(history[read], bs, buckets, rng)]
    return order


def plain_loop(cfg: TrainJobConfig, setup: TrainSetup, data: dict[str, np.ndarray],
               threads: int, nice: int, label: str) -> dict[str, Any]:
    """The training step of ``DDPEngine`` (1 worker = no DDP wrapper), without Ray, at the
    worker's thread count and niceness."""
    with Niceness(nice, log) as n:
        out = _plain_loop(cfg, setup, data, threads, label)
    return {"nice": n.applied, **out}


def _plain_loop(cfg: TrainJobConfig, setup: TrainSetup, data: dict[str, np.ndarray],
                threads: int, label: str) -> dict[str, Any]:
    import torch

    from recsys.data.feed import collate
    from recsys.training.loop import seed_everything
    from recsys.training.model_setup import build_model
    from recsys.training.objective import PlatformTensors, RecommenderObjective

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(cfg.optim.seed)
        device = torch.device("cpu")
        inputs = setup.inputs
        platform_ids = {p: setup.model_platforms.index(p) for p in inputs.items}
        model = build_model(cfg, inputs, None, setup.model_platforms).to(device)
        tensors = {inputs.items[p].platform_id: PlatformTensors.from_items(inputs.items[p], device)
                   for p in inputs.items}
        objective = RecommenderObjective(model, cfg.loss, tensors)
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr,
                                      weight_decay=cfg.optim.weight_decay)
        bs, max_len = cfg.optim.micro_batch_size, cfg.data.sequences.max_seq_len
        accum, clip = cfg.optim.grad_accum, cfg.optim.grad_clip
        epochs = []
        buckets = cfg.optim.length_buckets
        padded = real = 0
        for epoch in range(cfg.optim.epochs):
            objective.train()
            rng = np.random.default_rng(cfg.optim.seed + epoch * 1000)
            order = batch_order(data["history"], bs, buckets, rng)
            collate_s = step_s = 0.0
            seen = micro = 0
            c0 = time.process_time()
            losses = []
            for idx in order:
                t0 = time.perf_counter()
                batch = collate({k: v[idx] for k, v in data.items()}, max_len, platform_ids)
                t1 = time.perf_counter()
                if epoch == 0:
                    padded += batch["history"].numel()
                    real += int(batch["length"].sum())
                loss, stats = objective(batch["history"], batch["target"], batch["platform"])
                (loss / accum).backward()
                micro += 1
                if micro % accum == 0:
                    if clip:
                        torch.nn.utils.clip_grad_norm_(objective.parameters(), clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                t2 = time.perf_counter()
                collate_s += t1 - t0
                step_s += t2 - t1
                seen += len(idx)
                losses.append(stats["loss"])
            secs = collate_s + step_s
            cpu_s = time.process_time() - c0
            epochs.append({"epoch": epoch, "sequences": seen, "train_seconds": round(secs, 3),
                           "cpu_seconds": round(cpu_s, 3), "sequences_per_cpu_s": seen / cpu_s,
                           "collate_seconds": round(collate_s, 3),
                           "step_seconds": round(step_s, 3), "steps": micro,
                           "sequences_per_s": seen / secs,
                           "train_loss": float(np.mean(losses))})
            log(f"  {label} epoch {epoch}: {seen / secs:,.0f} seq/s "
                f"(collate {collate_s:.1f} s, step {step_s:.1f} s, load {loadavg()[0]})")
        return {"threads": torch.get_num_threads(), "length_buckets": buckets,
                "padded_positions_per_real": padded / max(real, 1), "epochs": epochs,
                **summarise_epochs(epochs)}
    finally:
        torch.set_num_threads(prev_threads)
