"""Quality benchmark on the real shared datasets: full ranking, test split, per platform.

Runs (frozen-encoder cache mode: each item text is encoded once by MiniLM, then training runs at
sequence-model speed; DDP with 2 workers on CPU):

* ``scientific_scratch``, ``online_retail_scratch``: against VQ-Rec's published numbers;
  ``*_no_repeat``: the same without the learned repeat bias (``model.repeat_bias``: a score per
  platform for items already in the user's history), the text-only model as it was before;
  ``scientific_scratch_decay``: with ``optim.lr_decay`` (halved after 2 epochs without gain);
* ``scientific_scratch_ids``, ``online_retail_scratch_ids``: with a learned id vector per item
  (``model.item_ids``; Online Retail also with ``optim.lr_decay``);
* ``pretrain_sources``: one model on Online Retail + Office + MovieLens pooled;
  ``pretrain_sources_long``: the same carried on (from a copy of its checkpoints) with a smaller
  step each time validation stops rising;
* ``scientific_transfer_<strategy>``: that model transferred to Scientific; ``*_shrunk``: the
  same from shrunk and perturbed pretrained weights (``transfer.shrink`` / ``perturb``);
  ``*_long``: from ``pretrain_sources_long``;
* ``scientific10_*``: the same with only 10% of Scientific's users for training (seeded);
* ``*_seed<n>``: scratch and the shrunk transfer at 100% again with ``optim.seed`` n;
* ``pretrain_pooled``: the sources and Scientific's training events pooled (the product's
  recipe for a platform that already has logs), then ``*_pooled_seed3``: fine-tuned on
  Scientific, against ``scientific_scratch_seed3``.

Results merge into ``bench/results/quality.json`` by run name, so a long benchmark can be run
in parts (``--runs``); ``quality.md`` is rendered from everything recorded so far.

``--resume`` continues recorded runs from their last checkpoints under the plan's (larger) cap.
``--paired`` then re-evaluates the recorded exports: paired bootstrap intervals of transfer vs
scratch (and of the repeat bias), and each scratch run with its repeat bias removed at test.

    python bench/quality.py                        # everything (hours on 2 CPU cores)
    python bench/quality.py --runs scientific_scratch --max-epochs 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCES = ["online_retail", "office", "movielens"]
TARGET = "scientific"
CPU_STRATEGIES = ["freeze_encoder", "adapter_only"]

BASE: dict[str, Any] = {
    "data": {"examples": "runs/shared/examples", "sequences": {"max_seq_len": 50}},
    "model": {"dim": 128, "num_layers": 2, "num_heads": 2, "dropout": 0.3, "num_experts": 8},
    "loss": {"kind": "full_softmax", "temperature": 0.07, "ctr_weight": 0.1},
    # lr 0.003: VQ-Rec's fine-tuning rate on Scientific and Online Retail (its README); with
    # 0.001 Scientific scratch reached NDCG@10 0.0623 in 34 epochs, with 0.003 0.0641 in 25.
    "optim": {"lr": 0.003, "epochs": 40, "micro_batch_size": 256,
              "early_stopping_patience": 5, "min_epochs": 10},
    "scaling": {"engine": "ddp", "num_workers": 2, "cpus_per_worker": 0.5},
    "tracking": {"enabled": False},
    "output_dir": "runs/bench_quality",
    "resume": False,
}


# Shrink-and-perturb for the ``*_shrunk`` transfers, chosen on the 10%-users validation split
# (shrink 0.5/0.7 with perturb 0.5/0.3, 0.3 with 0/0.1/0.3, 0.2 with 0.1 were tried).
SHRINK_PERTURB = {"shrink": 0.3, "perturb": 0.1}

# Scientific at 100% of its users: scratch used all of a 40-epoch cap (valid NDCG@10 still
# rising), so every 100% run of the transfer comparison gets 60 (runs recorded at 40 were
# resumed to 60 with ``--resume``). Extra seeds of the two arms that matter (scratch and the
# shrunk transfer) separate a real gain from one seed's luck.
CAP_100 = {"optim": {"epochs": 60}}
SEEDS = [1, 2]
SEEDED = ("scientific_scratch", "scientific_transfer_freeze_encoder_shrunk")
POOLED_SEED = 3


def plan(strategies: list[str]) -> dict[str, dict[str, Any]]:
    """Run name -> config overrides (on top of BASE)."""
    runs: dict[str, dict[str, Any]] = {
        "scientific_scratch": {"mode": "scratch", "train_platforms": [TARGET], **CAP_100},
        "scientific_scratch_no_repeat": {"mode": "scratch", "train_platforms": [TARGET],
                                         "model": {"repeat_bias": False}},
        # Text + a learned vector per item (UniSRec's text+ID): more capacity on items with
        # history, which Scientific's short sequences (7 events per user) overfit.
        "scientific_scratch_ids": {"mode": "scratch", "train_platforms": [TARGET],
                                   "model": {"item_ids": True}},
        # The same with a smaller step once validation stops rising (optim.lr_decay).
        "scientific_scratch_decay": {"mode": "scratch", "train_platforms": [TARGET],
                                     "optim": {"lr_decay": 0.5}},
        "online_retail_scratch": {"mode": "scratch", "train_platforms": ["online_retail"],
                                  "optim": {"epochs": 30}},
        "online_retail_scratch_no_repeat": {"mode": "scratch",
                                            "train_platforms": ["online_retail"],
                                            "model": {"repeat_bias": False},
                                            "optim": {"epochs": 30}},
        # Online Retail is dense (150 events per item): text + ID, and a smaller step once the
        # validation score stops rising (it bounced around its plateau at a constant rate).
        "online_retail_scratch_ids": {"mode": "scratch", "train_platforms": ["online_retail"],
                                      "model": {"item_ids": True},
                                      "optim": {"epochs": 40, "lr_decay": 0.5}},
        # A pretraining budget, not convergence: 12 passes over 670k events (~15 min on 2 cores).
        "pretrain_sources": {"mode": "pretrain", "train_platforms": SOURCES,
                             "optim": {"epochs": 12}},
        # The same pretraining carried on from its 12th epoch, with a smaller step each time
        # validation stops rising, until it stops (its valid NDCG@10 was still near its best).
        "pretrain_sources_long": {"mode": "pretrain", "train_platforms": SOURCES,
                                  "continue_from": "pretrain_sources",
                                  "optim": {"epochs": 30, "lr_decay": 0.5}},
        "scientific10_scratch": {"mode": "scratch", "train_platforms": [TARGET],
                                 "user_fraction": 0.1},
        # The product's own recipe: pretrain on every platform's pooled logs, the target's
        # training users included (its valid/test events stay held out), then fine-tune.
        "pretrain_pooled": {"mode": "pretrain", "train_platforms": [*SOURCES, TARGET],
                            "optim": {"epochs": 12}},
    }
    init = f"{BASE['output_dir']}/pretrain_sources/export"
    long = {"mode": "transfer", "train_platforms": [TARGET],
            "transfer": {"init_from": f"{BASE['output_dir']}/pretrain_sources_long/export",
                         "strategy": "freeze_encoder", **SHRINK_PERTURB}}
    runs["scientific_transfer_freeze_encoder_shrunk_long"] = {**long, **CAP_100}
    runs["scientific10_transfer_freeze_encoder_shrunk_long"] = {**long, "user_fraction": 0.1}
    for s in strategies:
        transfer = {"mode": "transfer", "train_platforms": [TARGET],
                    "transfer": {"init_from": init, "strategy": s}}
        runs[f"scientific_transfer_{s}"] = {**transfer, **CAP_100}
        runs[f"scientific10_transfer_{s}"] = {**transfer, "user_fraction": 0.1}
        if s != "adapter_only":  # shrinking weights that stay frozen only loses them
            shrunk = {**transfer, "transfer": {**transfer["transfer"], **SHRINK_PERTURB}}
            runs[f"scientific_transfer_{s}_shrunk"] = {**shrunk, **CAP_100}
            runs[f"scientific10_transfer_{s}_shrunk"] = {**shrunk, "user_fraction": 0.1}
    for name in SEEDED:
        if name in runs:
            for seed in SEEDS:
                runs[seeded(name, seed)] = merge(runs[name], {"optim": {"seed": seed}})
    # Fine-tuned from the pooled model as it is (it has seen the target already), against a
    # scratch run of its own seed (the earlier runs' exports were not kept for pairing).
    pooled = {"mode": "transfer", "train_platforms": [TARGET],
              "transfer": {"init_from": f"{BASE['output_dir']}/pretrain_pooled/export",
                           "strategy": "freeze_encoder"}}
    runs[seeded("scientific_transfer_freeze_encoder_pooled", POOLED_SEED)] = merge(
        {**pooled, **CAP_100}, {"optim": {"seed": POOLED_SEED}})
    runs[seeded("scientific_scratch", POOLED_SEED)] = merge(runs["scientific_scratch"],
                                                            {"optim": {"seed": POOLED_SEED}})
    return runs


def seed_of(run: str) -> int:
    """0 for the plan's base runs, n for their ``*_seed<n>`` twins."""
    head, _, tail = run.rpartition("_seed")
    return int(tail) if head and tail.isdigit() else 0


