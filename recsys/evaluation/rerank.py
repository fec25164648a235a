"""Two-stage ranking offline: retrieval (the towers, full ranking) against retrieval + the CTR
head re-ordering the retrieval's top N, on the same users, as serving does with
``rules.<platform>.rerank_top_n`` (``recsys.serving.rules.rerank``).

A target outside the retrieval's top N keeps its retrieval rank (the second stage never sees
it); one inside takes its position in the CTR head's order. Metrics per user, so that the two
stages compare paired (the bootstrap resamples users).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow.compute as pc
import torch

from recsys.data.examples import ExampleSet, read_split
from recsys.data.feed import collate
from recsys.evaluation.metrics import auc, bootstrap_ci, rank_of_target
from recsys.evaluation.offline import head_auc, platform_tensors
from recsys.model.export import Exported
from recsys.training.items import training_popularity
from recsys.training.objective import PlatformTensors


def rerank_ranks(exported: Exported, tensors: Mapping[int, PlatformTensors],
                 batches: list[dict[str, torch.Tensor]], platform: str, *, top_n: int = 50
                 ) -> dict[str, np.ndarray]:
    """Per user of ``platform`` (``batches`` of its rows, ``tensors`` its item inputs): the
    target's rank by retrieval (``retrieval``) and after the CTR head re-ordered the
    retrieval's top ``top_n`` (``rerank``); for rows whose target has a shown-not-chosen item
    (``shown``), the retrieval scores of both (``shown_pos``, ``shown_neg``)."""
    model = exported.model.eval()
    pid = exported.items[platform].platform_id
    tables = {q: t.item_table(model) for q, t in tensors.items()}  # (N+1, D) each
    table = tables[pid]
    retrieval, reranked, shown_pos, shown_neg = [], [], [], []
    for b in batches:
        hp = b.get("history_platform")
        scores = model.score(b["history"], b["platform"], table, history_platforms=hp,
                             item_tables=tables)                                # (B, N+1)
        ranks = rank_of_target(scores, b["target"])                             # (B,)
        if "shown" in b:
            has = b["shown"][:, -1] > 0
            rows = torch.arange(len(scores))[has]
            shown_pos.append(scores[rows, b["target"][has]].numpy())
            shown_neg.append(scores[rows, b["shown"][has, -1]].numpy())
        scores[:, 0] = float("-inf")
        cand = torch.topk(scores, min(top_n, scores.shape[1] - 1), dim=1).indices  # (B, n)
        user = model.user_vector(b["history"], table, b["platform"], hp, tables)  # (B, D)
        n = cand.shape[1]
        logits = model.ctr_logit(user[:, None].expand(-1, n, -1).reshape(-1, user.shape[1]),
                                 table[cand.reshape(-1)]).reshape(-1, n)        # (B, n)
        reordered = torch.gather(cand, 1, torch.argsort(logits, dim=1, descending=True))
        hit = reordered == b["target"][:, None]
        second = torch.where(hit.any(dim=1), hit.float().argmax(dim=1) + 1, ranks)
        retrieval.append(ranks.numpy())
        reranked.append(second.numpy())
    empty = [np.zeros(0, np.float32)]
    return {"retrieval": np.concatenate(retrieval), "rerank": np.concatenate(reranked),
            "shown_pos": np.concatenate(shown_pos or empty),
            "shown_neg": np.concatenate(shown_neg or empty)}


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of one held-out item at 1-based ``ranks``."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


@torch.inference_mode()
def rerank_table(exported: Exported, example_set: ExampleSet, platforms: Sequence[str], *,
                 top_n: int = 50, split: str = "test", k: int = 10,
                 batch_size: int = 256) -> list[dict[str, object]]:
    """One row per platform: NDCG@k and Recall@k of both stages, the paired gain with its 95%
    bootstrap interval over users, and the CTR head's AUC: held-out next item vs a random one,
    and vs the item shown before it and not chosen where the logs have impressions.
    Item inputs and batches are built once and serve both measurements."""
    train = read_split(example_set, "train")
    popularity = {p: training_popularity(train, p, exported.items[p].num_items, 1.0, 0)
                  for p in exported.items}
    tensors = platform_tensors(exported, popularity, list(exported.items))
    ids = {p: it.platform_id for p, it in exported.items.items()}
    table = read_split(example_set, split)
    max_len = exported.model.config["max_len"]
    out = []
    for platform in platforms:
        rows = table.filter(pc.equal(table["platform"], platform))
        columns = ["history", "target", "platform",
                   *[c for c in ("history_platform", "shown") if c in rows.column_names]]
        batches = [collate({c: rows[c].to_numpy(zero_copy_only=False)[i:i + batch_size]
                            for c in columns}, max_len, ids)
                   for i in range(0, rows.num_rows, batch_size)]
        ranks = rerank_ranks(exported, tensors, batches, platform, top_n=top_n)
        a, b = ndcg_at(ranks["retrieval"], k), ndcg_at(ranks["rerank"], k)
        head = head_auc(exported.model, tensors, ids[platform], batches,
                        torch.Generator().manual_seed(0))
        shown = rows["shown"] if "shown" in rows.column_names else None
        n_shown = 0 if shown is None else int(sum(len(s) > 0 and s[-1] > 0
                                                  for s in shown.to_pylist()))
        auc_shown = head_auc(exported.model, tensors, ids[platform], batches,
                             torch.Generator().manual_seed(0), negatives="shown")
        pos, neg = ranks["shown_pos"], ranks["shown_neg"]
        retrieval_auc = (auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
                         if len(pos) else None)
        out.append({
            "platform": platform, "users": int(len(a)), "top_n": top_n,
            f"ndcg@{k}_retrieval": float(a.mean()), f"ndcg@{k}_rerank": float(b.mean()),
            f"recall@{k}_retrieval": float((ranks["retrieval"] <= k).mean()),
            f"recall@{k}_rerank": float((ranks["rerank"] <= k).mean()),
            "gain": float((b - a).mean()), "gain_ci": bootstrap_ci(b - a, n=2000, seed=0),
            "ctr_auc": float(head), "shown_rows": n_shown,
            "ctr_auc_shown": float(auc_shown) if n_shown else None,
            "retrieval_auc_shown": retrieval_auc})
    return out
