"""The training wrapper: owns the loss, so the model never sees it (torchrec's ``DLRMTrain``).

Next-item prediction at every position of a (left-padded) training sequence, SASRec-style:
input ``history`` (B, L), labels ``history[:, 1:] ++ target``. Two softmax variants:

* ``full_softmax``: scores against the platform's whole catalog (exact; the default when the
  item table is cheap, i.e. with cached frozen-encoder vectors);
* ``sampled_softmax``: scores against the batch's own label items plus popularity-sampled
  negatives, with logQ correction (Yi et al., 2019) so the sampled estimate is unbiased in
  expectation. Needed when the text encoder runs in the step (full fine-tune, LoRA).

Plus the CTR head's BCE: the next item (label 1) against an item shown before it and not
chosen (label 0) where the logs have impressions (``shown``), else a popularity-sampled item.

Cross-platform histories (``history_platform``): every item is embedded with its own platform's
table; positions whose next item is another platform's are inputs only (no label here), and only
the row's own items count as seen (the repeat bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.model.history import own_items
from recsys.model.recommender import Recommender, mask_padding
from recsys.training.config import LossConfig
from recsys.training.items import PlatformItems


@dataclass
class PlatformTensors:
    """One platform's item inputs as tensors on the training device."""

    platform_id: int
    brand_ids: torch.Tensor  # (N+1,)
    category_ids: torch.Tensor  # (N+1, C)
    text_vecs: torch.Tensor | None  # (N+1, H)
    token_ids: list[np.ndarray] | None
    sample_logp: torch.Tensor  # (N+1,) log sampling probability, -inf at padding

    @classmethod
    def from_items(cls, items: PlatformItems, device: torch.device) -> PlatformTensors:
        pop = items.popularity.astype(np.float64) + 1.0  # add-one: every item can be sampled
        pop[0] = 0.0
        logp = np.log(np.where(pop > 0, pop / pop.sum(), 1.0))
        logp[0] = -np.inf
        return cls(
            platform_id=items.platform_id,
            # Copies: arrays from the object store are read-only views (torch warns on them).
            brand_ids=torch.tensor(items.brand_ids, device=device),
            category_ids=torch.tensor(items.category_ids, device=device),
            text_vecs=None if items.text_vecs is None else torch.tensor(items.text_vecs,
                                                                         device=device),
            token_ids=items.token_ids,
            sample_logp=torch.as_tensor(logp, dtype=torch.float32, device=device),
        )

    @property
    def num_items(self) -> int:
        return len(self.brand_ids) - 1

    def item_table(self, model: Recommender, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``model.item_table`` of this platform: (N+1, D), or (M,) ``ids`` only (M, D)."""
        return model.item_table(self.text_vecs, self.brand_ids, self.category_ids,
                                self.platform_id, ids=ids, token_ids=self.token_ids)


def prefix_items(history: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For next-item prediction at every valid position of left-padded histories (b, L): the
    items the user had seen by then, as (row, item) pairs; row = index of the position in
    ``history[valid]`` order (the order of the loss's rows). A history of n items gives
    n (n + 1) / 2 pairs, so batches of long histories cost the most (length buckets help)."""
    L = history.shape[1]
    upto = torch.tril(torch.ones(L, L, dtype=torch.bool, device=history.device))  # [t, s]: s<=t
    pairs = valid[:, :, None] & upto[None] & (history[:, None, :] > 0)             # (b, t, s)
    row_of = torch.cumsum(valid.flatten(), 0).view_as(valid) - 1                   # (b, L)
    b, t, src = pairs.nonzero(as_tuple=True)
    return row_of[b, t], history[b, src]


class RecommenderObjective(nn.Module):
    """``forward(batch) -> (loss, stats)``; the module that DDP / DeepSpeed wrap."""

    def __init__(self, model: Recommender, loss: LossConfig,
                 platforms: dict[int, PlatformTensors]) -> None:
        super().__init__()
        self.model = model
        self.cfg = loss
        self.platforms = platforms

    def forward(self, history: torch.Tensor, target: torch.Tensor, platform: torch.Tensor,
                history_platform: torch.Tensor | None = None, shown: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of a batch: ``history`` (B, L) left-padded, ``target`` (B,), ``platform`` (B,)
        model platform ids; ``history_platform`` (B, L): the platform id of each history item
        (a cross-platform history; None: all the row's own). Only positions whose next item is
        the row's platform's are trained (the softmax is over that platform's catalog).
        ``shown`` (B, L): per label, an item shown and not chosen (0: none), the CTR head's
        negative there."""
        labels = torch.cat([history[:, 1:], target[:, None]], dim=1)  # (B, L)
        label_pf = None if history_platform is None else torch.cat(
            [history_platform[:, 1:], platform[:, None]], dim=1)  # (B, L) platform of each label
        losses, ctr_losses, n_pos, n_shown = [], [], 0, 0
        for pid in platform.unique().tolist():
            rows = platform == pid
            p = self.platforms[pid]
            hist, lab = history[rows], labels[rows]
            hp = None if history_platform is None else history_platform[rows]
            valid = hist > 0  # (b, L) positions with an input item
            own = hist if hp is None else own_items(hist, platform[rows], hp)  # (b, L)
            if label_pf is not None:
                valid = valid & (label_pf[rows] == pid)  # next item is this platform's
            pids = platform[rows][0].expand(int(valid.sum()))  # (P,) this platform
            seen_rows, seen_items = prefix_items(own, valid)
            others = self._other_tables(hist, hp, pid)
            neg_shown = None if shown is None else shown[rows][valid]  # (P,) 0: none
            if self.cfg.kind == "full_softmax":
                table = p.item_table(self.model)  # (N+1, D) once per step
                states = self.model.user_states(hist, table, platform[rows], hp,
                                                others)  # (b, L, D)
                u = states[valid]  # (P, D)
                y = lab[valid]  # (P,)
                seen = torch.zeros(len(y), table.shape[0], dtype=torch.bool, device=y.device)
                seen[seen_rows, seen_items] = True  # (P, N+1) items up to each position
                logits = mask_padding(self.model.score_items(u, table, seen, pids)
                                      ) / self.cfg.temperature
                losses.append(F.cross_entropy(logits, y, reduction="sum"))
                pos_vec = table[y]
                neg_ids = self._sample(p, len(y))
                if neg_shown is not None:
                    neg_ids = torch.where(neg_shown > 0, neg_shown, neg_ids)
                neg_vec = table[neg_ids]
            else:
                cand, y_idx, table_hist = self._candidates(p, own, lab, valid, neg_shown)
                states = self.model.user_states(hist, table_hist, platform[rows], hp, others)
                u = states[valid]
                cand_vec = table_hist[cand]  # (M, D), already encoded in _candidates
                # (P, M) candidates already at or before each position (cand is sorted)
                col = torch.searchsorted(cand, seen_items).clamp(max=len(cand) - 1)
                hit = cand[col] == seen_items
                seen = torch.zeros(len(y_idx), len(cand), dtype=torch.bool, device=cand.device)
                seen[seen_rows[hit], col[hit]] = True
                logits = self.model.score_items(u, cand_vec, seen, pids) / self.cfg.temperature
                if self.cfg.logq_correction:
                    logits = logits - p.sample_logp[cand][None, :]
                losses.append(F.cross_entropy(logits, y_idx, reduction="sum"))
                pos_vec = cand_vec[y_idx]
                neg_vec = cand_vec[torch.randint(0, len(cand), (len(y_idx),),
                                                 device=cand.device)]
                if neg_shown is not None:  # _candidates encoded the shown items too
                    neg_vec = torch.where((neg_shown > 0)[:, None], table_hist[neg_shown],
                                          neg_vec)
            if self.cfg.ctr_weight > 0:
                pos = self.model.ctr_logit(u, pos_vec)
                neg = self.model.ctr_logit(u, neg_vec)
                ctr_losses.append(
                    F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")
                    + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg),
                                                         reduction="sum"))
            n_pos += int(valid.sum())
            n_shown += 0 if neg_shown is None else int((neg_shown > 0).sum())
        n = max(n_pos, 1)
        rec = torch.stack(losses).sum() / n
        ctr = torch.stack(ctr_losses).sum() / (2 * n) if ctr_losses else rec.new_zeros(())
        loss = rec + self.cfg.ctr_weight * ctr
        return loss, {"loss": float(loss.detach()), "rec_loss": float(rec.detach()),
                      "ctr_loss": float(ctr.detach()), "positions": n_pos,
                      "shown_negatives": n_shown}

    def _other_tables(self, hist: torch.Tensor, hp: torch.Tensor | None,
                      pid: int) -> dict[int, torch.Tensor]:
        """Item tables of the other platforms in cross-platform histories, holding only the
        items these histories use (each encoded once), keyed by platform id."""
        if hp is None:
            return {}
        elsewhere = (hist > 0) & (hp != pid)
        out = {}
        for q in hp[elsewhere].unique().tolist():
            if q not in self.platforms:
                raise KeyError(f"a history holds items of platform id {q}, which has no item "
                               f"inputs in this run (known: {sorted(self.platforms)})")
            ids = hist[elsewhere & (hp == q)].unique()
            vecs = self.platforms[q].item_table(self.model, ids)  # (M, D)
            out[q] = vecs.new_zeros((self.platforms[q].num_items + 1, vecs.shape[1])
                                    ).index_copy(0, ids, vecs)
        return out

    def _sample(self, p: PlatformTensors, n: int) -> torch.Tensor:
        probs = p.sample_logp.exp()
        return torch.multinomial(probs, n, replacement=True)

    def _candidates(self, p: PlatformTensors, hist: torch.Tensor, lab: torch.Tensor,
                    valid: torch.Tensor, shown: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate set = label items of the batch + sampled negatives.

        Returns (cand (M,), index of each valid position's label in cand (P,), a sparse item
        table (N+1, D) holding the vectors of the candidates, of the histories' items and of
        the ``shown`` CTR negatives). ``hist``: this platform's items only (``own_items``).
        """
        negs = self._sample(p, self.cfg.num_negatives)
        extra = [] if shown is None else [shown[shown > 0]]
        needed = torch.cat([lab[valid], negs, hist[hist > 0], *extra]).unique()  # sorted
        vecs = p.item_table(self.model, needed)  # each distinct item encoded once
        table = vecs.new_zeros((p.num_items + 1, vecs.shape[1])).index_copy(0, needed, vecs)
        cand = torch.cat([lab[valid], negs]).unique()
        y_idx = torch.searchsorted(cand, lab[valid])
        return cand, y_idx, table
