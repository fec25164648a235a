"""Evaluate an exported model on a split of an example set: full ranking, per platform, with the
cold-start subset (and, for cross-platform histories, users with and without history elsewhere),
the history-excluded protocol beside the primary one, and the CTR head's AUC.
Pure given its inputs and seed; used by ``jobs.evaluate``, after training, and by benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch
from pydantic import Field

from recsys.config import StrictModel
from recsys.data.crossplatform import history_elsewhere
from recsys.data.examples import ExampleSet, read_split
from recsys.data.feed import collate
from recsys.evaluation.metrics import COLD_START, RankingAccumulator, auc, cold_start_mask
from recsys.evaluation.ranking import rank_batches
from recsys.evaluation.report import EvalReport, build_report
from recsys.model.export import Exported
from recsys.model.recommender import Recommender
from recsys.training.items import PlatformItems, training_popularity
from recsys.training.objective import PlatformTensors


def platform_tensors(exported: Exported, popularity: Mapping[str, np.ndarray],
                     platforms: Sequence[str],
                     device: torch.device | None = None) -> dict[int, PlatformTensors]:
    """The export's item inputs of ``platforms`` by platform id, as ``rank_batches`` reads them."""
    device = device or torch.device("cpu")
    out = {}
    for name in platforms:
        it = exported.items[name]
        pop = popularity[name]
        items = PlatformItems(name=name, platform_id=it.platform_id, brand_ids=it.brand_ids,
                              category_ids=it.category_ids, text_vecs=it.text_vecs,
                              token_ids=None, popularity=pop)
        out[it.platform_id] = PlatformTensors.from_items(items, device)
    return out


ELSEWHERE = "history_elsewhere"
"""Subset: users whose history (as the model reads it) holds items of other platforms."""
OWN_ONLY = "own_history_only"
"""Subset: users whose history holds this platform's items only."""


@torch.inference_mode()
def evaluate_export(exported: Exported, example_set: ExampleSet, *, split: str = "test",
                    platforms: Sequence[str] | None = None, run: str = "eval",
                    batch_size: int = 512, seed: int = 0, user_fraction: float = 1.0,
                    curves: Sequence[Mapping[str, float]] = (),
                    meta: Mapping[str, str | int | float | bool | None] | None = None,
                    ranks_out: dict[str, np.ndarray] | None = None,
                    users_out: dict[str, np.ndarray] | None = None,
                    elsewhere_from: ExampleSet | None = None) -> EvalReport:
    """Evaluation report of ``exported`` on ``split`` (``user_fraction``: the training users the
    model saw, so that the cold-start subset means 'unseen in *its* training data').
    ``ranks_out``, if given, receives each platform's per-user target ranks (split row order),
    for paired comparisons of two models on the same users; ``users_out`` their user ids.

    A cross-platform example set (or ``elsewhere_from``, one with the same targets, to split an
    own-history model's users the same way) adds the subsets ``history_elsewhere`` and
    ``own_history_only``: users with and without items of other platforms in that history."""
    platforms = list(platforms or exported.meta.platforms_with_items)
    model = exported.model.eval()
    max_len = exported.model.config["max_len"]
    train = read_split(example_set, "train")
    popularity = {p: training_popularity(train, p, exported.items[p].num_items,
                                         user_fraction, seed) for p in exported.items}
    tensors = platform_tensors(exported, popularity, list(exported.items))
    ids = {p: it.platform_id for p, it in exported.items.items()}
    table = read_split(example_set, split)
    groups = elsewhere_users(elsewhere_from or example_set, split)
    columns = ("history", "target", "platform", *(["history_platform"]
                                                  if "history_platform" in table.column_names
                                                  else []))
    primary, excluded = RankingAccumulator(), RankingAccumulator()
    ctr_auc: dict[str, float] = {}
    gen = torch.Generator().manual_seed(seed)
    for name in platforms:
        rows = table.filter(pc.equal(table["platform"], name))
        if rows.num_rows == 0:
            continue
        batches = [collate({k: rows[k].to_numpy(zero_copy_only=False)[i:i + batch_size]
                            for k in columns}, max_len, ids)
                   for i in range(0, rows.num_rows, batch_size)]
        ranks = rank_batches(model, tensors, batches, with_history_excluded=True)[ids[name]]
        seen = np.flatnonzero(popularity[name] > 0)  # items seen in training
        subsets = {COLD_START: cold_start_mask(ranks["target"], seen)}
        users = rows["user_id"].to_numpy(zero_copy_only=False)
        if groups is not None:
            elsewhere = np.isin(users, groups.get(name, np.zeros(0, object)))
            subsets.update({ELSEWHERE: elsewhere, OWN_ONLY: ~elsewhere})
        primary.add(name, ranks["rank"], subsets=subsets)
        if ranks_out is not None:
            ranks_out[name] = np.asarray(ranks["rank"])
        if users_out is not None:
            users_out[name] = users
        excluded.add(name, ranks["rank_excl"])
        ctr_auc[name] = head_auc(model, tensors, ids[name], batches, gen)
    return build_report(run, split, primary, history_excluded=excluded, auc=ctr_auc,
                        curves=curves, seed=seed, meta=meta)


