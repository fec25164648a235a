"""The ``attack`` part of ``bench/privacy.py``: membership inference against the DP-SGD table's
transfer (Office -> Scientific, ``transfer.strategy=user_tower``), non-private and per epsilon.

The DP table's runs trained on every Scientific user, so no user of theirs is a non-member: this
part retrains the same configs on an explicit, seeded split of Scientific's users
(:data:`SHARES`, by a hash of the user id, ``recsys.evaluation.membership.assign_roles``):

* ``target_in`` (40%): the target model's private fine-tuning users, the *members*;
* ``target_out`` (20%): held out of every model, the *non-members* of the evaluation;
* ``shadow`` (40%): the attacker's own users; shadow model k trains on a seeded half of them
  (``shadow_in``) and the other half are its known non-members.

Each model trains through the same path (``run_training``) on an example set that holds only
its users' Scientific rows (train, valid and test: model selection sees no one else), written
under ``runs/bench_privacy/attack_examples/``. Private models keep the DP table's sample rate
q = 1024 / 8,442 (so the same noise multiplier per epsilon and the same steps); the expected
users per step scale with the smaller training sets. Shadow models copy the target's config,
privacy included (the attacker knows the training algorithm). Features and attacks:
``recsys.evaluation.membership``; AUC intervals: bootstrap over users.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SHARES = {"target_in": 0.4, "target_out": 0.2, "shadow": 0.4}
SPLIT_SEED = 22
SHADOWS = 2
"""Shadow models per target config (each ~17% of the users; 2 keep the part under ~20 min)."""
PLATFORM = "scientific"
ATTACKS = ("loss", "rank", "calibrated", "shadow")
N_BOOT = 1000
CONTROL: dict[str, Any] = {"transfer": {"strategy": "freeze_encoder"}}
"""Positive control (not private): the item tower trains too, for :data:`CONTROL_EPOCHS`; it
shows what the attacks catch when a model does fit its members."""
CONTROL_EPOCHS = 20


def subset_example_set(src: Path, dst: Path, users: set[str]) -> int:
    """An example set at ``dst`` with only ``users``' rows of :data:`PLATFORM` in every split
    (catalog and tokens linked from ``src``); returns its training users."""
    import pyarrow.parquet as pq

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("catalog", "tokens.parquet"):
        (dst / name).symlink_to((src / name).resolve())
    manifest = json.loads((src / "manifest.json").read_text())
    keep = pa.array(sorted(users), pa.string())
    stats = manifest["platforms"][PLATFORM]
    for split in ("train", "valid", "test"):
        (dst / split).mkdir()
        for f in sorted((src / split).glob(f"{PLATFORM}-*.parquet")):
            t = pq.read_table(f)
            t = t.filter(pc.is_in(t["user_id"], keep))
            pq.write_table(t, dst / split / f.name)
            stats[f"{split}_rows"] = t.num_rows
    stats["users"] = len(users)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return len(users)


def train_or_reuse(cfg_dict: dict[str, Any], users_digest: str) -> tuple[Path, dict[str, Any]]:
    """Train one model, or reuse its export when its config and user set are unchanged (a
    rerun after an interruption then only trains what is missing)."""
    from privacy import OUTPUT, log

    from recsys.model.export import read_meta
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    cfg = TrainJobConfig.model_validate(cfg_dict)
    run = Path(OUTPUT) / cfg.name
    export, record = run / "export", run / "attack_config.json"
    wanted = {"config": cfg.model_dump(mode="json"), "users": users_digest}
    if export.exists() and record.exists() and json.loads(record.read_text()) == wanted:
        log(f"reusing {export}")
        info = json.loads((run / "attack_result.json").read_text())
        return export, {**info, "reused": True}
    log(f"{cfg.name} ...")
    t = time.perf_counter()
    out = run_training(cfg)
    res = out.report.platforms[PLATFORM]
    card = read_meta(out.export_dir).privacy
    info = {"run": cfg.name, "privacy": None if card is None else card.model_dump(),
            "test_ndcg@10": res.metrics["ndcg@10"], "seconds": round(time.perf_counter() - t, 1)}
    (run / "attack_result.json").write_text(json.dumps(info))
    record.write_text(json.dumps(wanted))
    return out.export_dir, {**info, "reused": False}


def _digest(users: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(users)).encode()).hexdigest()[:16]


def model_config(eps: float, init: str, examples: Path, name: str, users: int,
                 sample_rate: float, quick: bool, epochs: int) -> dict[str, Any]:
    """The DP table's transfer config at ``eps``, on ``examples``, at the table's sample rate."""
    from privacy import transfer_config
    from quality_plan import merge

    cfg = transfer_config(eps, init, quick, epochs)
    cfg.pop("user_fraction", None)  # the example set holds exactly the model's users
    cfg = merge(cfg, {"name": name, "data": {"examples": str(examples)}})
    if "privacy" in cfg:
        cfg["privacy"]["expected_users_per_step"] = max(1, round(sample_rate * users))
    return cfg


def run_attack(a: argparse.Namespace) -> dict[str, Any]:
    """Membership-inference AUCs for the non-private model and each epsilon."""
    from privacy import DP, EPSILONS, OUTPUT, log, pretrain
    from quality_plan import merge

    from recsys.data.examples import load_example_set, read_split
    from recsys.evaluation import membership as mi
    from recsys.model.export import load_export
    from recsys.training.items import keep_user

    t0 = time.perf_counter()
    init, _ = pretrain(a.quick)
    epochs = 1 if a.quick else a.epochs
    src = Path("runs/shared/examples")
    train = read_split(load_example_set(src), "train")
    train = train.filter(pc.equal(train["platform"], PLATFORM))
    all_users = sorted(set(train["user_id"].to_pylist()))
    fraction = 0.1 if a.quick else 1.0
    users = [u for u, k in zip(all_users, keep_user(all_users, fraction, 0), strict=True) if k]
    per_step = 128 if a.quick else DP["expected_users_per_step"]
    sample_rate = per_step / len(users)  # the DP table's q
    roles = dict(zip(users, mi.assign_roles(users, SHARES, SPLIT_SEED), strict=True))
    target_in = {u for u, r in roles.items() if r == "target_in"}
    target_out = {u for u, r in roles.items() if r == "target_out"}
    pool = sorted(u for u, r in roles.items() if r == "shadow")
    shadow_in = [{u for u, r in zip(pool, mi.assign_roles(pool, {"in": .5, "out": .5},
                                                          SPLIT_SEED + 1 + k), strict=True)
                  if r == "in"} for k in range(SHADOWS)]
    base = Path(OUTPUT) / "attack_examples"
    sets = {"target": (target_in, base / "target")}
    sets |= {f"shadow{k}": (s, base / f"shadow{k}") for k, s in enumerate(shadow_in)}
    for users_k, path in sets.values():
        subset_example_set(src, path, users_k)
    eval_rows = train.filter(pc.is_in(train["user_id"], pa_strings(target_in | target_out)))
    pool_rows = train.filter(pc.is_in(train["user_id"], pa_strings(set(pool))))
    temperature = float(transfer_temperature())
    eval_users, labels = mi.membership_labels(sorted(target_in), sorted(target_out))
    runs = [(("nonprivate" if math.isinf(e) else f"eps{e:g}"), e, {})
            for e in EPSILONS if a.epsilons is None or e in a.epsilons]
    n = 1 if a.quick else CONTROL_EPOCHS
    if a.epsilons is None:
        runs.append(("control", math.inf, merge(CONTROL, {"optim": {
            "epochs": n, "min_epochs": n, "early_stopping_patience": n}})))
    rows = []
    for tag, eps, extra in runs:
        t = time.perf_counter()
        trained = {}
        for key, (users_k, path) in sets.items():
            name = f"attack_{key}_{tag}" + ("_quick" if a.quick else "")
            cfg = model_config(eps, init, path, name, len(users_k), sample_rate, a.quick, epochs)
            trained[key] = train_or_reuse(merge(cfg, extra), _digest(users_k))
        target_export = load_export(trained["target"][0])
        tf = mi.user_features(target_export, eval_rows, PLATFORM, temperature).select(eval_users)
        shadows, refs = [], []
        for k in range(SHADOWS):
            exp = load_export(trained[f"shadow{k}"][0])
            shadows.append((mi.user_features(exp, pool_rows, PLATFORM, temperature),
                            shadow_in[k]))
            refs.append(mi.user_features(exp, eval_rows, PLATFORM, temperature))
        attack_model = mi.fit_attack(*mi.shadow_training_set(shadows))
        scores = {"loss": mi.threshold_scores(tf, "mean_loss"),
                  "rank": mi.threshold_scores(tf, "mean_log_rank"),
                  "calibrated": mi.calibrated_scores(tf, refs),
                  "shadow": attack_model.scores(tf)}
        results = {k: mi.evaluate_attack(labels, s, N_BOOT, seed=0).as_dict()
                   for k, s in scores.items()}
        rows.append({"label": tag, "target_epsilon": None if math.isinf(eps) else eps,
                     "target": trained["target"][1],
                     "shadows": [trained[f"shadow{k}"][1] for k in range(SHADOWS)],
                     "attacks": results, "attack_model": attack_model.as_dict(),
                     "seconds": round(time.perf_counter() - t, 1)})
        log(f"attack {tag}: " + ", ".join(f"{k} AUC {r['auc']:.3f}" for k, r in results.items()))
    return {"quick": a.quick, "epochs": epochs, "split_seed": SPLIT_SEED, "shares": SHARES,
            "shadows": SHADOWS, "sample_rate": sample_rate, "temperature": temperature,
            "users": {"target_in": len(target_in), "target_out": len(target_out),
                      "shadow_pool": len(pool), "shadow_in": [len(s) for s in shadow_in]},
            "bootstrap": N_BOOT, "control": {**CONTROL, "epochs": n}, "runs": rows,
            "minutes": round((time.perf_counter() - t0) / 60, 1),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}


def pa_strings(users: set[str]) -> pa.Array:
    return pa.array(sorted(users), pa.string())


def transfer_temperature() -> float:
    """The softmax temperature the models train with (the loss the attack recomputes)."""
    from privacy import BASE

    return float(BASE["loss"]["temperature"])


def train_seconds(row: dict[str, Any]) -> float:
    """Training time of a row's models (target and shadows), also when they were reused."""
    return float(row["target"]["seconds"] + sum(s["seconds"] for s in row["shadows"]))


