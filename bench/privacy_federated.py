"""The ``federated`` part of ``bench/privacy.py``: federated variants vs pooled pretraining ->
transfer.

The other shared shops (Online Retail, Office, MovieLens: the quality bench's sources) pretrain a
model, either pooled (``jobs.pretrain``: one Ray Train run over their concatenated logs) or
federated (``jobs.federated``: each shop a client actor that sends only model updates), under
each variant of :data:`VARIANTS` (``--fed-variants``): ``fedavg`` (the row-weighted mean of the
client deltas), ``fedprox`` (the same plus the proximal term, ``proximal_mu`` from the config),
``fedadam`` (the mean delta as a pseudo-gradient of a server Adam) and ``fedavg_dp`` (FedAvg with
client-level DP: clip, equal weights, Gaussian noise; its epsilon from Opacus's RDP accountant).
Each pretrained model is then transferred to Scientific (``transfer.strategy=freeze_encoder``
with the quality bench's shrink-and-perturb, which is what made source pretraining pay off
there) with 10% and 100% of Scientific's training users, beside a Scientific model trained from
scratch on the same users. Test NDCG@10, full ranking, 95% bootstrap interval over users.
"Keeps X% of pooled's gain" = (variant - scratch) / (pooled - scratch); the issue's target is
:data:`TARGET_SHARE`. Every variant is reported: picking the best one afterwards on these test
numbers is a selection.

Equal compute: pooled pretraining gets ``PRETRAIN_EPOCHS`` epochs and every federated variant
the same number of rounds of one local epoch each (the same passes over the data per client);
transfers and scratch runs are capped at ``TRANSFER_EPOCHS`` epochs with early stopping. All
pretrainings are short of convergence. Pretrained models are reused while their config is
unchanged (:func:`_cached`). Budget on 2 CPU cores: ~6 min per federated variant, ~7 min pooled,
~2 min of transfers per pretrained model (scratch included): ~42 min with every variant.
``--quick`` (a smoke run): 10% of the sources' users, 1 round / epoch, 10% of Scientific's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import fmt, stderr_log
from quality_plan import SHRINK_PERTURB, merge

log = stderr_log("privacy/federated")

OUTPUT = "runs/bench_privacy"
SOURCES = ["online_retail", "office", "movielens"]
TARGET = "scientific"
FRACTIONS = [0.1, 1.0]
PRETRAIN_EPOCHS = 3
TRANSFER_EPOCHS = 5
TARGET_SHARE = 0.8
"""The issue's bar: a federated variant keeps at least this share of pooled's gain."""
QUICK_SOURCE_FRACTION = 0.1
SHARED: dict[str, Any] = {
    "data": {"examples": "runs/shared/examples", "sequences": {"max_seq_len": 50}},
    "model": {"dim": 128, "num_layers": 2, "num_heads": 2, "dropout": 0.3, "num_experts": 8},
    "loss": {"kind": "full_softmax", "temperature": 0.07, "ctr_weight": 0.1},
    "tracking": {"enabled": False},
    "output_dir": OUTPUT,
}
TRAIN: dict[str, Any] = merge(SHARED, {
    "optim": {"lr": 0.003, "micro_batch_size": 256},
    "scaling": {"engine": "ddp", "num_workers": 1, "cpus_per_worker": 1.0}, "resume": False})
FEDERATED: dict[str, Any] = merge(SHARED, {
    "platforms": SOURCES, "optim": {"lr": 0.003, "micro_batch_size": 256},
    "federated": {"algorithm": "fedavg", "local_epochs": 1, "cpus_per_client": 0.5,
                  "validate_every": 1, "evaluate_test": False}})
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg": {"algorithm": "fedavg"},
    "fedprox": {"algorithm": "fedprox"},  # proximal_mu: the config's default
    # Adam on the mean delta, no bias correction: a coordinate moves by about server_lr *
    # m / (sqrt(v) + tau) per round, ~1x-1.6x server_lr over the first rounds where |delta|
    # >> tau / 0.1 = 0.01. FedAvg's last measured rounds moved ~0.017 RMS per coordinate
    # (mean update norm ~15 over ~0.9M shared parameters), so 0.02 steps about as far, in
    # Adam's per-coordinate direction (Reddi et al. 2021 found 10^-2 to 10^-1.5 best at tau 1e-3).
    "fedadam": {"algorithm": "fedadam", "server_lr": 0.02, "server_betas": [0.9, 0.99],
                "server_tau": 1e-3},
    # The config's defaults: every update is clipped to norm 1 (measured FedAvg updates: 14-21)
    # and noise of std z * clip / 3 per coordinate is added to the mean. With 3 clients no
    # setting with a meaningful epsilon keeps the signal (noise norm ~ z * clip * sqrt(P) / 3).
    "fedavg_dp": {"algorithm": "fedavg", "client_dp": {"enabled": True, "clip": 1.0,
                                                       "noise_multiplier": 1.0, "delta": 1e-5}},
}


def parse_variants(text: str) -> list[str]:
    """``--fed-variants``: comma-separated names of :data:`VARIANTS`, in the given order."""
    names = [v for v in text.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    return names


def _cached(name: str, config: dict[str, Any], train: Callable[[], dict[str, Any]]
            ) -> dict[str, Any]:
    """Run ``train`` unless an export made under exactly ``config`` is there already."""
    record = Path(OUTPUT) / name / "bench_record.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["config"] == config and Path(saved["result"]["export"]).exists():
            log(f"reusing {name} ({saved['result']['export']})")
            return {**saved["result"], "reused": True}
    result = train()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"config": config, "result": result}))
    return {**result, "reused": False}


def pooled_pretrain(epochs: int, fraction: float, suffix: str) -> dict[str, Any]:
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    cfg = TrainJobConfig.model_validate(merge(TRAIN, {
        "name": f"fed_bench_pooled{suffix}", "mode": "pretrain", "train_platforms": SOURCES,
        "user_fraction": fraction,
        "optim": {"epochs": epochs, "min_epochs": epochs, "early_stopping_patience": epochs}}))

    def train() -> dict[str, Any]:
        t = time.perf_counter()
        out = run_training(cfg)
        return {"export": str(out.export_dir), "best_valid_ndcg@10": out.best_metric,
                "epochs": len(out.curve), "seconds": round(time.perf_counter() - t, 1)}

    return _cached(cfg.name, cfg.model_dump(mode="json"), train)


def federated_pretrain(variant: str, rounds: int, fraction: float, suffix: str
                       ) -> dict[str, Any]:
    from recsys.federated.config import FederatedJobConfig
    from recsys.federated.server import run_federated

    cfg = FederatedJobConfig.model_validate(merge(FEDERATED, {
        "name": f"fed_bench_{variant}{suffix}", "user_fraction": fraction,
        "federated": {"rounds": rounds, **VARIANTS[variant]}}))
    f = cfg.federated

    def train() -> dict[str, Any]:
        t = time.perf_counter()
        out = run_federated(cfg)
        return {"export": str(out.export_dir), "best_valid_ndcg@10": out.best_metric,
                "best_round": out.best_round, "rounds": out.rounds,
                "bytes_up_per_round": out.bytes_up_per_round,
                "bytes_down_per_round": out.bytes_down_per_round,
                "privacy": out.privacy, "seconds": round(time.perf_counter() - t, 1)}

    result = _cached(cfg.name, cfg.model_dump(mode="json"), train)
    n = len(result["rounds"])
    return {**result, "variant": variant, "algorithm": f.algorithm,
            "settings": f.model_dump(mode="json", include={
                "rounds", "local_epochs", "local_steps", "proximal_mu", "server_lr",
                "server_betas", "server_tau", "client_dp"}),
            "bytes_total": n * (result["bytes_up_per_round"] + result["bytes_down_per_round"])}


def target_run(label: str, fraction: float, init: str | None, epochs: int, suffix: str
               ) -> dict[str, Any]:
    """Scratch (``init`` None) or a transfer from ``init`` on Scientific, on ``fraction`` of
    its training users; test metrics with the bootstrap interval."""
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    over: dict[str, Any] = {
        "name": f"fed_bench_{TARGET}{round(fraction * 100)}_{label}{suffix}",
        "train_platforms": [TARGET], "user_fraction": fraction,
        "optim": {"epochs": epochs, "early_stopping_patience": 2}}
    if init is None:
        over["mode"] = "scratch"
    else:
        over.update(mode="transfer", transfer={"init_from": init, "strategy": "freeze_encoder",
                                               **SHRINK_PERTURB})
    cfg = TrainJobConfig.model_validate(merge(TRAIN, over))
    t = time.perf_counter()
    out = run_training(cfg)
    res = out.report.platforms[TARGET]
    row = {"run": cfg.name, "label": label, "user_fraction": fraction,
           "test": {"ndcg@10": res.metrics["ndcg@10"], "recall@10": res.metrics["recall@10"],
                    "ndcg@10_ci": list(res.ci.get("ndcg@10", ())), "users": res.users},
           "epochs_run": len(out.curve), "best_valid_ndcg@10": out.best_metric,
           "seconds": round(time.perf_counter() - t, 1)}
    log(f"{cfg.name}: test NDCG@10 {row['test']['ndcg@10']:.4f} in {row['seconds']} s")
    return row


def gain_share(scratch: float, pooled: float, federated: float) -> float | None:
    """Share of pooled pretraining's gain over scratch that federated pretraining keeps."""
    gain = pooled - scratch
    return None if gain <= 0 else (federated - scratch) / gain