def elsewhere_users(example_set: ExampleSet, split: str) -> dict[str, np.ndarray] | None:
    """Per platform, the users of ``split`` whose history holds other platforms' items (None:
    the example set has own-platform histories only, so there is nothing to split by)."""
    if not example_set.manifest.config.sequences.cross_platform:
        return None
    table = read_split(example_set, split)
    flag = history_elsewhere(table)
    platform = table["platform"].to_numpy(zero_copy_only=False)
    users = table["user_id"].to_numpy(zero_copy_only=False)
    return {p: users[flag & (platform == p)] for p in np.unique(platform).tolist()}


def head_auc(model: Recommender, tensors: Mapping[int, PlatformTensors], pid: int,
             batches: list[dict[str, torch.Tensor]], gen: torch.Generator,
             negatives: Literal["uniform", "shown"] = "uniform") -> float:
    """AUC of the CTR head: the held-out next item (1) vs a uniformly drawn catalog item (0),
    or with ``negatives="shown"`` vs the item shown before it and not chosen (rows with one
    only: batches collated from an example set with impressions; nan if none has one)."""
    pt = tensors[pid]
    table = pt.item_table(model)  # (N+1, D)
    others: dict[int, torch.Tensor] = {}
    labels, scores = [], []
    for b in batches:
        hp = b.get("history_platform")
        if hp is not None:
            for q in hp.unique().tolist():
                if q != pid and q not in others:
                    others[q] = tensors[q].item_table(model)
        user = model.user_vector(b["history"], table, b["platform"], hp, others)
        neg = torch.randint(1, pt.num_items + 1, (len(user),), generator=gen)
        if negatives == "shown":
            if "shown" not in b:
                continue
            has = b["shown"][:, -1] > 0
            user, neg, target = user[has], b["shown"][has, -1], b["target"][has]
            if not len(user):
                continue
        else:
            target = b["target"]
        pos_s = model.ctr_logit(user, table[target])
        neg_s = model.ctr_logit(user, table[neg])
        scores += [pos_s.numpy(), neg_s.numpy()]
        labels += [np.ones(len(user)), np.zeros(len(user))]
    if not labels:
        return float("nan")
    return auc(np.concatenate(labels), np.concatenate(scores))


class EvaluateConfig(StrictModel):
    """Config of ``jobs.evaluate``: one or more exported models on the same split."""

    name: str = "evaluate"
    examples: str = "runs/demo/examples"
    split: Literal["valid", "test"] = "test"
    platforms: list[str] | None = None
    """Platforms to evaluate (None: those every export has items for)."""
    exports: dict[str, str] = Field(min_length=1)
    """Run label -> export directory, e.g. {scratch: ..., freeze_encoder: ...}."""
    baseline: str | None = "scratch"
    """With several exports, a transfer report compares each with this one (if present)."""
    out_dir: str = "runs/eval"
    seed: int = 0


def run_evaluation(cfg: EvaluateConfig) -> dict[str, Path]:
    """Evaluate each export, write its report, and the transfer report when there is a baseline."""
    from recsys.data.examples import load_example_set
    from recsys.evaluation.report import write_report, write_transfer_report
    from recsys.model.export import load_export

    es = load_example_set(cfg.examples)
    out = Path(cfg.out_dir) / cfg.name
    reports: dict[str, EvalReport] = {}
    files: dict[str, Path] = {}
    exported = {label: load_export(path) for label, path in cfg.exports.items()}
    common = set.intersection(*(set(e.meta.platforms_with_items) for e in exported.values()))
    platforms = cfg.platforms or sorted(common)
    missing = sorted(set(platforms) - common)
    if missing:
        raise ValueError(f"platform(s) {missing} are not in every export: {sorted(common)}")
    for label, exp in exported.items():
        reports[label] = evaluate_export(exp, es, split=cfg.split, platforms=platforms,
                                         run=label, seed=cfg.seed,
                                         user_fraction=exp.meta.user_fraction)
        files[label] = write_report(reports[label], out / label)["json"]
    if len(reports) > 1 and cfg.baseline in reports:
        files["transfer"] = write_transfer_report(reports, out, baseline=cfg.baseline)["json"]
    return files
