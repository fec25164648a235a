#!/usr/bin/env python
"""Benchmark: training speed of the Ray Train loop on CPU (ratios, not absolute speed).

Five comparisons on one small synthetic example set (3 shops, frozen-encoder cache mode, the
model of ``configs/train/*.yaml`` at dim 64 / 2 layers, full softmax, micro batch 256):

1. **Ray Train vs a plain process** -- ``build_trainer(cfg)`` with 1 DDP worker (the loop's own
   ``sequences_per_s``: epoch time including the Ray Data shard iteration, local shuffle and
   collate) against the same step in one process without Ray (same ``build_model``,
   ``PlatformTensors.from_items``, ``RecommenderObjective``, AdamW, gradient clipping, batch size,
   epochs; ``recsys.data.feed.collate`` on batches of a seeded permutation of the train split;
   only collate + forward + backward + optimizer step are timed). The worker's intra-op thread
   count is read inside the worker (Ray sets ``OMP_NUM_THREADS=1`` for a fractional CPU) and the
   plain process uses the same (``torch.set_num_threads``).
2. **DeepSpeed ZeRO-2 vs DDP**, 2 workers each, otherwise the same config.
3. **1 vs 2 DDP workers**: sequences/s and scaling efficiency ``sps(2) / (2 * sps(1))``.
4. **Encoder tokens per training step** when the text encoder runs in the step (fine-tuning):
   per-item dedup (what ``objective.item_vectors`` encodes: each distinct item of a platform once)
   vs naive per-event encoding (every history position and target separately), counted from
   ``tokens.parquet`` on a sample of training batches; plus what the two losses really encode
   (sampled softmax adds popularity-sampled negatives; full softmax encodes the whole catalog),
   the frozen-cache mode (0 tokens per step; each distinct text encoded once per encoder), and
   seconds per step estimated from a timed MiniLM forward(+backward) on real item texts.
5. **Batches grouped by history length** (``optim.length_buckets``, what every loop above uses)
   vs random batches (``length_buckets=1``), in the plain loop: sequences/s and padded
   positions per real one (a batch is padded to its longest history).

Every Ray run uses ``epochs`` epochs; the first is warm-up and is not counted (neither in the
plain loop). Throughput is the median over the remaining epochs of sequences/s (the loop's own
metric). The machine is shared: load averages and CPU time of other processes are recorded per
measurement, and the Markdown says the figures are CPU ratios from one run.

Usage::

    python bench/train_speed.py               # scale 1.0, 4 epochs (~10 min on 2 busy cores)
    python bench/train_speed.py --quick       # smoke: scale 0.3, 2 epochs, few token batches
    python bench/train_speed.py --encoder bundled   # frozen vectors from MiniLM (slower set-up)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as pyplatform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SEED = 7
PSEUDONYM_KEY = bytes(range(32))  # fixed, public: no key file is read or written
TARGET_RAY_OVER_PLAIN = 0.95
SPIKE_OTHER_PCT = 40  # a run during which other processes took more CPU is flagged
RAY_DEFAULT_WORKER_NICENESS = 15  # Ray's worker_niceness (RAY_worker_niceness overrides it)
PLATFORMS = ["shop_a", "shop_b", "shop_c"]


def log(msg: str) -> None:
    print(f"[train_speed] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Machine, load, CPU accounting
# --------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    import deepspeed
    import ray
    import torch
    import transformers

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_model": model,
        "memory_total_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": pyplatform.python_version(),
        "platform": pyplatform.platform(),
        "gpu": torch.cuda.is_available(),
        "versions": {"torch": torch.__version__, "ray": ray.__version__,
                     "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class CpuMeter:
    """Wall time, load average and CPU seconds during a measurement: this process, its
    descendants (Ray's processes and workers, sampled every ``interval`` s because workers exit
    before the end), and the rest of the machine (``other_s``: the background load)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self._stop = threading.Event()
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._procs: dict[int, psutil.Process] = {}

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _scan(self, first: bool = False) -> None:
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            proc = self._procs.setdefault(child.pid, child)
            try:
                cpu = self._cpu(proc)
            except psutil.Error:
                continue
            if first:
                self._start[child.pid] = cpu
            self._start.setdefault(child.pid, 0.0)  # born during the measurement
            self._last[child.pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()

    def __enter__(self) -> CpuMeter:
        self.load_start = loadavg()
        self.driver0 = self._cpu(self.me)
        self.sys0 = psutil.cpu_times()
        self._scan(first=True)
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._scan()
        driver = self._cpu(self.me) - self.driver0
        children = sum(max(0.0, self._last[p] - self._start.get(p, 0.0)) for p in self._last)
        end = psutil.cpu_times()
        busy = sum(getattr(end, f) - getattr(self.sys0, f)
                   for f in ("user", "system", "nice", "irq", "softirq", "steal")
                   if hasattr(end, f))
        nice = getattr(end, "nice", 0.0) - getattr(self.sys0, "nice", 0.0)
        self.summary = {
            "wall_s": round(self.wall, 2),
            "loadavg_start": self.load_start, "loadavg_end": loadavg(),
            "cpu_s": {"driver": round(driver, 2), "descendants": round(children, 2),
                      "machine_busy": round(busy, 2),
                      "machine_nice": round(nice, 2),
                      "other": round(max(0.0, busy - driver - children), 2),
                      "machine_capacity": round(self.wall * (os.cpu_count() or 1), 2)},
        }


# --------------------------------------------------------------------------------------------
# Data, encoder, config
# --------------------------------------------------------------------------------------------

def start_ray() -> None:
    """A private local 2-CPU cluster on loopback (never joins another cluster on the machine)."""
    for var in ("RAY_ADDRESS", "RECSYS_RAY_ADDRESS"):
        if os.environ.pop(var, None):
            log(f"ignoring ${var}: the benchmark starts its own local Ray")
    import ray

    from recsys.cluster import LOOPBACK, loopback_env, quiet_ray_data

    for key, value in loopback_env().items():
        os.environ.setdefault(key, value)
    quiet_ray_data()
    for attempt in range(3):  # on a busy machine the node's start-up can time out
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=True,
                     dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                     logging_level=logging.WARNING)
            break
        except Exception as exc:
            log(f"ray.init failed ({type(exc).__name__}: {str(exc)[:120]}), attempt {attempt + 1}")
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)
    ray.data.DataContext.get_current().enable_progress_bars = False