def control_note(block: dict[str, Any]) -> str:
    """What the control row is, when the block has one."""
    if not any(r.get("label") == "control" for r in block["runs"]):
        return ""
    return ("Control row: not private, `transfer.strategy=freeze_encoder` (the item tower "
            f"trains on the members too), {block['control']['epochs']} epochs. ")


def render_attack(block: dict[str, Any]) -> list[str]:
    """The attack table of ``privacy.md``."""
    from common import fmt

    u = block["users"]
    out = ["## Membership inference on Scientific", "",
           f"Same transfer and DP configs as the table above ({block['epochs']} epochs), retrained "
           f"on a seeded split of Scientific's users (seed {block['split_seed']}): target "
           f"trained on {u['target_in']:,} members, {u['target_out']:,} held-out non-members; "
           f"{block['shadows']} shadow models per row, each trained on "
           f"{'/'.join(f'{n:,}' for n in u['shadow_in'])} of a disjoint pool of "
           f"{u['shadow_pool']:,} users (the rest of the pool: their non-members); private "
           f"models at the table's sample rate q = {block['sample_rate']:.3f}"
           + (" (**--quick smoke run, not a result**)" if block["quick"] else "")
           + ". " + control_note(block) + "Attack AUC, members vs non-members, 95% bootstrap "
           "interval over users (0.5 = chance); TPR at 1% FPR: members caught when 1% of "
           "non-members are accused "
           "(chance: 0.01); training minutes: target and shadow models, 2 CPU cores. Attacks: "
           "`docs/privacy.md`, \"Attacks\".", "",
           "| target epsilon | epsilon spent | test NDCG@10 (members) | loss threshold | "
           "rank threshold | calibrated loss | shadow model | TPR@1%FPR calibrated / shadow "
           "| training minutes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in block["runs"]:
        p = r["target"]["privacy"]
        cells = [f"{x['auc']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"
                 for x in (r["attacks"][k] for k in ATTACKS)]
        eps = r["target_epsilon"]
        label = ("inf, control: item tower trained too" if r.get("label") == "control"
                 else "inf (non-private)" if eps is None else fmt(eps, "g"))
        out.append(f"| {label} "
                   f"| {fmt(p['epsilon'], '.2f') if p else 'inf'} "
                   f"| {r['target']['test_ndcg@10']:.4f} | " + " | ".join(cells)
                   + f" | {r['attacks']['calibrated']['tpr_at_1pct_fpr']:.3f} / "
                   f"{r['attacks']['shadow']['tpr_at_1pct_fpr']:.3f} "
                   f"| {train_seconds(r) / 60:.1f} |")
    return out