def run_federated(a: argparse.Namespace) -> dict[str, Any]:
    """Pretrain pooled and each federated variant, transfer each to Scientific, compare with
    scratch. A variant whose pretraining fails is recorded with its error (and has no rows);
    the others still run."""
    rounds = 1 if a.quick else PRETRAIN_EPOCHS
    epochs = 1 if a.quick else TRANSFER_EPOCHS
    fractions = [0.1] if a.quick else FRACTIONS
    source_fraction = QUICK_SOURCE_FRACTION if a.quick else 1.0
    suffix = "_quick" if a.quick else ""
    names = getattr(a, "fed_variants", None) or list(VARIANTS)
    variants: dict[str, dict[str, Any]] = {}
    for v in names:
        log(f"federated pretraining: {v} ...")
        try:
            variants[v] = federated_pretrain(v, rounds, source_fraction, suffix)
        except Exception as e:  # recorded in the results and the table, not hidden
            log(f"{v}: pretraining failed: {e!r}")
            variants[v] = {"variant": v, "error": repr(e)}
            continue
        fed = variants[v]
        log(f"{v}: {fed['seconds']} s, {fed['bytes_up_per_round'] / 1e6:.2f} MB up per round, "
            f"best valid NDCG@10 {fed['best_valid_ndcg@10']:.4f}")
    pooled = pooled_pretrain(rounds, source_fraction, suffix)
    log(f"pooled pretraining: {pooled['seconds']} s")
    ok = [v for v in names if "error" not in variants[v]]
    rows = []
    for fraction in fractions:
        inits = {"scratch": None, "pooled": pooled["export"],
                 **{v: variants[v]["export"] for v in ok}}
        runs = {label: target_run(label, fraction, init, epochs, suffix)
                for label, init in inits.items()}
        ndcg = {k: r["test"]["ndcg@10"] for k, r in runs.items()}
        rows.append({"user_fraction": fraction, "runs": runs, "share_of_pooled_gain": {
            v: gain_share(ndcg["scratch"], ndcg["pooled"], ndcg[v]) for v in ok}})
    return {"quick": a.quick, "sources": SOURCES, "target": TARGET, "clients": len(SOURCES),
            "variant_names": names, "rounds": rounds, "pretrain_epochs": rounds,
            "source_user_fraction": source_fraction, "transfer_epochs": epochs,
            "target_share": TARGET_SHARE, "variants": variants, "pooled": pooled, "rows": rows,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


def _ndcg(r: dict[str, Any]) -> str:
    ci = r["test"]["ndcg@10_ci"]
    return (f"{r['test']['ndcg@10']:.4f} [{fmt(ci[0] if ci else None, '.4f')}, "
            f"{fmt(ci[1] if ci else None, '.4f')}]")


def _upgrade(block: dict[str, Any]) -> dict[str, Any]:
    """A block recorded before the variants (one FedAvg run under ``federated``) in the
    current shape, so that ``privacy.md`` still renders from an older ``privacy.json``."""
    if "variants" in block:
        return block
    fed = {**block["federated"], "variant": "fedavg", "algorithm": block["algorithm"],
           "settings": {"rounds": block["rounds"], "local_epochs": 1}}
    fed["bytes_total"] = len(fed["rounds"]) * (fed["bytes_up_per_round"]
                                                + fed["bytes_down_per_round"])
    rows = [{"user_fraction": r["user_fraction"],
             "runs": {("fedavg" if k == "federated" else k): v for k, v in r["runs"].items()},
             "share_of_pooled_gain": {"fedavg": r["federated_share_of_pooled_gain"]}}
            for r in block["rows"]]
    return {**block, "variant_names": ["fedavg"], "source_user_fraction": 1.0,
            "target_share": TARGET_SHARE, "variants": {"fedavg": fed}, "rows": rows}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _describe(fed: dict[str, Any]) -> str:
    s = fed["settings"]
    local = (_n(s["local_epochs"], "local epoch") if s.get("local_steps") is None
             else f"<= {_n(s['local_steps'], 'local step')}")
    what = {"fedprox": f"mu {fmt(s.get('proximal_mu'), 'g')}",
            "fedadam": f"server_lr {fmt(s.get('server_lr'), 'g')}, betas "
                       f"{tuple(s.get('server_betas') or ())}, tau {fmt(s.get('server_tau'), 'g')}"
            }.get(fed["algorithm"], "row-weighted mean")
    dp = s.get("client_dp") or {}
    if dp.get("enabled"):
        what = (f"equal weights, clip {fmt(dp['clip'], 'g')}, noise multiplier "
                f"{fmt(dp['noise_multiplier'], 'g')}")
    return f"{fed['algorithm']}, {what}; {_n(s['rounds'], 'round')} x {local}"


def _epsilon(fed: dict[str, Any]) -> str:
    p = fed.get("privacy") or {}
    if "client_dp_epsilon" not in p:
        return "- (no DP)"
    eps = p["client_dp_epsilon"]
    eps_text = "inf" if eps is None or math.isinf(float(eps)) else f"{float(eps):.2f}"
    return f"{eps_text} (delta {fmt(p.get('client_dp_delta'), '.0e')}; unit: a whole shop)"


def _verdict(block: dict[str, Any]) -> list[str]:
    """Which variants meet the target at each fraction, stated from the numbers."""
    bar = block["target_share"]
    out = []
    for row in block["rows"]:
        shares = row["share_of_pooled_gain"]
        meet = [v for v, s in shares.items() if s is not None and s >= bar]
        miss = [v for v, s in shares.items() if s is not None and s < bar]
        undefined = [v for v, s in shares.items() if s is None]
        out.append(f"At {row['user_fraction']:.0%} of Scientific's users: "
                   f"meet the {bar:.0%} target: {', '.join(meet) or 'none'}; "
                   f"miss it: {', '.join(miss) or 'none'}"
                   + (f"; undefined (pooled did not beat scratch): {', '.join(undefined)}"
                      if undefined else "") + ".")
    failed = [v for v, f in block["variants"].items() if "error" in f]
    if failed:
        out.append(f"Pretraining failed (no transfer rows): {', '.join(failed)}.")
    n = len(block["variants"])
    if n > 1:
        out.append(f"All {n} variants are reported: naming the best of them afterwards on "
                   "these test numbers is a selection among them (the intervals are not "
                   "adjusted for it), and a share of a small gain is imprecise (see the "
                   "intervals of scratch and pooled).")
    return out


def render_federated(block: dict[str, Any]) -> list[str]:
    block = _upgrade(block)
    pooled = block["pooled"]
    fracs = block.get("source_user_fraction", 1.0)
    out = ["## Federated vs pooled pretraining -> transfer to Scientific", "",
           f"Sources {', '.join(block['sources'])} ({block['clients']} clients; "
           f"{fracs:.0%} of their users) pretrain federated under each variant below "
           f"({_n(block['rounds'], 'round')} of 1 local epoch: the same passes over the data "
           f"as pooled) vs the same sources pooled ({_n(block['pretrain_epochs'], 'epoch')}); "
           f"each pretrained model transferred to {block['target']} (`freeze_encoder`, shrink "
           f"0.3 / perturb 0.1, up to {_n(block['transfer_epochs'], 'epoch')}, early stop); "
           "scratch: the "
           "target alone. Test split, full ranking, 95% bootstrap interval over users. "
           "Keeps = (variant - scratch) / (pooled - scratch)."
           + (" (**--quick smoke run, not a result**)" if block["quick"] else ""),
           "", "| users of Scientific | pretraining | NDCG@10 [95% CI] | over scratch "
           f"| keeps of pooled's gain (target {block['target_share']:.0%}) |",
           "|---|---|---|---|---|"]
    for row in block["rows"]:
        runs, shares = row["runs"], row["share_of_pooled_gain"]
        base = runs["scratch"]["test"]["ndcg@10"]
        for label, r in runs.items():
            share = shares.get(label)
            keeps = ("-" if label in ("scratch", "pooled") else
                     "n/a (no pooled gain)" if share is None else
                     f"{share:.0%} ({'meets' if share >= block['target_share'] else 'misses'})")
            over = "-" if label == "scratch" else f"{r['test']['ndcg@10'] - base:+.4f}"
            out.append(f"| {row['user_fraction']:.0%} | {label} | {_ndcg(r)} | {over} "
                       f"| {keeps} |")
    out += ["", "| pretraining | settings | rounds | bytes per round | total bytes | minutes "
            "| best valid NDCG@10 (sources) | client-level epsilon |",
            "|---|---|---|---|---|---|---|---|",
            f"| pooled | {_n(block['pretrain_epochs'], 'epoch')} over the pooled logs "
            f"| - | - (raw logs pooled) | - | {pooled['seconds'] / 60:.1f} "
            f"| {fmt(pooled['best_valid_ndcg@10'], '.4f')} | - |"]
    for v, fed in block["variants"].items():
        if "error" in fed:
            out.append(f"| {v} | failed: {fed['error'][:120]} | | | | | | |")
            continue
        out.append(
            f"| {v} | {_describe(fed)} | {len(fed['rounds'])} "
            f"| up {fed['bytes_up_per_round'] / 1e6:.2f} MB, down "
            f"{fed['bytes_down_per_round'] / 1e6:.2f} MB | {fed['bytes_total'] / 1e6:.1f} MB "
            f"| {fed['seconds'] / 60:.1f} | {fmt(fed['best_valid_ndcg@10'], '.4f')} "
            f"(round {fed['best_round'] + 1}) | {_epsilon(fed)} |")
    out += ["", *_verdict(block)]
    return out
