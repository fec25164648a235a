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
    python bench/train_speed.py --render      # only re-write the .md from the .json

This script runs the sequence and writes the results; the parts live beside it: the plain loop
in ``train_speed_plain.py``, the instrumented Ray Train runs in ``train_speed_ray.py``, the token
counts in ``train_speed_tokens.py``, the comparisons and the Markdown in ``train_speed_report.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import (
    RESULTS,
    SYNTHETIC_PLATFORMS,
    CpuMeter,
    build_synthetic_examples,
    loadavg,
    machine_info,
    save_results,
    save_tiny_encoder,
    start_private_ray,
    stderr_log,
)
from train_speed_plain import plain_loop, train_arrays
from train_speed_ray import ray_run
from train_speed_report import (
    METHOD,
    comparisons,
    encoder_estimate,
    frozen_cache,
    other_cpu_share_pct,
    worker_threads_summary,
    write_markdown,
)
from train_speed_tokens import time_encoder, token_counts, token_tables

if TYPE_CHECKING:
    from recsys.data.examples import ExampleSet
    from recsys.training.config import TrainJobConfig
    from recsys.training.trainer import TrainSetup

log = stderr_log("train_speed")
RAY_DEFAULT_WORKER_NICENESS = 15  # Ray's worker_niceness (RAY_worker_niceness overrides it)


def job_config(es: ExampleSet, tmp: Path, name: str, epochs: int, engine: str = "ddp",
               workers: int = 1, cpus: float = 0.5) -> TrainJobConfig:
    """The benchmark's training job: the model of configs/train at dim 64 / 2 layers, full
    softmax, micro batch 256, frozen text vectors cached under ``tmp``, no tracking."""
    from recsys.training.config import TrainJobConfig

    return TrainJobConfig.model_validate({
        "name": name,
        "mode": "pretrain",
        "data": {"examples": str(es.path), "sequences": {"max_seq_len": 50},
                 "text": es.manifest.config.text.model_dump(mode="json")},
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


# --------------------------------------------------------------------------------------------
# The sequence of runs, and the results file
# --------------------------------------------------------------------------------------------

def time_runs(args: argparse.Namespace, es: ExampleSet, tmp: Path, base: TrainJobConfig,
              setup: TrainSetup, data: dict[str, Any],
              meters: dict[str, Any]) -> dict[str, Any]:
    """Order: plain_a, ray_ddp_1w, plain_b (A-B-A against drifting load), plain_random,
    plain_nice0, then the 2-worker runs. The plain loop runs at the thread count and niceness
    Ray gives a worker (predicted, then checked against what the worker reported). Each run's
    CpuMeter summary goes into ``meters``; returns the runs by name."""
    runs: dict[str, Any] = {}
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
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: scale 0.3, 2 epochs, 4 token batches")
    ap.add_argument("--out", type=Path, default=RESULTS,
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
    if not args.render:
        args.scale = args.scale or (0.3 if args.quick else 1.0)
        args.epochs = args.epochs or (2 if args.quick else 4)
        args.token_batches = args.token_batches or (4 if args.quick else 20)
        if args.epochs < 2:
            ap.error("--epochs must be >= 2 (the first epoch is warm-up)")
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_markdown(args.out / "train_speed.md",
                       json.loads((args.out / "train_speed.json").read_text()))
        print((args.out / "train_speed.md").read_text())
        return 0

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from recsys.data.catalog import BUNDLED_ENCODER
    from recsys.training.trainer import prepare

    info = machine_info(("torch", "ray", "deepspeed", "transformers", "numpy"),
                        gpu=_cuda_available())
    load_start = loadavg()
    log(f"{info['cpu_count_logical']} CPUs, torch {info['versions']['torch']}, "
        f"Ray {info['versions']['ray']}, load {load_start}")
    tmp = Path(tempfile.mkdtemp(prefix="recsys-train-speed-"))
    started = time.perf_counter()
    meters: dict[str, Any] = {}
    try:
        start_private_ray(log)
        t0 = time.perf_counter()
        encoder = (BUNDLED_ENCODER if args.encoder == "bundled"
                   else save_tiny_encoder(tmp / "tiny-encoder"))
        es = build_synthetic_examples(tmp, args.scale, encoder)
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
        runs = time_runs(args, es, tmp, base, setup, data, meters)
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

    frozen = frozen_cache(tt, encode_s, args.encoder, timed)
    result = {
        "benchmark": "bench/train_speed.py",
        "machine": info,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "other_cpu_share_pct": other_cpu_share_pct(meters),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "out"},
        "data": {"scale": args.scale, "platforms": SYNTHETIC_PLATFORMS,
                 "train_rows": int(len(data["target"])),
                 "catalog_items": frozen["catalog_items"],
                 "manifest_platforms": es.manifest.as_json_dict()["platforms"],
                 "example_set_seconds": round(data_s, 1),
                 "encoder": args.encoder,
                 "encoder_label": ("the bundled all-MiniLM-L6-v2" if args.encoder == "bundled"
                                   else "a random 1-layer BERT of MiniLM's width (384) and "
                                        "tokenizer")},
        "config": base.model_dump(mode="json", include={"model", "loss", "optim", "data"}),
        "method": METHOD,
        "worker_threads_summary": worker_threads_summary(runs),
        "comparisons": comparisons(runs),
        "runs": runs,
        "meters": meters,
        "encoder_tokens": tok,
        "encoder_timing_minilm": timed,
        "encoder_seconds_estimate": encoder_estimate(runs, tok, timed),
        "frozen_cache": frozen,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_results(args.out, "train_speed", result, write_markdown, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
