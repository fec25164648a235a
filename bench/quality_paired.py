"""``bench/quality.py --paired``: re-evaluate recorded exports for intervals the runs lack.

Paired bootstrap intervals of transfer vs scratch (and of the repeat bias), each over the same
test users; and each scratch run with its repeat bias removed at test. A run whose export is not
on disk as recorded keeps the figures recorded before.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import stderr_log
from quality_plan import (
    BASE,
    POOLED_SEED,
    SEEDED,
    TARGET,
    recorded_seeds,
    repeat_bias,
    seed_of,
    seeded,
)

if TYPE_CHECKING:
    from recsys.data.examples import ExampleSet

log = stderr_log("quality")


@functools.cache
def example_set() -> ExampleSet:
    """The shared-data example set, loaded on first use: where no recorded export is on disk
    nothing is re-evaluated, and the example set need not be there either."""
    from recsys.data.examples import load_example_set

    return load_example_set(BASE["data"]["examples"])


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
    from recsys.evaluation.metrics import bootstrap_ci, per_user
    from recsys.evaluation.offline import evaluate_export
    from recsys.model.export import load_export

    out_dir = Path(BASE["output_dir"])
    cache: dict[str, Any] = {}
    previous = results.get("paired", {})

    def ndcg(run: str) -> Any:
        if run not in cache:
            ranks: dict[str, Any] = {}
            evaluate_export(load_export(out_dir / run / "export"), example_set(), split="test",
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
            log(f"paired: {key}: exports not on disk as recorded, the recorded interval kept")

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
    from recsys.evaluation.offline import evaluate_export
    from recsys.model.export import load_export

    out: dict[str, Any] = {}
    for run, plat in (("scientific_scratch", TARGET), ("online_retail_scratch", "online_retail")):
        if run not in results["runs"] or repeat_bias(results["runs"][run]) != "on":
            continue  # not run, or recorded before the model had a repeat bias
        if not has_export(results, run):
            if run in results.get("bias_off", {}):
                out[run] = results["bias_off"][run]
                log(f"bias_off: {run}: export not on disk, the recorded figures kept")
            continue
        exported = load_export(Path(BASE["output_dir"]) / run / "export")
        bias = exported.model.repeat
        weights = None if bias is None else bias.weight.detach()[:, 0]
        learned = {} if weights is None else {
            p: float(weights[it.platform_id]) for p, it in exported.items.items()}
        exported.model.repeat = None  # repeat_scores() then adds nothing
        report = evaluate_export(exported, example_set(), split="test", platforms=[plat],
                                 run=run)
        out[run] = {"platform": plat, "metrics": report.platforms[plat].metrics,
                    "learned_bias": learned}
    return out
