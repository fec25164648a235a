"""The ``federated`` part of ``bench/privacy.py``: federated vs pooled pretraining -> transfer.

The other shared shops (Online Retail, Office, MovieLens: the quality bench's sources) pretrain a
model, either pooled (``jobs.pretrain``: one Ray Train run over their concatenated logs) or
federated (``jobs.federated``: each shop a client actor that sends only model updates, FedAvg
weighted by rows). Each pretrained model is then transferred to Scientific
(``transfer.strategy=freeze_encoder`` with the quality bench's shrink-and-perturb, which is
what made source pretraining pay off there) with 10% and 100% of Scientific's training users, beside
a Scientific model trained from scratch on the same users. Test NDCG@10, full ranking, 95%
bootstrap interval over users. "Federated keeps X% of pooled's gain" =
(federated - scratch) / (pooled - scratch).

Budget (2 CPU cores, ~20 min): pooled pretraining gets ``PRETRAIN_EPOCHS`` epochs and federated
the same number of rounds of one local epoch each (the same passes over the data); transfers and
scratch runs are capped at ``TRANSFER_EPOCHS`` epochs with early stopping. Both pretrainings are
short of convergence; the comparison is at equal compute. Pretrained models are reused while
their config is unchanged.
"""

from __future__ import annotations

import argparse
import json
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


def pooled_pretrain(epochs: int) -> dict[str, Any]:
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    cfg = TrainJobConfig.model_validate(merge(TRAIN, {
        "name": "fed_bench_pooled", "mode": "pretrain", "train_platforms": SOURCES,
        "optim": {"epochs": epochs, "min_epochs": epochs, "early_stopping_patience": epochs}}))

    def train() -> dict[str, Any]:
        t = time.perf_counter()
        out = run_training(cfg)
        return {"export": str(out.export_dir), "best_valid_ndcg@10": out.best_metric,
                "epochs": len(out.curve), "seconds": round(time.perf_counter() - t, 1)}

    return _cached(cfg.name, cfg.model_dump(mode="json"), train)


def federated_pretrain(rounds: int) -> dict[str, Any]:
    from recsys.federated.config import FederatedJobConfig
    from recsys.federated.server import run_federated

    cfg = FederatedJobConfig.model_validate(merge(FEDERATED, {
        "name": "fed_bench_federated", "federated": {"rounds": rounds}}))

    def train() -> dict[str, Any]:
        t = time.perf_counter()
        out = run_federated(cfg)
        return {"export": str(out.export_dir), "best_valid_ndcg@10": out.best_metric,
                "best_round": out.best_round, "rounds": out.rounds,
                "bytes_up_per_round": out.bytes_up_per_round,
                "bytes_down_per_round": out.bytes_down_per_round,
                "seconds": round(time.perf_counter() - t, 1)}

    return _cached(cfg.name, cfg.model_dump(mode="json"), train)


def target_run(label: str, fraction: float, init: str | None, epochs: int) -> dict[str, Any]:
    """Scratch (``init`` None) or a transfer from ``init`` on Scientific, on ``fraction`` of
    its training users; test metrics with the bootstrap interval."""
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    over: dict[str, Any] = {
        "name": f"fed_bench_{TARGET}{round(fraction * 100)}_{label}",
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
    """Pretrain pooled and federated, transfer each to Scientific, compare with scratch."""
    rounds = 1 if a.quick else PRETRAIN_EPOCHS
    epochs = 1 if a.quick else TRANSFER_EPOCHS
    fractions = [0.1] if a.quick else FRACTIONS
    fed = federated_pretrain(rounds)
    log(f"federated pretraining: {fed['seconds']} s, "
        f"{fed['bytes_up_per_round'] / 1e6:.2f} MB up per round")
    pooled = pooled_pretrain(rounds)
    log(f"pooled pretraining: {pooled['seconds']} s")
    rows = []
    for fraction in fractions:
        runs = {label: target_run(label, fraction, init, epochs) for label, init in
                (("scratch", None), ("pooled", pooled["export"]),
                 ("federated", fed["export"]))}
        ndcg = {k: r["test"]["ndcg@10"] for k, r in runs.items()}
        rows.append({"user_fraction": fraction, "runs": runs,
                     "federated_share_of_pooled_gain": gain_share(
                         ndcg["scratch"], ndcg["pooled"], ndcg["federated"])})
    return {"quick": a.quick, "sources": SOURCES, "target": TARGET, "clients": len(SOURCES),
            "algorithm": FEDERATED["federated"]["algorithm"], "rounds": rounds,
            "pretrain_epochs": rounds, "transfer_epochs": epochs,
            "federated": fed, "pooled": pooled, "rows": rows,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


def _ndcg(r: dict[str, Any]) -> str:
    ci = r["test"]["ndcg@10_ci"]
    return (f"{r['test']['ndcg@10']:.4f} [{fmt(ci[0] if ci else None, '.4f')}, "
            f"{fmt(ci[1] if ci else None, '.4f')}]")


def render_federated(block: dict[str, Any]) -> list[str]:
    fed, pooled = block["federated"], block["pooled"]
    out = ["## Federated vs pooled pretraining -> transfer to Scientific", "",
           f"Sources {', '.join(block['sources'])} ({block['clients']} clients, "
           f"{block['algorithm']}, {block['rounds']} rounds of 1 local epoch) vs the same sources "
           f"pooled ({block['pretrain_epochs']} epochs); each pretrained model transferred to "
           f"{block['target']} (`freeze_encoder`, shrink 0.3 / perturb 0.1, up to "
           f"{block['transfer_epochs']} epochs, early stop); scratch: the target alone. "
           "Test split, full ranking, 95% bootstrap interval "
           "over users." + (" (**--quick smoke run, not a result**)" if block["quick"] else ""),
           "", "| users of Scientific | scratch NDCG@10 | pooled -> transfer | federated -> "
           "transfer | federated keeps of pooled's gain |", "|---|---|---|---|---|"]
    for row in block["rows"]:
        runs, share = row["runs"], row["federated_share_of_pooled_gain"]
        out.append(f"| {row['user_fraction']:.0%} | {_ndcg(runs['scratch'])} "
                   f"| {_ndcg(runs['pooled'])} | {_ndcg(runs['federated'])} "
                   f"| {'n/a (no pooled gain)' if share is None else f'{share:.0%}'} |")
    out += ["", "| pretraining | best valid NDCG@10 (sources) | minutes | bytes per round |",
            "|---|---|---|---|",
            f"| pooled | {fmt(pooled['best_valid_ndcg@10'], '.4f')} "
            f"| {pooled['seconds'] / 60:.1f} | - (raw logs pooled) |",
            f"| federated | {fmt(fed['best_valid_ndcg@10'], '.4f')} (round {fed['best_round']}) "
            f"| {fed['seconds'] / 60:.1f} | up {fed['bytes_up_per_round'] / 1e6:.2f} MB, down "
            f"{fed['bytes_down_per_round'] / 1e6:.2f} MB (all clients) |"]
    return out