def save_tiny_encoder(out: Path) -> str:
    """A random 1-layer BERT with MiniLM's tokenizer and MiniLM's width (384): same token ids
    and the same text-vector size as ``bundled:all-MiniLM-L6-v2`` (so the item tower costs the
    same), but the one-off encoding of the catalogs takes seconds, not minutes, on 2 cores."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.data.catalog import BUNDLED_ENCODER, resolve_encoder_path

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path(BUNDLED_ENCODER))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=1,
                     num_attention_heads=6, intermediate_size=512, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def build_examples(tmp: Path, scale: float, encoder: str) -> Any:
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.examples import DataConfig, build_example_set
    from recsys.data.pseudonym import Pseudonymizer

    ingest(IngestOptions(source="synthetic", out=tmp / "lake", scale=scale, seed=SEED,
                         num_platforms=len(PLATFORMS)), Pseudonymizer(PSEUDONYM_KEY))
    return build_example_set(DataConfig(
        lake=str(tmp / "lake"), examples=str(tmp / "examples"),
        sequences={"max_seq_len": 50}, text={"encoder": encoder, "max_tokens": 64}))


def job_config(es: Any, tmp: Path, name: str, epochs: int, engine: str = "ddp",
               workers: int = 1, cpus: float = 0.5) -> Any:
    from recsys.training.config import TrainJobConfig

    return TrainJobConfig.model_validate({
        "name": name,
        "mode": "pretrain",
        "data": {"examples": str(es.path), "sequences": {"max_seq_len": 50},
                 "text": dict(es.manifest["config"]["text"])},
        "model": {"dim": 64, "num_layers": 2, "num_heads": 2, "num_experts": 8,
                  "dropout": 0.2},
        "loss": {"kind": "full_softmax", "temperature": 0.07, "ctr_weight": 0.1},
        "optim": {"lr": 0.001, "epochs": epochs, "micro_batch_size": 256,
                  "early_stopping_patience": 1000, "seed": 0},
        "deepspeed": {"zero_stage": 2},
        "encoder": {"cache_dir": str(tmp / "encoder-cache")},
        "scaling": {"engine": engine, "num_workers": workers, "cpus_per_worker": cpus,
                    "max_failures": 0},
        "tracking": {"enabled": False},
        "output_dir": str(tmp / "runs"),
        "resume": False,
    })


def summarise_epochs(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median sequences/s over the epochs after the first (warm-up), and the pooled rate."""
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


class Niceness:
    """Run a block of this process at another niceness (every thread: Linux nice is per
    thread), then restore it. Ray starts its workers at ``worker_niceness`` (15 by default), so
    on a busy machine a nice-0 plain process would get more CPU than the Ray worker it is
    compared with. Restoring a lower niceness needs root; otherwise the process stays niced."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self.before: dict[int, int] = {}

    @staticmethod
    def _tids() -> list[int]:
        return [int(t) for t in os.listdir("/proc/self/task")]

    def __enter__(self) -> Niceness:
        for tid in self._tids():
            try:
                self.before[tid] = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            except OSError:
                pass
        self.applied = os.getpriority(os.PRIO_PROCESS, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        for tid in self._tids():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, self.before.get(tid, 0))
            except OSError as e:
                log(f"could not restore the niceness of thread {tid}: {e}")


# --------------------------------------------------------------------------------------------
# 1a. The plain single-process loop
# --------------------------------------------------------------------------------------------

def train_arrays(es: Any, platforms: list[str]) -> dict[str, np.ndarray]:
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


def plain_loop(cfg: Any, setup: Any, data: dict[str, np.ndarray], threads: int,
               nice: int, label: str) -> dict[str, Any]:
    """The training step of ``DDPEngine`` (1 worker = no DDP wrapper), without Ray, at the
    worker's thread count and niceness."""
    with Niceness(nice) as n:
        out = _plain_loop(cfg, setup, data, threads, label)
    return {"nice": n.applied, **out}


def _plain_loop(cfg: Any, setup: Any, data: dict[str, np.ndarray], threads: int,
                label: str) -> dict[str, Any]:
    import torch

    from recsys.data.feed import collate, length_batches
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
        n = len(data["target"])
        epochs = []
        buckets = cfg.optim.length_buckets
        padded = real = 0
        for epoch in range(cfg.optim.epochs):
            objective.train()
            rng = np.random.default_rng(cfg.optim.seed + epoch * 1000)
            perm = rng.permutation(n)
            # Batches as the Ray loop cuts them (recsys.data.feed.iter_batches): reads of
            # `buckets` batches' worth of shuffled rows, grouped by history length.
            order = []
            for start in range(0, n, bs * buckets):
                read = perm[start:start + bs * buckets]
                order += [read if b is None else read[b]
                          for b in length_batches(data["history"][read], bs, buckets, rng)]
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


# --------------------------------------------------------------------------------------------
# 1b-3. Ray Train runs
# --------------------------------------------------------------------------------------------

