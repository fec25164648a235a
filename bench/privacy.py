"""Privacy benchmark on the shared Scientific data: what each privacy mechanism costs in quality.

Parts (``--parts``, each merged into ``bench/results/privacy.json`` under its own key, and
``privacy.md`` rendered from every part recorded so far):

* ``dp``: user-level DP-SGD (``privacy.enabled``, ``recsys.training.privacy``). A source model
  is pretrained on Office (another Amazon shop), then transferred to Scientific with
  ``transfer.strategy=user_tower`` (frozen encoder vectors and item tower; the user tower,
  repeat bias and CTR head fine-tuned), non-private (epsilon = inf) and at epsilon 8, 4, 1 with
  delta = 1 / training users. Test NDCG@10, full ranking, with 95% bootstrap intervals over
  users (``recsys.evaluation.metrics.bootstrap_ci``, via the run's report).
* ``federated``: federated (each source shop a client, only model updates sent; variants
  FedAvg, FedProx, FedAdam and FedAvg with client-level DP, ``--fed-variants``) vs pooled
  pretraining at equal compute, each transferred to Scientific at 10% and 100% of its users,
  vs scratch; bytes per round and in total (``bench/privacy_federated.py``).
* ``attack``: membership inference (loss/rank threshold, calibrated loss, shadow models) on
  members vs held-out Scientific users, non-private and per epsilon, retrained on a seeded
  user split (``bench/privacy_attacks.py``, ``recsys.evaluation.membership``).

Federated and attack parts are meant to be added to :data:`PARTS` (a function that takes the
parsed arguments and returns its JSON block) and to :func:`render`.

    python bench/privacy.py                 # every part (~1 h on 2 CPU cores; federated ~42 min)
    python bench/privacy.py --parts federated --fed-variants fedavg,fedprox   # a subset
    python bench/privacy.py --parts dp --quick   # smoke run: 10% of users, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, fmt, machine_info, source_state, stderr_log, write_json
from privacy_attacks import render_attack, run_attack
from privacy_federated import VARIANTS, parse_variants, render_federated, run_federated
from quality_plan import PSEUDONYM_KEY, merge

sys.path.insert(0, str(REPO))
log = stderr_log("privacy")

SCIENTIFIC = REPO.parent / "shared" / "data" / "amazon18_scientific_unisrec"
OUTPUT = "runs/bench_privacy"
EPSILONS = [math.inf, 8.0, 4.0, 1.0]
BASE: dict[str, Any] = {
    "data": {"examples": "runs/shared/examples", "sequences": {"max_seq_len": 50}},
    "model": {"dim": 128, "num_layers": 2, "num_heads": 2, "dropout": 0.3, "num_experts": 8},
    "loss": {"kind": "full_softmax", "temperature": 0.07, "ctr_weight": 0.1},
    "optim": {"lr": 0.003, "micro_batch_size": 256},
    "scaling": {"engine": "ddp", "num_workers": 1, "cpus_per_worker": 1.0},
    "tracking": {"enabled": False},
    "output_dir": OUTPUT,
    "resume": False,
}
PRETRAIN = {"mode": "pretrain", "train_platforms": ["office"], "optim": {"epochs": 6}}
DP = {"expected_users_per_step": 1024, "max_grad_norm": 1.0, "accountant": "rdp"}
"""Large expected batches: the noise added to the mean gradient is ``sigma * C / (q N)``."""
EPOCHS = 6


def pretrain(quick: bool) -> tuple[str, dict[str, Any]]:
    """The source model (Office), trained once and reused while its config is unchanged."""
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    name = "pretrain_office_quick" if quick else "pretrain_office"
    cfg_dict = merge(BASE, {"name": name, **PRETRAIN})
    if quick:
        cfg_dict["optim"]["epochs"] = 1
    cfg = TrainJobConfig.model_validate(cfg_dict)
    export = Path(OUTPUT) / name / "export"
    record = Path(OUTPUT) / name / "bench_config.json"
    wanted = cfg.model_dump(mode="json")
    if export.exists() and record.exists() and json.loads(record.read_text()) == wanted:
        log(f"reusing the source model {export}")
        return str(export), {"name": name, "reused": True}
    t = time.perf_counter()
    out = run_training(cfg)
    record.write_text(json.dumps(wanted))
    return str(out.export_dir), {"name": name, "reused": False,
                                 "seconds": round(time.perf_counter() - t, 1),
                                 "best_valid_ndcg@10": out.best_metric}


def transfer_config(epsilon: float, init: str, quick: bool, epochs: int) -> dict[str, Any]:
    """One run of the table: the same transfer, private at ``epsilon`` (inf: not private)."""
    name = "scientific_user_tower_" + ("nonprivate" if math.isinf(epsilon) else f"eps{epsilon:g}")
    cfg = merge(BASE, {
        "name": name + ("_quick" if quick else ""), "mode": "transfer",
        "train_platforms": ["scientific"],
        "transfer": {"init_from": init, "strategy": "user_tower"},
        # Every epoch runs: the noise is calibrated to spend epsilon over optim.epochs.
        "optim": {"epochs": epochs, "min_epochs": epochs, "early_stopping_patience": epochs}})
    if quick:
        cfg["user_fraction"] = 0.1
    if not math.isinf(epsilon):
        dp = dict(DP)
        if quick:
            dp["expected_users_per_step"] = 128
        cfg["privacy"] = {"enabled": True, "target_epsilon": epsilon, **dp}
    return cfg


def run_dp(a: argparse.Namespace) -> dict[str, Any]:
    """The DP-SGD privacy-utility table."""
    from recsys.model.export import read_meta
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    init, source = pretrain(a.quick)
    epochs = 1 if a.quick else a.epochs
    rows: list[dict[str, Any]] = []
    for eps in [e for e in EPSILONS if a.epsilons is None or e in a.epsilons]:
        cfg = TrainJobConfig.model_validate(transfer_config(eps, init, a.quick, epochs))
        log(f"{cfg.name} ...")
        t = time.perf_counter()
        out = run_training(cfg)
        res = out.report.platforms["scientific"]
        card = read_meta(out.export_dir).privacy
        rows.append({
            "run": cfg.name, "target_epsilon": None if math.isinf(eps) else eps,
            "privacy": None if card is None else card.model_dump(),
            "test": {"ndcg@10": res.metrics["ndcg@10"], "recall@10": res.metrics["recall@10"],
                     "ndcg@10_ci": list(res.ci.get("ndcg@10", ())), "users": res.users},
            "epochs_run": len(out.curve), "best_valid_ndcg@10": out.best_metric,
            "curve": out.curve, "seconds": round(time.perf_counter() - t, 1),
        })
        log(f"{cfg.name}: test NDCG@10 {res.metrics['ndcg@10']:.4f} in {rows[-1]['seconds']} s")
    base = next((r["test"]["ndcg@10"] for r in rows if r["target_epsilon"] is None), None)
    for r in rows:
        r["share_of_nonprivate"] = None if not base else r["test"]["ndcg@10"] / base
    return {"source": source, "quick": a.quick, "epochs": epochs,
            "user_fraction": 0.1 if a.quick else 1.0, "dp": DP if not a.quick else
            {**DP, "expected_users_per_step": 128}, "runs": rows,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"dp": run_dp,
                                                                    "attack": run_attack,
                                                                    "federated": run_federated}


def render_dp(block: dict[str, Any]) -> list[str]:
    out = ["## DP-SGD: privacy-utility on Scientific", "",
           f"Transfer Office -> Scientific, `transfer.strategy=user_tower` (frozen encoder "
           f"vectors and item tower), {block['epochs']} epochs, "
           f"{block['user_fraction']:.0%} of the training users"
           + (" (**--quick smoke run, not a result**)" if block["quick"] else "")
           + f"; private runs: Poisson sampling of users, {block['dp']['expected_users_per_step']}"
           f" expected per step, clip {block['dp']['max_grad_norm']} per user, "
           f"{block['dp']['accountant'].upper()} accountant, delta = 1 / training users. "
           "Test split, full ranking, 95% bootstrap interval over users.", "",
           "| target epsilon | epsilon spent | delta | noise multiplier | steps | NDCG@10 "
           "[95% CI] | of non-private | Recall@10 | minutes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in block["runs"]:
        p = r["privacy"] or {}
        ci = r["test"]["ndcg@10_ci"]
        share = r["share_of_nonprivate"]
        target = r["target_epsilon"]
        out.append(
            f"| {'inf (non-private)' if target is None else fmt(target, 'g')} "
            f"| {fmt(p.get('epsilon'), '.2f') if p else 'inf'} "
            f"| {fmt(p.get('delta'), '.2e') if p else '-'} "
            f"| {fmt(p.get('noise_multiplier'), '.3f') if p else '0'} "
            f"| {p.get('steps', '-') if p else '-'} "
            f"| {r['test']['ndcg@10']:.4f} [{fmt(ci[0] if ci else None, '.4f')}, "
            f"{fmt(ci[1] if ci else None, '.4f')}] "
            f"| {'n/a' if share is None else f'{share:.0%}'} "
            f"| {r['test']['recall@10']:.4f} | {r['seconds'] / 60:.1f} |")
    return out


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {"dp": render_dp,
                                                               "attack": render_attack,
                                                               "federated": render_federated}


def render(results: dict[str, Any]) -> str:
    lines = ["# Privacy benchmark", "", f"Machine: {results['machine'].get('cpu_count_logical')} "
             f"CPUs ({results['machine'].get('cpu_model')}), {results['machine'].get('date')}.",
             "Written by `bench/privacy.py`; what each mechanism protects: `docs/privacy.md`.",
             ""]
    for part, block in results["parts"].items():
        lines += RENDERERS[part](block)
        src = block.get("source") or {}
        if src.get("commit"):
            tree = "a clean tree" if src.get("dirty") is False else "local changes"
            lines += ["", f"_Part `{part}`: commit `{src['commit'][:10]}`, {tree}, "
                          f"{block.get('seconds', 0) / 60:.0f} min._"]
        lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 10%% of users, 1 epoch")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")],
                   help="subset of 'inf,8,4,1'")
    p.add_argument("--fed-variants", type=parse_variants, default=list(VARIANTS),
                   help=f"federated part: comma-separated, of {list(VARIANTS)} (default all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; known: {list(PARTS)}")
    if not SCIENTIFIC.exists():
        log(f"skipped: the shared data is not there ({SCIENTIFIC}); see ../shared/data/README.md")
        return 0
    os.chdir(REPO)
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", PSEUDONYM_KEY)
    from quality import ensure_examples

    from recsys.cluster import init_ray
    from recsys.logs import setup_logging

    setup_logging()
    ensure_examples()
    init_ray(num_cpus=2)
    stem = "privacy_quick" if a.quick else "privacy"  # a smoke run never overwrites results
    path = a.out / f"{stem}.json"
    results = json.loads(path.read_text()) if path.exists() else {"parts": {}}
    results["machine"] = machine_info(["torch", "opacus", "ray"])
    for part in parts:
        t0 = time.perf_counter()
        results["parts"][part] = PARTS[part](a)
        results["parts"][part]["seconds"] = round(time.perf_counter() - t0, 1)
        results["parts"][part]["source"] = source_state()
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        (a.out / f"{stem}.md").write_text(render(results))
    print((a.out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
