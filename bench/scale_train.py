"""Training cost against catalog size (issue 24): time of one training step (forward + backward
of ``RecommenderObjective``, no optimizer step, CPU) with a full softmax vs a sampled softmax,
at catalogs of 10k, 100k and 1M items.

* ``frozen``: cached text vectors (the ``freeze_encoder`` / ``adapter_only`` path), random,
  width 64; the item tower runs over the whole catalog (full softmax) or over the step's items
  only (sampled softmax: in-batch + ``num_negatives`` uniform negatives with the mixed logQ,
  ``loss.negatives=in_batch_uniform``; and the popularity sampler, whose multinomial draw reads
  the whole catalog's probabilities every step).
* ``encoder``: the text encoder in the step (``transfer.strategy=full``) with a stand-in: a
  2-layer BERT of width 32 built from a config (random weights, no download), 8 tokens per
  item. Full softmax encodes every item each step; the sampled softmax encodes the step's
  items (candidates + histories) only. 10k and 100k items (encoding 1M items per step does not
  fit this machine's time budget; the trend is clear by 100k).

Random item tables, histories and targets: the cost of a step does not depend on what the data
mean. ``--quality`` adds the other half of the issue's claim: scratch training on the shared
Scientific data with the full vs the sampled softmax (in-batch + uniform, logQ), same settings,
test NDCG@10 with 95% bootstrap intervals (~15-30 min on 2 loaded cores).

    .venv/bin/python bench/scale_train.py                # step times (~3-5 min on 2 cores)
    .venv/bin/python bench/scale_train.py --quality      # + the Scientific comparison

Writes bench/results/scale_train.{json,md}; ``run_scale_train`` is what ``bench/scale.py``
calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SCIENTIFIC = REPO.parent / "shared" / "data" / "amazon18_scientific_unisrec"
FROZEN_SIZES = (10_000, 100_000, 1_000_000)
ENCODER_SIZES = (10_000, 100_000)
BATCH, HIST_LEN, NEGATIVES = 16, 8, 512
TEXT_DIM = DIM = 64
TOKENS = 8


def _platform(n: int, seed: int, *, text_dim: int | None, vocab: int = 1000) -> Any:
    """A random catalog of ``n`` items as ``PlatformTensors``: cached text vectors of width
    ``text_dim``, or (None) token ids for an encoder in the step; Zipf-like popularity."""
    from recsys.training.objective import PlatformTensors

    rng = np.random.default_rng(seed)
    pop = rng.zipf(1.3, n + 1).astype(np.float64)
    pop[0] = 0.0
    p = pop + 1.0
    p[0] = 0.0
    logp = np.log(np.where(p > 0, p / p.sum(), 1.0))
    logp[0] = -np.inf
    vecs = tokens = None
    if text_dim is not None:
        vecs = torch.from_numpy(rng.standard_normal((n + 1, text_dim), np.float32))
        vecs[0] = 0.0
    else:
        ids = rng.integers(1, vocab, (n, TOKENS)).astype(np.int32)
        tokens = [np.zeros(0, np.int32), *ids]
    return PlatformTensors(platform_id=0, brand_ids=torch.zeros(n + 1, dtype=torch.long),
                           category_ids=torch.zeros(n + 1, 1, dtype=torch.long),
                           text_vecs=vecs, token_ids=tokens,
                           sample_logp=torch.as_tensor(logp, dtype=torch.float32))


def _encoder(width: int = 32) -> Any:
    from transformers import BertConfig, BertModel

    from recsys.model.encoder import TextEncoder

    torch.manual_seed(0)
    return TextEncoder(BertModel(BertConfig(
        hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * width, vocab_size=1000, max_position_embeddings=TOKENS + 2)))


def _objective(platform: Any, kind: str, negatives: str, encoder: Any = None,
               refresh_every: int = 0) -> Any:
    from recsys.model.recommender import Recommender
    from recsys.training.config import LossConfig
    from recsys.training.objective import RecommenderObjective

    torch.manual_seed(0)
    text_dim = TEXT_DIM if encoder is None else encoder.hidden_size
    model = Recommender(text_dim=text_dim, dim=DIM, num_platforms=1, num_brands=1,
                        num_categories=1, max_len=HIST_LEN, num_layers=2, num_heads=2,
                        dropout=0.1, num_experts=4, repeat_bias=True, text_encoder=encoder)
    cfg = LossConfig(kind=kind, negatives=negatives, num_negatives=NEGATIVES)
    return RecommenderObjective(model, cfg, {0: platform}, refresh_every=refresh_every).train()


def _step_seconds(obj: Any, n: int, repeats: int, seed: int = 0,
                  warmup: bool = True) -> dict[str, Any]:
    """Median seconds of forward + backward over ``repeats`` steps, after one warm-up step
    (none for the slow cells: a minute-long step hardly needs one); a fresh random batch of
    ``BATCH`` histories of ``HIST_LEN`` items each step."""
    gen = torch.Generator().manual_seed(seed)
    times = []
    first = None
    for i in range(repeats + int(warmup)):
        history = torch.randint(1, n + 1, (BATCH, HIST_LEN), generator=gen)
        target = torch.randint(1, n + 1, (BATCH,), generator=gen)
        platform = torch.zeros(BATCH, dtype=torch.long)
        obj.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss, _ = obj(history, target, platform)
        loss.backward()
        if i or not warmup:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
        else:
            first = time.perf_counter() - t
    return {"first_s": None if first is None else round(first, 4),
            "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "steps": repeats,
            "loss": round(float(loss.detach()), 3)}


def run_scale_train(frozen_sizes: tuple[int, ...] = FROZEN_SIZES,
                    encoder_sizes: tuple[int, ...] = ENCODER_SIZES,
                    log: Callable[[str], None] = print, threads: int = 1) -> dict[str, Any]:
    """Step times per catalog size (see the module docstring); a JSON-ready dict. One torch
    thread by default: on a shared, loaded machine two threads contend and the times scatter."""
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    for n in frozen_sizes:
        p = _platform(n, seed=1, text_dim=TEXT_DIM)
        row: dict[str, Any] = {"path": "frozen", "items": n}
        big = n >= 1_000_000
        row["full_softmax"] = _step_seconds(_objective(p, "full_softmax", "popularity"), n,
                                            repeats=1 if big else 3, warmup=not big)
        row["sampled_uniform"] = _step_seconds(
            _objective(p, "sampled_softmax", "in_batch_uniform"), n, repeats=5)
        row["sampled_popularity"] = _step_seconds(
            _objective(p, "sampled_softmax", "popularity"), n, repeats=5)
        rows.append(row)
        log(f"frozen {n:>9,}: full {row['full_softmax']['median_s']:.3f} s, sampled "
            f"(uniform) {row['sampled_uniform']['median_s']:.3f} s, sampled (popularity) "
            f"{row['sampled_popularity']['median_s']:.3f} s")
        del p
    for n in encoder_sizes:
        p = _platform(n, seed=2, text_dim=None)
        row = {"path": "encoder", "items": n}
        row["full_softmax"] = _step_seconds(
            _objective(p, "full_softmax", "popularity", _encoder()), n, repeats=1,
            warmup=n < 100_000)
        # refresh every 1000 steps: the warm-up step refreshes, the timed ones do not
        row["full_stale"] = _step_seconds(
            _objective(p, "full_softmax", "popularity", _encoder(), refresh_every=1000), n,
            repeats=2)
        row["sampled_uniform"] = _step_seconds(
            _objective(p, "sampled_softmax", "in_batch_uniform", _encoder()), n, repeats=3)
        rows.append(row)
        log(f"encoder {n:>8,}: encode all (full) {row['full_softmax']['median_s']:.3f} s, "
            f"full + stale cache {row['full_stale']['median_s']:.3f} s (refresh step "
            f"{row['full_stale']['first_s']:.3f} s), encode candidates (sampled) "
            f"{row['sampled_uniform']['median_s']:.3f} s")
        del p
    return {"rows": rows, "batch": BATCH, "history_len": HIST_LEN, "num_negatives": NEGATIVES,
            "dim": DIM, "text_dim": TEXT_DIM, "encoder": "BERT 2 layers, width 32, random, "
            f"{TOKENS} tokens per item", "torch_threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


# -- quality on Scientific ------------------------------------------------------------------------

QUALITY_OUTPUT = "runs/bench_scale_train"
QUALITY_BASE: dict[str, Any] = {  # bench/privacy.py's BASE model and optimiser, scratch
    "mode": "scratch", "train_platforms": ["scientific"],
    "data": {"examples": "runs/shared/examples", "sequences": {"max_seq_len": 50}},
    "model": {"dim": 128, "num_layers": 2, "num_heads": 2, "dropout": 0.3, "num_experts": 8},
    "loss": {"kind": "full_softmax", "temperature": 0.07, "ctr_weight": 0.1},
    "optim": {"lr": 0.003, "micro_batch_size": 256, "epochs": 6, "min_epochs": 6,
              "early_stopping_patience": 6},
    "scaling": {"engine": "ddp", "num_workers": 1, "cpus_per_worker": 1.0},
    "tracking": {"enabled": False},
    "output_dir": QUALITY_OUTPUT,
    "resume": False,
}
QUALITY_ARMS: dict[str, dict[str, Any]] = {
    "full_softmax": {"loss": {"kind": "full_softmax"}},
    "sampled_in_batch_uniform": {"loss": {"kind": "sampled_softmax",
                                          "negatives": "in_batch_uniform",
                                          "num_negatives": NEGATIVES, "logq_correction": True}},
    "sampled_popularity": {"loss": {"kind": "sampled_softmax", "negatives": "popularity",
                                    "num_negatives": NEGATIVES, "logq_correction": True}},
}


def run_quality(epochs: int = 6, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Scratch on Scientific, full vs sampled softmax; test NDCG@10 with 95% CIs."""
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO))
    from quality import ensure_examples
    from quality_plan import PSEUDONYM_KEY, merge

    from recsys.cluster import init_ray
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    os.chdir(REPO)
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", PSEUDONYM_KEY)
    ensure_examples()
    init_ray(num_cpus=2)
    runs = []
    for arm, over in QUALITY_ARMS.items():
        cfg = TrainJobConfig.model_validate(merge(QUALITY_BASE, {
            "name": f"scientific_scratch_{arm}", **over,
            "optim": {"epochs": epochs, "min_epochs": epochs,
                      "early_stopping_patience": epochs}}))
        t = time.perf_counter()
        out = run_training(cfg)
        res = out.report.platforms["scientific"]
        runs.append({"arm": arm, "loss": cfg.loss.model_dump(mode="json"),
                     "test": {"ndcg@10": res.metrics["ndcg@10"],
                              "recall@10": res.metrics["recall@10"],
                              "ndcg@10_ci": list(res.ci.get("ndcg@10", ())),
                              "users": res.users},
                     "best_valid_ndcg@10": out.best_metric, "epochs_run": len(out.curve),
                     "seconds": round(time.perf_counter() - t, 1)})
        log(f"{arm}: test NDCG@10 {res.metrics['ndcg@10']:.4f} in {runs[-1]['seconds']} s")
    full = runs[0]["test"]["ndcg@10"]
    for r in runs:
        r["ratio_to_full"] = r["test"]["ndcg@10"] / full if full else None
    return {"epochs": epochs, "base": QUALITY_BASE, "runs": runs,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


# -- report ---------------------------------------------------------------------------------------

def _t(cell: dict[str, Any]) -> str:
    return f"{cell['median_s']:.3f} [{cell.get('min_s', cell['median_s']):.3f}]"


def markdown(res: dict[str, Any]) -> str:
    lines = _steps_markdown(res["steps"]) if "steps" in res else [
        "# Training against catalog size", "", "(no step times recorded)"]
    q = res.get("quality")
    if q:
        lines += ["", f"## Quality: scratch on Scientific, {q['epochs']} epochs", "",
                  "Test split, full ranking, 95% bootstrap interval over users; same model, "
                  "optimiser and epochs (bench/privacy.py's BASE), only `loss` differs.", "",
                  "| arm | test NDCG@10 [95% CI] | recall@10 | share of full softmax | s |",
                  "|---|---|---|---|---|"]
        for r in q["runs"]:
            ci = r["test"]["ndcg@10_ci"] or [float("nan")] * 2
            lines.append(f"| {r['arm']} | {r['test']['ndcg@10']:.4f} [{ci[0]:.4f}, "
                         f"{ci[1]:.4f}] | {r['test']['recall@10']:.4f} "
                         f"| {r['ratio_to_full']:.3f} | {r['seconds']:.0f} |")
        if q.get("note"):
            lines += ["", q["note"]]
    return "\n".join(lines) + "\n"


def _steps_markdown(s: dict[str, Any]) -> list[str]:
    lines = ["# Training step time against catalog size: full vs sampled softmax", "",
             f"One step = forward + backward of `RecommenderObjective` (no optimizer step), CPU, "
             f"torch threads: {s['torch_threads']}, load average {s['loadavg']} (a shared "
             f"machine: compare within a column's trend, not across runs). Batch of "
             f"{s['batch']} random histories of {s['history_len']} items (so "
             f"{s['batch'] * s['history_len']} trained positions), model width {s['dim']}; "
             f"sampled softmax: the batch's labels + {s['num_negatives']} negatives. Median "
             "seconds per step after a warm-up step, the fastest step in brackets (other "
             "processes' load only ever adds). Regenerate: `python bench/scale_train.py`.",
             "", "## Cached text vectors (`freeze_encoder`, `adapter_only`)", "",
             f"Random text vectors of width {s['text_dim']}.", "",
             "| items | full softmax s | sampled, in-batch + uniform s "
             "| sampled, popularity s | full / sampled (uniform) |", "|---|---|---|---|---|"]
    for r in s["rows"]:
        if r["path"] != "frozen":
            continue
        f, u, p = (r[k] for k in ("full_softmax", "sampled_uniform", "sampled_popularity"))
        lines.append(f"| {r['items']:,} | {_t(f)} | {_t(u)} | {_t(p)} "
                     f"| {f['median_s'] / u['median_s']:.0f}x |")
    lines += ["", f"## Text encoder in the step (`transfer.strategy=full`): {s['encoder']}", "",
              "Full softmax encoding every item each step (today's default); full softmax with "
              "`encoder.refresh_every_steps` (the step's items encoded, the rest from a cache; "
              "the step that refreshes the cache in its own column, once per K steps); sampled "
              "softmax encoding its candidates and histories only.", "",
              "| items | full softmax, encode all s | full softmax, stale cache s "
              "| refresh step s | sampled (in-batch + uniform) s | encode all / sampled |",
              "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        if r["path"] != "encoder":
            continue
        f, u, st = r["full_softmax"], r["sampled_uniform"], r.get("full_stale")
        stale = (f"{_t(st)} | {st['first_s']:.3f}" if st else "n/a | n/a")
        lines.append(f"| {r['items']:,} | {_t(f)} | {stale} | {_t(u)} "
                     f"| {f['median_s'] / u['median_s']:.0f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", action="store_true",
                    help="also train scratch on Scientific with full vs sampled softmax")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--skip-steps", action="store_true",
                    help="keep the recorded step times (with --quality)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    path = a.out / "scale_train.json"
    res = json.loads(path.read_text()) if path.exists() else {}

    def log(msg: str) -> None:
        print(f"[scale_train] {msg}", file=sys.stderr, flush=True)

    if not a.skip_steps:
        res["steps"] = run_scale_train(log=log)
    if a.quality:
        if SCIENTIFIC.exists():
            res["quality"] = run_quality(a.epochs, log=log)
        else:
            log(f"quality skipped: the shared data is not there ({SCIENTIFIC})")
    a.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "scale_train.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
