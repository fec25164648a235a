"""What ``bench/quality.py`` trains: its base settings, every run by name, and run-name rules.

Shared by the runner (``quality.py``), the paired re-evaluation (``quality_paired.py``), the
report (``quality_report.py``) and the GPU benchmark (``gpu.py``), so that a run's name means the
same settings everywhere.
"""

from __future__ import annotations

from typing import Any

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
# Fixed and public: the shared data's pseudonyms (its example set) were made with this key.
PSEUDONYM_KEY = "62656e63682d6b65792d6e6f742d736563726574"

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
    """``base`` with ``over`` laid on top, nested dicts merged key by key (neither changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def repeat_bias(run: dict[str, Any]) -> str:
    """'on' / 'off' from the run's config; '-' for a run recorded before the option existed."""
    flag = run["config"]["model"].get("repeat_bias")
    return "-" if flag is None else ("on" if flag else "off")