def _probed_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` preceded by a record of the worker's thread settings (read in
    the worker that then trains), with the training epochs' CPU time recorded: the loop imports
    ``iter_batches`` from ``recsys.data.feed`` when it starts, so a wrapper put there notes the
    worker process's CPU seconds (all its threads: Ray Data prefetching included) from the first
    batch request to the end of each training epoch's batches. Timing is unchanged."""
    import ray.train
    import torch

    import recsys.data.feed as feed
    from recsys.training.loop import train_loop_per_worker

    probe = config.get("_bench_probe")
    if probe:
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        original = feed.iter_batches
        epoch = {"i": 0}

        def timed_iter_batches(shard: Any, batch_size: int, max_len: int, **kw: Any) -> Any:
            if not kw.get("shuffle_buffer"):  # evaluation: not timed
                yield from original(shard, batch_size, max_len, **kw)
                return
            c0, w0, n = time.process_time(), time.perf_counter(), 0
            for b in original(shard, batch_size, max_len, **kw):
                n += len(b["target"])
                yield b
            rec = {"kind": "epoch", "rank": rank, "epoch": epoch["i"], "sequences": n,
                   "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}
            epoch["i"] += 1
            with open(probe, "a") as f:
                f.write(json.dumps(rec) + "\n")

        feed.iter_batches = timed_iter_batches
        info = {"kind": "threads", "rank": rank, "pid": os.getpid(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "torch_num_threads": torch.get_num_threads(),
                "torch_num_interop_threads": torch.get_num_interop_threads(),
                "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "cpu_affinity": sorted(os.sched_getaffinity(0))}
        with open(probe, "a") as f:
            f.write(json.dumps(info) + "\n")
    train_loop_per_worker(config)


def _metrics_sink(path: str) -> Any:
    """A ``ray.train.UserCallback`` (runs in the Ray Train controller) that appends every
    report's per-worker metrics to a JSON-lines file."""
    from ray.train import UserCallback

    class MetricsSink(UserCallback):
        def __init__(self, out: str) -> None:
            self.out = out

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            clean = [{k: v for k, v in m.items() if isinstance(v, (int, float, str))}
                     for m in metrics]
            with open(self.out, "a") as f:
                f.write(json.dumps({"time": time.time(), "metrics": clean}) + "\n")

    return MetricsSink(path)


def ray_run(cfg: Any, setup: Any, tmp: Path) -> dict[str, Any]:
    from recsys.training.trainer import build_trainer

    sink = tmp / f"{cfg.name}.metrics.jsonl"
    probe = tmp / f"{cfg.name}.threads.jsonl"
    trainer = build_trainer(cfg, setup)
    trainer.train_loop_per_worker = _probed_loop
    trainer.train_loop_config["_bench_probe"] = str(probe)
    trainer.run_config.callbacks.append(_metrics_sink(str(sink)))
    t0 = time.perf_counter()
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # record and go on with the other measurements
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"  {cfg.name} FAILED: {error[:300]}")
    fit_s = time.perf_counter() - t0
    reports = ([json.loads(x) for x in sink.read_text().splitlines()] if sink.exists() else [])
    lines = ([json.loads(x) for x in probe.read_text().splitlines()] if probe.exists() else [])
    threads = [x for x in lines if x.get("kind") == "threads"]
    cpu = [x for x in lines if x.get("kind") == "epoch"]
    epochs = []
    for r in reports:
        m0 = r["metrics"][0]  # rank 0: the loop's printed/logged value (seen summed over ranks)
        mine = [x for x in cpu if x["epoch"] == int(m0["epoch"])]
        extra = ({"worker_cpu_seconds": round(sum(x["cpu_s"] for x in mine), 3),
                  "sequences_per_cpu_s": (sum(x["sequences"] for x in mine)
                                          / sum(x["cpu_s"] for x in mine))}
                 if mine and sum(x["cpu_s"] for x in mine) > 0 else {})
        epochs.append({**extra,
            "epoch": int(m0["epoch"]),
            "sequences": round(m0["sequences_per_s"] * m0["train_seconds"]),
            "train_seconds": round(m0["train_seconds"], 3),
            "sequences_per_s": m0["sequences_per_s"],
            "train_seconds_by_rank": [round(m["train_seconds"], 3) for m in r["metrics"]],
            "train_loss": m0.get("train_loss"), "valid_ndcg@10": m0.get("valid_ndcg@10"),
        })
        log(f"  {cfg.name} epoch {epochs[-1]['epoch']}: {m0['sequences_per_s']:,.0f} seq/s "
            f"(train {m0['train_seconds']:.1f} s, load {loadavg()[0]})")
    return {"name": cfg.name, "engine": cfg.scaling.engine,
            "num_workers": cfg.scaling.num_workers,
            "cpus_per_worker": cfg.scaling.cpus_per_worker,
            "worker_threads": threads, "fit_seconds": round(fit_s, 1), "error": error,
            "epochs": epochs, **summarise_epochs(epochs)}


# --------------------------------------------------------------------------------------------
# 4. Encoder tokens per step
# --------------------------------------------------------------------------------------------

def token_tables(es: Any, platforms: list[str]) -> dict[str, Any]:
    """Per platform: token length of each item index (row 0 = padding) and a global id of its
    text (items with the same text on two shops share one)."""
    from recsys.model.features import load_item_features, load_token_ids

    tokens = load_token_ids(es.path)
    _, feats = load_item_features(es.path, platforms)
    text_ids: dict[str, int] = {}
    out: dict[str, Any] = {"tokens": tokens, "lengths": {}, "text_ids": {}, "hashes": {}}
    for p in platforms:
        hashes = feats[p].text_hash
        out["hashes"][p] = [""] + list(hashes)
        out["lengths"][p] = np.array([0] + [len(tokens[h]) for h in hashes], np.int64)
        out["text_ids"][p] = np.array(
            [-1] + [text_ids.setdefault(h, len(text_ids)) for h in hashes], np.int64)
    out["lengths_all"] = np.array([len(t) for t in tokens.values()], np.int64)
    return out


def token_counts(cfg: Any, setup: Any, data: dict[str, np.ndarray], tt: dict[str, Any],
                 num_batches: int) -> dict[str, Any]:
    """Encoder work per training step if the encoder ran in the step, on ``num_batches``
    batches of a seeded permutation of the train split (collated exactly as in training)."""
    import torch

    from recsys.data.feed import collate

    bs, max_len = cfg.optim.micro_batch_size, cfg.data.sequences.max_seq_len
    num_neg = cfg.loss.num_negatives
    platform_ids = {p: setup.model_platforms.index(p) for p in setup.inputs.items}
    names = {v: k for k, v in platform_ids.items()}
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(data["target"]))
    rows: list[dict[str, float]] = []
    for b in range(min(num_batches, len(perm) // bs)):
        idx = perm[b * bs:(b + 1) * bs]
        batch = collate({k: v[idx] for k, v in data.items()}, max_len, platform_ids)
        hist, target, plat = (batch["history"].numpy(), batch["target"].numpy(),
                              batch["platform"].numpy())
        r = {"sequences": len(idx), "history_positions": int((hist > 0).sum())}
        naive_tok = naive_pad = naive_n = 0
        dedup_tok = dedup_pad = dedup_n = 0
        samp_tok = samp_pad = samp_n = 0
        full_tok = full_pad = full_n = 0
        text_ids_batch: set[int] = set()
        for pid in np.unique(plat):
            name = names[int(pid)]
            lens, tids = tt["lengths"][name], tt["text_ids"][name]
            rows_p = plat == pid
            h, t = hist[rows_p], target[rows_p]
            events = np.concatenate([h[h > 0], t])
            # naive: every history position and every target encoded on its own
            naive_tok += int(lens[events].sum())
            naive_n += len(events)
            # per-item dedup (objective.item_vectors encodes each distinct item once)
            items = np.unique(events)
            dedup_tok += int(lens[items].sum())
            dedup_pad += len(items) * int(lens[items].max())
            dedup_n += len(items)
            text_ids_batch.update(tids[items].tolist())
            # sampled softmax as implemented: + num_negatives popularity-sampled items
            pop = setup.inputs.items[name].popularity.astype(np.float64) + 1.0
            pop[0] = 0.0
            negs = rng.choice(len(pop), size=num_neg, p=pop / pop.sum())
            needed = np.unique(np.concatenate([items, negs]))
            samp_tok += int(lens[needed].sum())
            samp_pad += len(needed) * int(lens[needed].max())
            samp_n += len(needed)
            # full softmax with the encoder in the step: the platform's whole catalog
            full_tok += int(lens[1:].sum())
            full_pad += (len(lens) - 1) * int(lens[1:].max())
            full_n += len(lens) - 1
        # token_batch pads to the longest sequence of the call; naive would be one call
        all_events = np.concatenate([
            tt["lengths"][names[int(pid)]][np.concatenate([
                hist[plat == pid][hist[plat == pid] > 0], target[plat == pid]])]
            for pid in np.unique(plat)])
        naive_pad = len(all_events) * int(all_events.max())
        r.update(naive_texts=naive_n, naive_tokens=naive_tok, naive_padded=naive_pad,
                 dedup_items=dedup_n, dedup_tokens=dedup_tok, dedup_padded=dedup_pad,
                 dedup_by_text_texts=len(text_ids_batch),
                 sampled_softmax_items=samp_n, sampled_softmax_tokens=samp_tok,
                 sampled_softmax_padded=samp_pad,
                 full_catalog_items=full_n, full_catalog_tokens=full_tok,
                 full_catalog_padded=full_pad)
        rows.append(r)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    # Python padding of token lists per step (objective.item_vectors -> token_batch) vs one
    # index into a tensor padded once: the cost of rebuilding the token batch every step.
    from recsys.model.features import token_batch

    name = PLATFORMS[0]
    toks = [np.zeros(0, np.int32)] + [tt["tokens"][h] for h in tt["hashes"][name][1:]]
    ids = np.unique(np.concatenate([np.asarray(data["history"][i]) for i in perm[:bs]
                                    if data["platform"][i] == name]))
    ids = ids[ids > 0]
    py_s, ix_s = [], []
    pre_ids, pre_mask = token_batch(toks)  # what could be built once per run
    lengths = pre_mask.sum(1)
    for _ in range(20):  # min of 20: the machine is busy
        t0 = time.perf_counter()
        token_batch([toks[i] for i in torch.as_tensor(ids).tolist()])
        py_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sel = torch.as_tensor(ids)
        width = int(lengths[sel].max())
        pre_ids[sel, :width], pre_mask[sel, :width]
        ix_s.append(time.perf_counter() - t0)
    per_step_python, per_step_indexed = min(py_s), min(ix_s)
    return {"batches": len(rows), "batch_size": bs, "num_negatives": num_neg,
            "mean_per_step": mean, "per_batch": rows,
            "ratio_naive_over_dedup_tokens": mean["naive_tokens"] / mean["dedup_tokens"],
            "ratio_naive_over_dedup_padded": mean["naive_padded"] / mean["dedup_padded"],
            "token_batch_per_call_s": {"items": int(len(ids)),
                                       "python_token_batch": per_step_python,
                                       "index_prepadded_tensor": per_step_indexed}}


def time_encoder(encoder: str, tt: dict[str, Any], threads: int, texts: int,
                 repeats: int) -> dict[str, Any]:
    """Seconds per padded token of one encoder on real item texts: inference (the one-off
    frozen-cache encoding) and forward + backward (fine-tuning in the step)."""
    import torch

    from recsys.model.features import token_batch
    from recsys.model.recommender import load_text_encoder

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        enc = load_text_encoder(encoder)
        rng = np.random.default_rng(SEED)
        hashes = list(tt["tokens"])
        pick = [tt["tokens"][hashes[i]] for i in rng.choice(len(hashes), texts, replace=False)]
        input_ids, mask = token_batch(pick)
        padded = int(input_ids.numel())
        enc.eval()
        inf, inf_cpu, trn, trn_cpu = [], [], [], []
        with torch.inference_mode():
            enc(input_ids[:4], mask[:4])  # warm-up
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                enc(input_ids, mask)
                inf.append(time.perf_counter() - t0)
                inf_cpu.append(time.process_time() - c0)
        enc.train()
        for _ in range(repeats):
            enc.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            enc(input_ids, mask).sum().backward()
            trn.append(time.perf_counter() - t0)
            trn_cpu.append(time.process_time() - c0)
        # CPU seconds, not wall: with 1 thread they are the compute time, whatever else runs
        # on the machine (wall times are kept for reference).
        return {"encoder": encoder, "hidden": enc.hidden_size,
                "params": sum(p.numel() for p in enc.parameters()), "threads": threads,
                "texts": texts, "padded_tokens": padded, "repeats": repeats,
                "inference_wall_s": statistics.median(inf),
                "inference_cpu_s": statistics.median(inf_cpu),
                "train_step_wall_s": statistics.median(trn),
                "train_step_cpu_s": statistics.median(trn_cpu),
                "inference_s_per_padded_token": statistics.median(inf_cpu) / padded,
                "train_s_per_padded_token": statistics.median(trn_cpu) / padded}
    finally:
        torch.set_num_threads(prev)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def noise_sentence(other_pct: float) -> str:
    """How far to trust the ratios, from how much of the machine other processes took."""
    if other_pct >= 10:
        return "On a machine this busy every ratio carries noise well beyond a few %"
    return "A quiet machine, but still one run per figure: read differences of a few % as noise"


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    c, tok, sps = res["comparisons"], res["encoder_tokens"], res["comparisons"]["sps"]
    cn = c["cpu_normalised"]

    def other_share(name: str) -> float:
        mt = res["meters"].get(name)
        cap = mt["cpu_s"]["machine_capacity"] if mt else 0
        return 100 * mt["cpu_s"]["other"] / cap if cap else float("nan")

    def caveat(*names: str) -> str:
        """A warning where a run overlapped heavy other load (the wall-clock ratio is then
        mostly noise; the per-CPU-second one less so)."""
        hit = [f"{n} ran while other processes took {other_share(n):.0f}% of the CPU"
               for n in names if other_share(n) > SPIKE_OTHER_PCT]
        return f" -- **caution: {'; '.join(hit)}**" if hit else ""
    m = tok["mean_per_step"]
    est = res.get("encoder_seconds_estimate") or {}
    fz = res["frozen_cache"]
    loads = ", ".join(f"{k} {v['loadavg_start'][0]}" for k, v in res["meters"].items()
                      if k != "prepare_encode")
    lines = [
        "# Training speed (bench/train_speed.py)",
        "",
        f"**CPU ratios measured in one run on a shared {res['machine']['cpu_count_logical']}-core "
        f"machine ({res['machine']['cpu_model']}), no GPU.** Only the ratios mean something; "
        "absolute sequences/s are meaningful on a GPU only. "
        f"Load average (1 min) {res['loadavg_start'][0]} at the start and "
        f"{res['loadavg_end'][0]} at the end; at the start of each run: {loads}. Other "
        f"processes used {res['other_cpu_share_pct']:.0f}% of the machine's CPU time during "
        f"the timed runs. {noise_sentence(res['other_cpu_share_pct'])} (compare plain_a with "
        f"plain_b, the same run twice: {c['plain_b_over_plain_a']:.2f}).",
        "",
        "| comparison | value | target |",
        "|---|---|---|",
        f"| Ray Train (1 DDP worker) / plain process, sequences/s | "
        f"**{fmt(c['ray_over_plain'])}** ({fmt(sps['ray_ddp_1w'], ',.0f')} / "
        f"{fmt(sps['plain'], ',.0f')}; plain before {fmt(sps['plain_a'], ',.0f')}, after "
        f"{fmt(sps['plain_b'], ',.0f')}); per CPU-second {fmt(cn['ray_over_plain'])}"
        f"{caveat('plain_a', 'ray_ddp_1w', 'plain_b')} | >= {TARGET_RAY_OVER_PLAIN} "
        f"({'met' if c['ray_over_plain_met'] else 'NOT met'}) |",
        f"| DeepSpeed ZeRO-2 / DDP, 2 workers, sequences/s | **{fmt(c['deepspeed_over_ddp'])}** "
        f"({fmt(sps['ray_ds2_2w'], ',.0f')} / {fmt(sps['ray_ddp_2w'], ',.0f')}); per "
        f"CPU-second {fmt(cn['deepspeed_over_ddp'])}{caveat('ray_ddp_2w', 'ray_ds2_2w')} | "
        "none (ZeRO saves memory; on CPU it can only cost time) |",
        f"| 2 / 1 DDP workers, sequences/s | **{fmt(c['two_over_one_workers'])}** "
        f"({fmt(sps['ray_ddp_2w'], ',.0f')} / {fmt(sps['ray_ddp_1w'], ',.0f')}); "
        f"scaling efficiency sps(2)/(2 sps(1)) **{fmt(c['scaling_efficiency'])}**; per "
        f"CPU-second 2 / 1 workers {fmt(cn['two_over_one_workers'])}"
        f"{caveat('ray_ddp_1w', 'ray_ddp_2w')} | "
        "efficiency <= 1 (2 cores) |",
        f"| Encoder tokens per step: naive per-event / per-item dedup | "
        f"**{fmt(tok['ratio_naive_over_dedup_tokens'], '.1f')}x** "
        f"({m['naive_tokens']:,.0f} / {m['dedup_tokens']:,.0f} tokens; "
        f"{m['naive_texts']:,.0f} / {m['dedup_items']:,.0f} texts; padded "
        f"{tok['ratio_naive_over_dedup_padded']:.1f}x) | dedup < naive |",
        f"| Encoder tokens per step, sampled softmax as implemented (batch items + "
        f"{tok['num_negatives']} sampled negatives) | {m['sampled_softmax_tokens']:,.0f} | |",
        f"| Encoder tokens per step, full softmax with the encoder in the step (every "
        f"catalog item of the batch's platforms) | {m['full_catalog_tokens']:,.0f} | |",
        f"| Encoder tokens per step, frozen cache (the default) | **0** (one-off: "
        f"{fz['distinct_texts']:,} distinct texts, {fz['tokens_total']:,} tokens, once per "
        "encoder) | 0 |",
    ]
    if "length_buckets_over_random" in c:
        pb, pr = res["runs"]["plain_b"], res["runs"]["plain_random"]
        lines.append(
            f"| Batches grouped by history length (`optim.length_buckets` "
            f"{pb['length_buckets']}) / random batches, plain loop, sequences/s | "
            f"**{fmt(c['length_buckets_over_random'])}** ({fmt(sps['plain_b'], ',.0f')} / "
            f"{fmt(pr['sequences_per_s'], ',.0f')}); padded positions per real one "
            f"{pb['padded_positions_per_real']:.2f} vs {pr['padded_positions_per_real']:.2f}"
            f"{caveat('plain_b', 'plain_random')} | > 1 |")
    if "plain_nice0" in res["runs"]:
        lines.append(
            f"| (extra) plain at nice 0 / plain at the Ray worker's niceness "
            f"({res['runs']['plain_b']['nice']}) | {fmt(c['plain_nice0_over_plain_b'])} | |")
    lines += [
        "",
        f"Setup: synthetic world x{res['args']['scale']} ({len(PLATFORMS)} shops, "
        f"{res['data']['train_rows']:,} training sequences, {res['data']['catalog_items']:,} "
        f"catalog items), frozen text vectors from {res['data']['encoder_label']}; model dim 64, "
        "2 layers, 8 experts, full softmax + CTR head, micro batch 256 per worker, "
        f"max_seq_len 50; {res['args']['epochs']} epochs per run, epoch 0 not counted, median "
        "sequences/s of the rest. Ray: the loop's own `sequences_per_s` (epoch time including "
        "the Ray Data shard iteration); plain: collate + forward + backward + step in one "
        "process. 'Per CPU-second': the same ratio of sequences per CPU-second of the "
        "training process(es) (Ray: the worker processes, all their threads), a cross-check "
        f"that depends less on the other load. Workers: {res['args']['cpus_per_worker']} CPU "
        "each, "
        f"{res['worker_threads_summary']}; the plain loop ran with the same thread count and "
        "niceness. Order: " + ", ".join(k for k in res["meters"] if k != "prepare_encode") + ".",
    ]
    lines += ["", "Per run (median of the counted epochs; 'other CPU' = share of the machine's CPU "
              "time used by processes outside this benchmark during the run):", "",
              "| run | sequences/s | per CPU-second | other CPU | 1-min load start -> end |",
              "|---|---|---|---|---|"]
    for name, run in res["runs"].items():
        mt = res["meters"].get(name)
        share = (100 * mt["cpu_s"]["other"] / mt["cpu_s"]["machine_capacity"]
                 if mt and mt["cpu_s"]["machine_capacity"] else float("nan"))
        lines.append(f"| {name} | {fmt(run['sequences_per_s'], ',.0f')} | "
                     f"{fmt(run['sequences_per_cpu_s'], ',.0f')} | {fmt(share, '.0f')}% | "
                     f"{mt['loadavg_start'][0] if mt else ''} -> "
                     f"{mt['loadavg_end'][0] if mt else ''} |")
    lines += ["", f"Token counts: mean over {tok['batches']} training batches of "
              f"{tok['batch_size']} sequences (a seeded permutation of the train split, collated "
              "as in training); 'padded' counts what `token_batch` builds (rows x longest row). "
              f"Deduplicating by text across shops instead of by item within a shop would encode "
              f"{m['dedup_by_text_texts']:,.0f} texts per step instead of "
              f"{m['dedup_items']:,.0f}."]
    if est:
        lines += ["", f"Encoder seconds per step if it ran in the step, estimated from a timed "
                  f"{est['encoder']} forward+backward on {est['texts']} item texts "
                  f"({est['threads']} thread, {est['train_ms_per_padded_token']:.2f} CPU-ms "
                  f"per padded token): dedup {est['dedup_train_s']:.1f} s, naive "
                  f"{est['naive_train_s']:.1f} s, sampled softmax "
                  f"{est['sampled_softmax_train_s']:.1f} s, full catalogs "
                  f"{est['full_catalog_train_s']:.1f} CPU-s per step, against "
                  f"{est['model_step_s']:.2f} CPU-s for a whole frozen-cache training step "
                  "(plain loop). "
                  f"The one-off MiniLM encoding of all {fz['distinct_texts']:,} texts: about "
                  f"{fz['minilm_inference_seconds_estimate']:.0f} s."]
    lines += ["", "Per-epoch numbers, CPU time of other processes per run, worker thread and "
              "niceness settings: `train_speed.json`."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: scale 0.3, 2 epochs, 4 token batches")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                    help="directory for train_speed.json and train_speed.md")
    ap.add_argument("--scale", type=float, default=None, help="synthetic scale (default 1.0)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4)")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5,
                    help="Ray CPUs per train worker (0.5 leaves Ray Data a CPU on 2 cores)")
    ap.add_argument("--encoder", choices=["tiny", "bundled"], default="tiny",
                    help="frozen text vectors: a random 1-layer BERT of MiniLM's width "
                         "(fast) or the bundled MiniLM (about a minute more)")
    ap.add_argument("--token-batches", type=int, default=None,
                    help="training batches sampled for the token counts (default 20)")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed run")
    ap.add_argument("--render", action="store_true",
                    help="only re-write train_speed.md from an existing train_speed.json")
    ap.add_argument("--no-nice0", action="store_true",
                    help="skip the extra plain run at nice 0 (the effect of Ray's worker "
                         "niceness on a busy machine)")
    args = ap.parse_args(argv)
    if args.render:
        write_markdown(args.out / "train_speed.md",
                       json.loads((args.out / "train_speed.json").read_text()))
        print((args.out / "train_speed.md").read_text())
        return 0
    args.scale = args.scale or (0.3 if args.quick else 1.0)
    args.epochs = args.epochs or (2 if args.quick else 4)
    args.token_batches = args.token_batches or (4 if args.quick else 20)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is warm-up)")

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from recsys.data.catalog import BUNDLED_ENCODER
    from recsys.training.trainer import prepare

    info = machine_info()
    load_start = loadavg()
    log(f"{info['cpu_count_logical']} CPUs, torch {info['versions']['torch']}, "
        f"Ray {info['versions']['ray']}, load {load_start}")
    tmp = Path(tempfile.mkdtemp(prefix="recsys-train-speed-"))
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    meters: dict[str, Any] = {}
    try:
        start_ray()
        # -- data --------------------------------------------------------------------------
        t0 = time.perf_counter()
        encoder = (BUNDLED_ENCODER if args.encoder == "bundled"
                   else save_tiny_encoder(tmp / "tiny-encoder"))
        es = build_examples(tmp, args.scale, encoder)
        data_s = time.perf_counter() - t0
        log(f"example set x{args.scale}: {data_s:.0f} s")
        base = job_config(es, tmp, "plain", args.epochs, cpus=args.cpus_per_worker)
        with CpuMeter() as m:
            setup = prepare(base)  # frozen vectors: each distinct text encoded once (cache miss)
        meters["prepare_encode"] = m.summary
        encode_s = m.wall
        log(f"prepare (frozen text vectors, {setup.inputs.cache_stats}): {encode_s:.1f} s")
        data = train_arrays(es, setup.train_platforms)
        tt = token_tables(es, list(setup.inputs.items))

        # -- Order: plain_a, ray_ddp_1w, plain_b (A-B-A against drifting load), plain_nice0,
        #    then the 2-worker runs. The plain loop runs at the thread count and niceness Ray
        #    gives a worker (predicted, then checked against what the worker reported).
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, int(args.cpus_per_worker)))
        nice = int(os.environ.get("RAY_worker_niceness", RAY_DEFAULT_WORKER_NICENESS))

        def plain(label: str, at_nice: int) -> None:
            log(f"{label}: same loop in this process, {threads} thread(s), nice {at_nice}, "
                f"{args.epochs} epochs (load {loadavg()})")
            with CpuMeter() as m:
                runs[label] = plain_loop(base, setup, data, threads, at_nice, label)
            meters[label] = m.summary
            log(f"{label}: {runs[label]['sequences_per_s']:,.0f} seq/s")

        def ray_job(name: str, engine: str, workers: int) -> None:
            cfg = job_config(es, tmp, name, args.epochs, engine, workers, args.cpus_per_worker)
            log(f"{name}: {engine}, {workers} worker(s) x {args.cpus_per_worker} CPU, "
                f"{args.epochs} epochs (load {loadavg()})")
            with CpuMeter() as m:
                runs[name] = ray_run(cfg, setup, tmp)
            meters[name] = m.summary
            log(f"{name}: {runs[name]['sequences_per_s']:,.0f} seq/s "
                f"(fit {runs[name]['fit_seconds']:.0f} s)")

        plain("plain_a", nice)
        ray_job("ray_ddp_1w", "ddp", 1)
        wt = runs["ray_ddp_1w"]["worker_threads"]
        if wt and (int(wt[0]["torch_num_threads"]) != threads or int(wt[0]["nice"]) != nice):
            threads, nice = int(wt[0]["torch_num_threads"]), int(wt[0]["nice"])
            log(f"the worker used {threads} thread(s) at nice {nice}: plain_a again")
            plain("plain_a", nice)
        plain("plain_b", nice)
        # 5. Batches grouped by history length (the default) vs random batches, same loop.
        log(f"plain_random: length_buckets=1 (random batches), load {loadavg()}")
        random_cfg = base.model_copy(update={"optim": base.optim.model_copy(
            update={"length_buckets": 1})})
        with CpuMeter() as m:
            runs["plain_random"] = plain_loop(random_cfg, setup, data, threads, nice,
                                              "plain_random")
        meters["plain_random"] = m.summary
        if nice != 0 and not args.no_nice0:
            plain("plain_nice0", 0)
        ray_job("ray_ddp_2w", "ddp", 2)
        if not args.no_deepspeed:
            ray_job("ray_ds2_2w", "deepspeed", 2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()

    # -- tokens (no Ray) ------------------------------------------------------------------------
    try:
        threads = runs["plain_b"]["threads"]
        log(f"encoder tokens per step on {args.token_batches} batches")
        tok = token_counts(base, setup, data, tt, args.token_batches)
        timed = time_encoder(BUNDLED_ENCODER, tt, threads, 16 if args.quick else 32,
                             1 if args.quick else 2)
        log(f"MiniLM: {timed['train_s_per_padded_token'] * 1e3:.3f} ms per padded token "
            f"(fwd+bwd), {timed['inference_s_per_padded_token'] * 1e3:.3f} ms (inference)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mp = tok["mean_per_step"]
    plain_step = statistics.median(e["cpu_seconds"] / e["steps"]
                                   for k in ("plain_a", "plain_b")
                                   for e in runs[k]["epochs"][1:])
    est = {"encoder": "all-MiniLM-L6-v2", "texts": timed["texts"], "threads": timed["threads"],
           "model_step_s": plain_step,
           "train_ms_per_padded_token": timed["train_s_per_padded_token"] * 1e3,
           **{f"{k}_train_s": mp[f"{k}_padded"] * timed["train_s_per_padded_token"]
              for k in ("dedup", "naive", "sampled_softmax", "full_catalog")}}
    lengths = tt["lengths_all"]
    frozen = {"tokens_per_step": 0,
              "distinct_texts": int(len(lengths)), "tokens_total": int(lengths.sum()),
              "catalog_items": int(sum(len(v) - 1 for v in tt["lengths"].values())),
              "encode_seconds_this_run": round(encode_s, 2),
              "encoder_this_run": args.encoder,
              "minilm_inference_seconds_estimate": round(
                  float(len(lengths) * 64 * timed["inference_s_per_padded_token"]), 1),
              "note": "vectors come from the cache (TextVectorCache): each distinct text is "
                      "encoded once per (encoder, max_tokens), ever; the step reads "
                      "PlatformTensors.text_vecs. The MiniLM estimate pads every text to "
                      "max_tokens=64 (an upper bound; the cache sorts by length)."}

    sps = {k: runs[k]["sequences_per_s"] if k in runs else float("nan")
           for k in ("plain_a", "plain_b", "plain_nice0", "ray_ddp_1w", "ray_ddp_2w",
                     "ray_ds2_2w")}
    sps["plain"] = (sps["plain_a"] + sps["plain_b"]) / 2  # A-B-A: the runs around ray_ddp_1w
    spc = {k: runs[k]["sequences_per_cpu_s"] if k in runs else float("nan")
           for k in ("plain_a", "plain_b", "plain_nice0", "ray_ddp_1w", "ray_ddp_2w",
                     "ray_ds2_2w")}
    spc["plain"] = (spc["plain_a"] + spc["plain_b"]) / 2
    comparisons = {
        "sps": sps,
        "sequences_per_cpu_s": spc,
        "cpu_normalised": {
            "note": "sequences per CPU-second of the training processes (Ray: worker "
                    "processes, all threads, from the first batch request to the end of the "
                    "epoch's batches; plain: this process during the epoch). Less sensitive to "
                    "other load than wall-clock rates; misses Ray Data work done outside the "
                    "worker (SplitCoordinator).",
            "ray_over_plain": spc["ray_ddp_1w"] / spc["plain"],
            "deepspeed_over_ddp": spc["ray_ds2_2w"] / spc["ray_ddp_2w"],
            "two_over_one_workers": spc["ray_ddp_2w"] / spc["ray_ddp_1w"],
        },
        "ray_over_plain": sps["ray_ddp_1w"] / sps["plain"],
        "ray_over_plain_a": sps["ray_ddp_1w"] / sps["plain_a"],
        "ray_over_plain_b": sps["ray_ddp_1w"] / sps["plain_b"],
        "plain_b_over_plain_a": sps["plain_b"] / sps["plain_a"],
        "plain_nice0_over_plain_b": sps["plain_nice0"] / sps["plain_b"],
        "deepspeed_over_ddp": sps["ray_ds2_2w"] / sps["ray_ddp_2w"],
        "two_over_one_workers": sps["ray_ddp_2w"] / sps["ray_ddp_1w"],
        "scaling_efficiency": sps["ray_ddp_2w"] / (2 * sps["ray_ddp_1w"]),
        "length_buckets_over_random": sps["plain_b"] / runs["plain_random"]["sequences_per_s"],
        "padding_random_over_buckets": (runs["plain_random"]["padded_positions_per_real"]
                                        / runs["plain_b"]["padded_positions_per_real"]),
    }
    comparisons["ray_over_plain_met"] = bool(comparisons["ray_over_plain"]
                                             >= TARGET_RAY_OVER_PLAIN)
    timed_meters = [v for k, v in meters.items() if k != "prepare_encode"]
    other = sum(x["cpu_s"]["other"] for x in timed_meters)
    capacity = sum(x["cpu_s"]["machine_capacity"] for x in timed_meters)
    wthreads = sorted({(w["OMP_NUM_THREADS"], w["torch_num_threads"], w["nice"])
                       for r in runs if r.startswith("ray_") for w in runs[r]["worker_threads"]})
    summary_threads = ", ".join(f"OMP_NUM_THREADS={o} -> torch {t} thread(s) at nice {n}"
                                for o, t, n in wthreads)
    catalog_items = frozen["catalog_items"]
    result = {
        "benchmark": "bench/train_speed.py",
        "machine": info,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "other_cpu_share_pct": 100 * other / capacity if capacity else float("nan"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "out"},
        "data": {"scale": args.scale, "platforms": PLATFORMS,
                 "train_rows": int(len(data["target"])), "catalog_items": catalog_items,
                 "manifest_platforms": es.manifest["platforms"],
                 "example_set_seconds": round(data_s, 1),
                 "encoder": args.encoder,
                 "encoder_label": ("the bundled all-MiniLM-L6-v2" if args.encoder == "bundled"
                                   else "a random 1-layer BERT of MiniLM's width (384) and "
                                        "tokenizer")},
        "config": base.model_dump(mode="json", include={"model", "loss", "optim", "data"}),
        "method": {
            "sequences_per_s": "median over epochs 1.. (epoch 0 = warm-up) of sequences / "
                               "train seconds; Ray: the loop's own metric (rank 0: sequences of "
                               "all ranks / its epoch time, which includes Ray Data shard "
                               "iteration, local shuffle and collate); plain: collate + forward "
                               "+ backward + optimizer step only",
            "threads": "the Ray worker's OMP_NUM_THREADS, torch.get_num_threads() and niceness "
                       "are read inside the worker; the plain loop runs with "
                       "torch.set_num_threads and the niceness of the worker (Ray starts "
                       "workers at worker_niceness 15); plain_nice0 is the same at nice 0",
            "order": "plain_a, ray_ddp_1w, plain_b, plain_nice0, ray_ddp_2w, ray_ds2_2w; "
                     "plain = mean of plain_a and plain_b (A-B-A against drifting load)",
            "cpu": "cpu_s per measurement: this driver, its descendants (Ray processes and "
                   "workers, sampled every 1 s), the whole machine, and other = the rest "
                   "(background load). machine_nice = CPU time of niced processes",
            "tokens": "counted from tokens.parquet lengths (max_tokens 64) on sampled training "
                      "batches collated as in training; padded = what token_batch builds "
                      "(rows x longest row of the call, one call per platform for dedup)",
        },
        "worker_threads_summary": summary_threads,
        "comparisons": comparisons,
        "runs": runs,
        "meters": meters,
        "encoder_tokens": tok,
        "encoder_timing_minilm": timed,
        "encoder_seconds_estimate": est,
        "frozen_cache": frozen,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / "train_speed.md", result)
    log(f"wrote {args.out / 'train_speed.json'} and {args.out / 'train_speed.md'} "
        f"in {result['total_seconds']:.0f} s")
    print((args.out / "train_speed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
