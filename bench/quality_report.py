"""``quality.md`` from ``quality.json``: against published numbers, the repeat bias, transfer
vs scratch with paired intervals, seeds, pooled pretraining, and every run's epochs.

Reads only the recorded results, so ``--paired`` (and any run) re-renders the whole report.
"""

from __future__ import annotations

from typing import Any

from quality_plan import (
    POOLED_SEED,
    SEEDED,
    SOURCES,
    TARGET,
    recorded_seeds,
    repeat_bias,
    seed_of,
    seeded,
)


def render(results: dict[str, Any]) -> str:
    """The whole report; runs not recorded yet show as such."""
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
