"""The training wrapper: owns the loss, so the model never sees it (torchrec's ``DLRMTrain``).

Next-item prediction at every position of a (left-padded) training sequence, SASRec-style:
input ``history`` (B, L), labels ``history[:, 1:] ++ target``. Two softmax variants:

* ``full_softmax``: scores against the platform's whole catalog (exact; the default when the
  item table is cheap, i.e. with cached frozen-encoder vectors);
* ``sampled_softmax``: scores against the batch's own label items plus sampled negatives
  (``loss.negatives``: by popularity, none, or uniform; :mod:`recsys.training.negatives`), with
  logQ correction (Yi et al., 2019) for the proposal they were drawn from. Needed when the text
  encoder runs in the step (full fine-tune, LoRA): only the step's items go through the item
  tower and the encoder (candidates, the histories' items, the shown CTR negatives), held in a
  compact table of those rows, so a step costs the same at 10k or 1M items.

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
from recsys.training.negatives import draw_negatives, proposal_logq
from recsys.training.stale_text import StaleTextVectors


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


def compact_index(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x``'s items in a compact table ``[padding; vectors of ids]``: position in the
    sorted, distinct, non-zero ``ids`` (U,) plus one; 0 (padding) stays 0. Every non-zero item
    of ``x`` must be in ``ids``."""
    pos = torch.searchsorted(ids, x).clamp(0, max(len(ids) - 1, 0)) + 1
    return torch.where(x > 0, pos, torch.zeros_like(x))