def seeded(run: str, seed: int) -> str:
    """The name of ``run`` trained with ``optim.seed`` ``seed`` (0: the run itself)."""
    return run if seed == 0 else f"{run}_seed{seed}"


def recorded_seeds(runs: dict[str, Any]) -> list[int]:
    """Seeds under which both arms of the 100% comparison (``SEEDED``) are recorded."""
    return [n for n in [0, *SEEDS] if all(seeded(r, n) in runs for r in SEEDED)]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ensure_examples() -> None:
    """Build the shared-data example set once (ingest + Ray Data), if missing."""
    if (REPO / "runs/shared/examples/manifest.json").exists():
        return
    from recsys.config import load_config
    from recsys.pipeline import PipelineConfig, run_pipeline

    run_pipeline(load_config(PipelineConfig, REPO / "configs/pipeline/shared_data.yaml",
                             ["stages=[ingest,examples]"]))


def run_one(name: str, overrides: dict[str, Any], max_epochs: int | None,
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run from scratch, or (``previous``: its recorded result) continue it from its
    latest checkpoint under the plan's cap (Ray Train resumes a run of the same name)."""
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    overrides = dict(overrides)
    source = overrides.pop("continue_from", None)
    cfg_dict = merge(BASE, {"name": name, **overrides})
    if max_epochs:
        cfg_dict["optim"]["epochs"] = max_epochs
    cfg_dict["resume"] = previous is not None or source is not None
    if source is not None:  # start from a copy of another run's checkpoints (Ray Train resumes)
        continue_from(Path(BASE["output_dir"]) / source, Path(BASE["output_dir"]) / name)
    cfg = TrainJobConfig.model_validate(cfg_dict)
    out = run_training(cfg)
    extra = {} if previous is None else {
        "resumed": {"epochs_before": previous["epochs_run"],
                    "cap_before": previous["config"]["optim"]["epochs"],
                    "run_before": previous.get("continued_from", name)}}
    return {
        "config": cfg.model_dump(mode="json"),
        **extra,
        "seconds": round(out.seconds + (previous["seconds"] if previous else 0.0), 1),
        "epochs_run": len(out.curve),
        "best_valid_ndcg@10": out.best_metric,
        "curve": out.curve,
        "test": {p: {"metrics": r.metrics, "history_excluded": r.history_excluded,
                     "cold_start": r.subsets.get("cold_start"), "auc": r.auc, "users": r.users}
                 for p, r in out.report.platforms.items()},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def continue_from(src: Path, dst: Path) -> None:
    """A fresh copy of ``src``'s Ray Train state (checkpoints and their manifest, which names
    them by relative path) under ``dst``, so the run ``dst`` carries on where ``src`` stopped
    and ``src`` stays as recorded."""
    import shutil

    if not (src / "checkpoint_manager_snapshot.json").exists():
        raise SystemExit(f"{src} has no checkpoints to continue from; run it first")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export", "report"))


def has_export(results: dict[str, Any], run: str) -> bool:
    """The run's export is on disk and is the one recorded (same best validation score): not
    so in a fresh checkout, or after the run was trained again under another name's files."""
    meta = Path(BASE["output_dir"]) / run / "export" / "export.json"
    if run not in results["runs"] or not meta.exists():
        return False
    best = json.loads(meta.read_text())["metrics"].get("best_valid_ndcg@10")
    return best is not None and abs(best - results["runs"][run]["best_valid_ndcg@10"]) < 1e-9


def paired_gains(results: dict[str, Any], n_boot: int = 2000) -> dict[str, Any]:
    """Transfer - scratch NDCG@10 per test user, and a paired bootstrap interval of its mean.

    Both models rank the same test users, so the difference is resampled user by user: much
    narrower than two separate intervals, since the models agree on most users. Re-evaluates
    the runs' exports (the same function as the runs' own test reports). A pair whose exports
    are not both on disk as recorded (another checkout, or a run trained again since) keeps
    the interval recorded before, so runs can be added without re-training the old ones.
    """
    from recsys.data.examples import load_example_set
    from recsys.evaluation.metrics import bootstrap_ci, per_user
    from recsys.model.export import load_export
    from recsys.evaluation.offline import evaluate_export

    es = load_example_set(BASE["data"]["examples"])
    out_dir = Path(BASE["output_dir"])
    cache: dict[str, Any] = {}
    previous = results.get("paired", {})

    def ndcg(run: str) -> Any:
        if run not in cache:
            ranks: dict[str, Any] = {}
            evaluate_export(load_export(out_dir / run / "export"), es, split="test",
                            platforms=[TARGET], run=run, ranks_out=ranks)
            cache[run] = per_user(ranks[TARGET], "ndcg@10")
        return cache[run]

    def scratch_of(run: str) -> str:  # the scratch run of the same users and seed
        return seeded(f"{run.split('_transfer_')[0]}_scratch", seed_of(run))

    pairs = [(run, scratch_of(run)) for prefix in ("scientific", "scientific10")
             for run in sorted(r for r in results["runs"] if r.startswith(f"{prefix}_transfer_"))]
    pairs.append(("scientific_scratch", "scientific_scratch_no_repeat"))  # the repeat bias
    pairs.append(("pretrain_pooled", seeded("scientific_scratch", POOLED_SEED)))  # as it is
    out: dict[str, Any] = {}

    def record(key: str, base: str, diff: Any, **extra: Any) -> None:
        low, high = bootstrap_ci(diff, n=n_boot, seed=0)
        out[key] = {"baseline": base, "gain": float(diff.mean()), "ci95": [low, high],
                    "users": int(diff.size), "better_users": int((diff > 0).sum()),
                    "worse_users": int((diff < 0).sum()), **extra}

    def keep(key: str) -> None:
        if key in previous:
            out[key] = previous[key]
            print(f"[quality] paired: {key}: exports not on disk as recorded, the recorded "
                  "interval kept", file=sys.stderr)

    for run, base in pairs:
        if run in results["runs"] and base in results["runs"]:
            key = run if run.split("_")[1] == "transfer" else f"{run} vs {base}"
            if has_export(results, run) and has_export(results, base):
                record(key, base, ndcg(run) - ndcg(base))
            else:
                keep(key)
    # Every seed of both arms: per-user NDCG@10 averaged over the seeds, then the same paired
    # bootstrap. Seed-to-seed noise averages out of both arms; the interval is still over users.
    scratch, transfer = SEEDED
    seeds = recorded_seeds(results["runs"])
    key = f"{transfer} (seeds {','.join(map(str, seeds))})"
    if len(seeds) > 1 and not all(has_export(results, seeded(r, n))
                                  for r in SEEDED for n in seeds):
        keep(key)
    elif len(seeds) > 1:
        t = sum(ndcg(seeded(transfer, n)) for n in seeds) / len(seeds)
        b = sum(ndcg(seeded(scratch, n)) for n in seeds) / len(seeds)
        record(key, scratch, t - b,
               seeds=seeds, transfer_ndcg=float(t.mean()), scratch_ndcg=float(b.mean()))
    return out


def bias_off(results: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of each scratch run's export with its repeat bias removed (same weights).

    Cheaper than training a ``*_no_repeat`` twin (half an hour on Online Retail) and a
    different question: how much of the run's score the bias itself carries. Scientific has
    both, which shows how far the two answers are apart.
    """
    from recsys.data.examples import load_example_set
    from recsys.model.export import load_export
    from recsys.evaluation.offline import evaluate_export

    es = load_example_set(BASE["data"]["examples"])
    out: dict[str, Any] = {}
    for run, plat in (("scientific_scratch", TARGET), ("online_retail_scratch", "online_retail")):
        if run not in results["runs"] or repeat_bias(results["runs"][run]) != "on":
            continue  # not run, or recorded before the model had a repeat bias
        if not has_export(results, run):
            if run in results.get("bias_off", {}):
                out[run] = results["bias_off"][run]
                print(f"[quality] bias_off: {run}: export not on disk, the recorded figures "
                      "kept", file=sys.stderr)
            continue
        exported = load_export(Path(BASE["output_dir"]) / run / "export")
        bias = exported.model.repeat
        weights = None if bias is None else bias.weight.detach()[:, 0]
        learned = {} if weights is None else {
            p: float(weights[it.platform_id]) for p, it in exported.items.items()}
        exported.model.repeat = None  # repeat_scores() then adds nothing
        report = evaluate_export(exported, es, split="test", platforms=[plat], run=run)
        out[run] = {"platform": plat, "metrics": report.platforms[plat].metrics,
                    "learned_bias": learned}
    return out


def repeat_bias(run: dict[str, Any]) -> str:
    """'on' / 'off' from the run's config; '-' for a run recorded before the option existed."""
    flag = run["config"]["model"].get("repeat_bias")
    return "-" if flag is None else ("on" if flag else "off")


def render(results: dict[str, Any]) -> str:
    from recsys.evaluation.report import PUBLISHED, PUBLISHED_SOURCE

    runs = results["runs"]
    lines = ["# Quality benchmark (test split, full ranking over all items, history not masked)",
             "", f"Machine: {results['machine']}. Frozen MiniLM text vectors (cached), DDP with "
             "2 CPU workers. Regenerate: `python bench/quality.py`.", "",
             "Not run here: the `full` and `lora` transfer strategies, which put the text encoder "
             "in every training step (MiniLM forward + backward over each step's distinct item "
             "texts: ~14 CPU-seconds per step by `bench/train_speed.py`, against ~0.2 s for a "
             "frozen-cache step). That is what a GPU adds: fine-tuning the encoder itself "
             "(`bench/gpu.py`, figures in `gpu.md` beside this file).", ""]
    lines += ["## Against published numbers", "",
              "`repeat bias`: whether the run learned the per-platform score for items already "
              "in the user's history (`model.repeat_bias`); `-` marks runs recorded before that "
              "option existed (the model then had none).", "",
              "| platform | run | repeat bias | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 "
              "| VQ-Rec R@10 / N@10 | ratio R@10 / N@10 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for plat, run in (("scientific", "scientific_scratch"),
                      ("scientific", "scientific_scratch_no_repeat"),
                      ("scientific", "scientific_scratch_ids"),
                      ("scientific", "scientific_scratch_decay"),
                      ("online_retail", "online_retail_scratch"),
                      ("online_retail", "online_retail_scratch_no_repeat"),
                      ("online_retail", "online_retail_scratch_before_repeat_bias"),
                      ("online_retail", "online_retail_scratch_ids")):
        if run not in runs:
            if run in ("scientific_scratch", "online_retail_scratch"):  # ablations: only if run
                lines.append(f"| {plat} | {run} | | not run yet | | | | | |")
            continue
        m = runs[run]["test"][plat]["metrics"]
        ref = PUBLISHED[plat]["VQ-Rec"]
        lines.append(f"| {plat} | {run} | {repeat_bias(runs[run])} | {m['recall@10']:.4f} | "
                     f"{m['ndcg@10']:.4f} | "
                     f"{m['recall@50']:.4f} | {m['ndcg@50']:.4f} | {ref['recall@10']:.4f} / "
                     f"{ref['ndcg@10']:.4f} | {m['recall@10'] / ref['recall@10']:.3f} / "
                     f"{m['ndcg@10'] / ref['ndcg@10']:.3f} |")
    ablation = results.get("paired", {}).get("scientific_scratch vs scientific_scratch_no_repeat")
    if ablation:
        lo, hi = ablation["ci95"]
        lines += ["", f"The learned repeat bias (`model.repeat_bias`, on in every run but "
                  f"`*_no_repeat`) on Scientific: NDCG@10 {ablation['gain']:+.4f}, paired 95% CI "
                  f"[{lo:+.4f}, {hi:+.4f}] over {ablation['users']} test users. Few Scientific "
                  "users take an item again (0.6% of test targets are in the user's history); "
                  "a text model ranks the items just seen near the top (the user vector sits "
                  "near their vectors), and the bias, learned from the training sequences, "
                  "moves them down. Nothing is masked by the evaluation."]
    off = results.get("bias_off", {})
    if off:
        lines += ["", "How much of each score the repeat bias carries (test NDCG@10): the run as "
                  "trained; its export with the bias removed at test (same weights); a twin "
                  "trained without it (`*_no_repeat`, where run); and the run with every history "
                  "item masked at test (the ceiling of pushing repeats down).", "",
                  "| platform | run | learned bias | as trained | bias removed | trained without "
                  "| history masked |", "|---|---|---|---|---|---|---|"]
        for run, o in off.items():
            plat = o["platform"]
            r = runs[run]["test"][plat]
            twin = runs.get(f"{run}_no_repeat")
            twin_s = f"{twin['test'][plat]['metrics']['ndcg@10']:.4f}" if twin else "not run"
            bias = o["learned_bias"].get(plat)
            bias_s = f"{bias:+.2f}" if bias is not None else "none"
            lines.append(f"| {plat} | {run} | {bias_s} | {r['metrics']['ndcg@10']:.4f} | "
                         f"{o['metrics']['ndcg@10']:.4f} | {twin_s} | "
                         f"{r['history_excluded']['ndcg@10']:.4f} |")
    lines += ["", f"Anchors: {PUBLISHED_SOURCE}", "", "## Transfer to Scientific", "",
              "| users | run | NDCG@10 | Recall@10 | gain vs scratch (NDCG@10) | 95% CI of the "
              "gain (paired) |", "|---|---|---|---|---|---|"]
    paired = results.get("paired", {})
    for prefix, label in (("scientific", "100%"), ("scientific10", "10%")):
        base = runs.get(f"{prefix}_scratch")
        transfers = sorted(k for k in runs if k.startswith(f"{prefix}_transfer_")
                           and not seed_of(k))
        names = [f"{prefix}_scratch", *transfers]
        for name in names:
            if name not in runs:
                lines.append(f"| {label} | {name} | not run yet | | | |")
                continue
            m = runs[name]["test"][TARGET]["metrics"]
            gain = ""
            if base and name != f"{prefix}_scratch":
                b = base["test"][TARGET]["metrics"]["ndcg@10"]
                gain = f"{m['ndcg@10'] - b:+.4f} ({(m['ndcg@10'] / b - 1) * 100:+.1f}%)"
            ci = paired.get(name, {}).get("ci95")
            ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
            lines.append(f"| {label} | {name} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} "
                         f"| {gain} | {ci_s} |")
    if paired:
        lines += ["", "95% CI: percentile bootstrap (2000 resamples, seeded) of the mean over test "
                  "users of (transfer - scratch) NDCG@10, users resampled together; an interval "
                  "that excludes 0 is a difference beyond the test set's sampling noise."]
    short, long_ = runs.get("pretrain_sources"), runs.get("pretrain_sources_long")
    if short and long_:
        lines += ["", f"`*_long`: transferred from `pretrain_sources_long`, the source model "
                  f"trained on to {long_['epochs_run']} epochs (best valid NDCG@10 on the "
                  f"sources {long_['best_valid_ndcg@10']:.4f}) instead of "
                  f"{short['epochs_run']} ({short['best_valid_ndcg@10']:.4f}); every other "
                  "setting as the run without the suffix."]
    lines += seed_lines(runs, paired)
    lines += pooled_lines(runs, paired)
    lines += ["", "## Runs", "",
              "Epochs run of the run's cap; a run that used its whole cap had not early-stopped "
              "(early stopping: patience 5 epochs on valid NDCG@10, not before epoch 10). "
              "'resumed': recorded under a smaller cap, then continued from its last checkpoint "
              "(`--resume`); seconds are both parts together. A run that stopped early under "
              "a smaller cap than the plan's is kept as recorded: it stops at the same epoch "
              "under any larger cap.", "",
              "| run | epochs (of cap) | best valid NDCG@10 | seconds |", "|---|---|---|---|"]
    for name, r in sorted(runs.items()):
        cap = r["config"]["optim"]["epochs"]
        res = r.get("resumed")
        before = res and res.get("run_before", name)
        note = "" if not res else (
            f" (resumed after {res['epochs_before']} of {res['cap_before']})" if before == name
            else f" (continues {before} after its {res['epochs_before']})")
        lines.append(f"| {name} | {r['epochs_run']} of {cap}{note} | "
                     f"{r['best_valid_ndcg@10']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def seed_lines(runs: dict[str, Any], paired: dict[str, Any]) -> list[str]:
    """The two arms of the 100% comparison under every recorded seed, and all seeds pooled."""
    scratch, transfer = SEEDED
    seeds = recorded_seeds(runs)
    if len(seeds) < 2:
        return []
    lines = ["", f"### Seeds (100% of users): `{transfer}` vs `{scratch}`", "",
             "The same two configs trained again with other `optim.seed`s (initialisation, "
             "fresh weights mixed into the shrunk ones, batch order); the test users are the "
             "same.", "",
             "| seed | scratch NDCG@10 | transfer NDCG@10 | gain | 95% CI of the gain (paired) |",
             "|---|---|---|---|---|"]
    for n in seeds:
        t, b = seeded(transfer, n), seeded(scratch, n)
        tm, bm = (runs[r]["test"][TARGET]["metrics"]["ndcg@10"] for r in (t, b))
        ci = paired.get(t, {}).get("ci95")
        ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
        lines.append(f"| {n} | {bm:.4f} | {tm:.4f} | {tm - bm:+.4f} ({(tm / bm - 1) * 100:+.1f}%)"
                     f" | {ci_s} |")
    pooled = paired.get(f"{transfer} (seeds {','.join(map(str, seeds))})")
    if pooled:
        g, (lo, hi) = pooled["gain"], pooled["ci95"]
        lines.append(f"| mean of {len(seeds)} | {pooled['scratch_ndcg']:.4f} | "
                     f"{pooled['transfer_ndcg']:.4f} | {g:+.4f} "
                     f"({(pooled['transfer_ndcg'] / pooled['scratch_ndcg'] - 1) * 100:+.1f}%) | "
                     f"[{lo:+.4f}, {hi:+.4f}] |")
        lines += ["", "Mean of the seeds: each test user's NDCG@10 averaged over the seeds of "
                  "each arm, then the paired bootstrap over users as above."]
    return lines


def pooled_lines(runs: dict[str, Any], paired: dict[str, Any]) -> list[str]:
    """The pooled model (sources + the target's training events) on the target as it is, and
    fine-tuned there, against scratch of the same seed."""
    pre = runs.get("pretrain_pooled")
    if pre is None:
        return []
    tuned = seeded("scientific_transfer_freeze_encoder_pooled", POOLED_SEED)
    scratch = seeded("scientific_scratch", POOLED_SEED)
    lines = ["", "### Pretraining that includes the target", "",
             f"`pretrain_pooled`: one model on {' + '.join(SOURCES)} + {TARGET} pooled (the "
             "target's training events only; each user's valid and test events stay held "
             f"out), {pre['epochs_run']} epochs; then `{tuned}`: that model fine-tuned on {TARGET} "
             "(`freeze_encoder`, from its weights as they are), against scratch with the same "
             f"`optim.seed` {POOLED_SEED}. Not the transfer above (that one never sees the "
             "target before fine-tuning): the recipe for a platform that already has logs.", "",
             "| run | NDCG@10 | Recall@10 | gain vs scratch (NDCG@10) | 95% CI of the gain "
             "(paired) |", "|---|---|---|---|---|"]
    base = runs.get(scratch, {}).get("test", {}).get(TARGET, {}).get("metrics")
    for name in (scratch, "pretrain_pooled", tuned):
        if name not in runs:
            lines.append(f"| {name} | not run yet | | | |")
            continue
        m = runs[name]["test"][TARGET]["metrics"]
        gain = "" if name == scratch or base is None else (
            f"{m['ndcg@10'] - base['ndcg@10']:+.4f} "
            f"({(m['ndcg@10'] / base['ndcg@10'] - 1) * 100:+.1f}%)")
        ci = (paired.get(name) or paired.get(f"{name} vs {scratch}") or {}).get("ci95")
        ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} | {gain} | "
                     f"{ci_s} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="all", help="comma-separated run names (default: all)")
    p.add_argument("--strategies", default=",".join(CPU_STRATEGIES),
                   help="transfer strategies (full and lora run the encoder in every step: "
                        "GPU territory)")
    p.add_argument("--max-epochs", type=int, help="cap epochs (smoke runs)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--resume", action="store_true",
                   help="continue the named runs from their latest checkpoints under the plan's "
                        "cap (for runs recorded under a smaller one)")
    p.add_argument("--paired", action="store_true",
                   help="only (re)compute the paired transfer-vs-scratch intervals from the "
                        "recorded runs' exports, and re-render")
    a = p.parse_args(argv)
    os.chdir(REPO)
    if a.paired:
        path = a.out / "quality.json"
        results = json.loads(path.read_text())
        results["paired"] = paired_gains(results)
        results["bias_off"] = bias_off(results)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        (a.out / "quality.md").write_text(render(results))
        print((a.out / "quality.md").read_text())
        return 0
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", "62656e63682d6b65792d6e6f742d736563726574")
    from recsys.cluster import init_ray
    from recsys.logs import setup_logging

    setup_logging()
    runs = plan(a.strategies.split(","))
    names = list(runs) if a.runs == "all" else a.runs.split(",")
    unknown = sorted(set(names) - set(runs))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {list(runs)}")
    ensure_examples()
    init_ray(num_cpus=2)
    path = a.out / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["machine"] = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, " \
                         f"Python {platform.python_version()}"
    for name in names:
        t = time.perf_counter()
        print(f"[quality] {name} ...", file=sys.stderr, flush=True)
        previous = results["runs"].get(name) if a.resume else None
        if a.resume and previous is None:
            raise SystemExit(f"--resume: {name} has no recorded run to continue")
        source = runs[name].get("continue_from")
        if source is not None:  # its first part is another recorded run
            if source not in results["runs"]:
                raise SystemExit(f"{name} continues {source}, which has no recorded run")
            previous = {**results["runs"][source], "continued_from": source}
        results["runs"][name] = run_one(name, runs[name], a.max_epochs, previous)
        print(f"[quality] {name} done in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        a.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        (a.out / "quality.md").write_text(render(results))
    print((a.out / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