def compact_table(vecs: torch.Tensor) -> torch.Tensor:
    """(U+1, D): a zero padding row 0, then ``vecs`` (U, D)."""
    return torch.cat([vecs.new_zeros((1, vecs.shape[1])), vecs])


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
                 platforms: dict[int, PlatformTensors], refresh_every: int = 0) -> None:
        """``refresh_every`` > 0 (``encoder.refresh_every_steps``): under the full softmax with
        the text encoder in the step, encode only the step's items and take the rest of the
        catalog from text vectors re-encoded every that many steps
        (:mod:`recsys.training.stale_text`); 0: encode the whole catalog every step."""
        super().__init__()
        self.model = model
        self.cfg = loss
        self.platforms = platforms
        self.stale = StaleTextVectors(refresh_every) if refresh_every > 0 else None

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
            hist, others = self._other_tables(hist, hp, pid)  # other platforms: compact rows
            neg_shown = None if shown is None else shown[rows][valid]  # (P,) 0: none
            if self.cfg.kind == "full_softmax":
                if (self.stale is not None and self.model.text_encoder is not None
                        and p.token_ids is not None):  # the step's items encoded, rest cached
                    step = [lab[valid], own.flatten(), *([] if neg_shown is None else [neg_shown])]
                    table = self.stale.item_table(self.model, p, torch.cat(step))  # (N+1, D)
                else:
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
                neg_ids = draw_negatives("popularity", p.sample_logp, len(y))
                if neg_shown is not None:
                    neg_ids = torch.where(neg_shown > 0, neg_shown, neg_ids)
                neg_vec = table[neg_ids]
            else:
                cand, y_idx, needed, table_c, logq = self._candidates(p, own, lab, valid,
                                                                      neg_shown)
                hist = torch.where(own > 0, compact_index(needed, own), hist)  # (b, L) rows
                states = self.model.user_states(hist, table_c, platform[rows], hp, others)
                u = states[valid]
                cand_vec = table_c[compact_index(needed, cand)]  # (M, D) encoded in _candidates
                # (P, M) candidates already at or before each position (cand is sorted)
                col = torch.searchsorted(cand, seen_items).clamp(max=len(cand) - 1)
                hit = cand[col] == seen_items
                seen = torch.zeros(len(y_idx), len(cand), dtype=torch.bool, device=cand.device)
                seen[seen_rows[hit], col[hit]] = True
                logits = self.model.score_items(u, cand_vec, seen, pids) / self.cfg.temperature
                if self.cfg.logq_correction:
                    logits = logits - logq[None, :]
                losses.append(F.cross_entropy(logits, y_idx, reduction="sum"))
                pos_vec = cand_vec[y_idx]
                neg_vec = cand_vec[torch.randint(0, len(cand), (len(y_idx),),
                                                 device=cand.device)]
                if neg_shown is not None:  # _candidates encoded the shown items too
                    neg_vec = torch.where((neg_shown > 0)[:, None],
                                          table_c[compact_index(needed, neg_shown)], neg_vec)
            if self.cfg.ctr_weight > 0:
                pos = self.model.ctr_logit(u, pos_vec)
                neg = self.model.ctr_logit(u, neg_vec)
                ctr_losses.append(
                    F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")
                    + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg),
                                                         reduction="sum"))
            n_pos += int(valid.sum())
            n_shown += 0 if neg_shown is None else int((neg_shown > 0).sum())
        if self.stale is not None and self.training:
            self.stale.advance()
        n = max(n_pos, 1)
        rec = torch.stack(losses).sum() / n
        ctr = torch.stack(ctr_losses).sum() / (2 * n) if ctr_losses else rec.new_zeros(())
        loss = rec + self.cfg.ctr_weight * ctr
        return loss, {"loss": float(loss.detach()), "rec_loss": float(rec.detach()),
                      "ctr_loss": float(ctr.detach()), "positions": n_pos,
                      "shown_negatives": n_shown}

    def _other_tables(self, hist: torch.Tensor, hp: torch.Tensor | None, pid: int
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Cross-platform histories: ``hist`` with the other platforms' items re-indexed into
        compact tables holding only the items these histories use (each encoded once), and
        those tables keyed by platform id. The row's own items are left as they are."""
        if hp is None:
            return hist, {}
        elsewhere = (hist > 0) & (hp != pid)
        out = {}
        for q in hp[elsewhere].unique().tolist():
            if q not in self.platforms:
                raise KeyError(f"a history holds items of platform id {q}, which has no item "
                               f"inputs in this run (known: {sorted(self.platforms)})")
            at = elsewhere & (hp == q)
            ids = hist[at].unique()
            out[q] = compact_table(self.platforms[q].item_table(self.model, ids))  # (M+1, D)
            hist = torch.where(at, compact_index(ids, hist), hist)
        return hist, out

    def _candidates(self, p: PlatformTensors, hist: torch.Tensor, lab: torch.Tensor,
                    valid: torch.Tensor, shown: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, ...]:
        """Candidate set = label items of the batch + sampled negatives (``loss.negatives``).

        Returns (cand (M,) sorted item ids, index of each valid position's label in cand (P,),
        needed (U,) the sorted distinct items of the step: the candidates, the histories' items
        and the ``shown`` CTR negatives; their compact table (U+1, D), row
        ``compact_index(needed, i)`` = item i, each item encoded once and nothing else of the
        catalog; log Q of cand (M,)). ``hist``: this platform's items only (``own_items``).
        """
        labels = lab[valid]  # (P,)
        negs = draw_negatives(self.cfg.negatives, p.sample_logp, self.cfg.num_negatives)
        cand = torch.cat([labels, negs]).unique()  # sorted
        if not len(cand):  # in_batch negatives and no position of this platform to train
            cand = torch.ones(1, dtype=labels.dtype, device=labels.device)
        extra = [] if shown is None else [shown[shown > 0]]
        needed = torch.cat([cand, hist[hist > 0], *extra]).unique()  # (U,) sorted
        table = compact_table(p.item_table(self.model, needed))  # (U+1, D)
        y_idx = torch.searchsorted(cand, labels)
        logq = proposal_logq(self.cfg.negatives, p.sample_logp, cand, len(labels), len(negs))
        return cand, y_idx, needed, table, logq
