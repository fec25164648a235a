"""The training wrapper: owns the loss, so the model never sees it (torchrec's ``DLRMTrain``).

Next-item prediction at every position of a (left-padded) training sequence, SASRec-style:
input ``history`` (B, L), labels ``history[:, 1:] ++ target``. Two softmax variants:

* ``full_softmax``: scores against the platform's whole catalog (exact; the default when the
  item table is cheap, i.e. with cached frozen-encoder vectors);
* ``sampled_softmax``: scores against the batch's own label items plus popularity-sampled
  negatives, with logQ correction (Yi et al., 2019) so the sampled estimate is unbiased in
  expectation. Needed when the text encoder runs in the step (full fine-tune, LoRA).

Plus the CTR head's BCE: the next item (label 1) against a popularity-sampled item (label 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.model.features import token_batch
from recsys.model.recommender import Recommender
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


def item_vectors(model: Recommender, p: PlatformTensors, ids: torch.Tensor | None) -> torch.Tensor:
    """Item-tower output for ``ids`` (M,) or for the whole catalog (N+1, D) when ``ids`` is None.

    Text vectors come from the cache or, when the model carries a text encoder, are encoded
    here from token ids (only for the requested items: each distinct item once per step).
    """
    all_ids = torch.arange(p.num_items + 1, device=p.brand_ids.device) if ids is None else ids
    if model.text_encoder is not None and p.token_ids is not None:
        # The padding row (id 0) has no tokens and never goes through the encoder: an all-masked
        # row can come out NaN from CUDA's fused attention, and NaN gradients (zeroing the row
        # afterwards does not stop them) make ZeRO skip every optimizer step: the most likely
        # cause of full/lora transfers that trained nothing on an H200 in bf16.
        real = (all_ids > 0).nonzero().squeeze(1)                       # (R,) rows with text
        text = torch.zeros(len(all_ids), model.config["text_dim"], device=all_ids.device,
                           dtype=model.item_tower.adapter.weight.dtype)
        if len(real):
            input_ids, mask = token_batch([p.token_ids[i] for i in all_ids[real].tolist()])
            encoded = model.encode_items_text(input_ids.to(all_ids.device),
                                              mask.to(all_ids.device))   # (R, H)
            text = text.index_copy(0, real, encoded.to(text.dtype))
    else:
        if p.text_vecs is None:
            raise ValueError("no cached text vectors for the item tower, and "
                             + ("no token ids for the model's text encoder"
                                if model.text_encoder is not None else "no text encoder"))
        # Cached vectors are fp32; DeepSpeed's bf16 casts the parameters, never this cache.
        text = p.text_vecs[all_ids].to(model.item_tower.adapter.weight.dtype)
    pid = torch.full_like(all_ids, p.platform_id)
    vecs = model.item_tower(text, p.brand_ids[all_ids], p.category_ids[all_ids], pid, all_ids)
    return vecs.masked_fill((all_ids == 0).unsqueeze(-1), 0.0)  # padding row stays zero


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

    def forward(self, history: torch.Tensor, target: torch.Tensor,
                platform: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        labels = torch.cat([history[:, 1:], target[:, None]], dim=1)  # (B, L)
        losses, ctr_losses, n_pos = [], [], 0
        for pid in platform.unique().tolist():
            rows = platform == pid
            p = self.platforms[pid]
            hist, lab = history[rows], labels[rows]
            valid = hist > 0  # (b, L) positions with an input item
            pids = platform[rows][0].expand(int(valid.sum()))  # (P,) this platform
            seen_rows, seen_items = prefix_items(hist, valid)
            if self.cfg.kind == "full_softmax":
                table = item_vectors(self.model, p, None)  # (N+1, D) once per step
                states = self.model.user_states(hist, table, platform[rows])  # (b, L, D)
                u = states[valid]  # (P, D)
                y = lab[valid]  # (P,)
                seen = torch.zeros(len(y), table.shape[0], dtype=torch.bool, device=y.device)
                seen[seen_rows, seen_items] = True  # (P, N+1) items up to each position
                logits = self.model.score_all(u, table, seen, pids) / self.cfg.temperature
                losses.append(F.cross_entropy(logits, y, reduction="sum"))
                pos_vec = table[y]
                neg_ids = self._sample(p, len(y))
                neg_vec = table[neg_ids]
            else:
                cand, y_idx, table_hist = self._candidates(p, hist, lab, valid)
                states = self.model.user_states(hist, table_hist, platform[rows])
                u = states[valid]
                cand_vec = table_hist[cand]  # (M, D), already encoded in _candidates
                # (P, M) candidates already at or before each position (cand is sorted)
                col = torch.searchsorted(cand, seen_items).clamp(max=len(cand) - 1)
                hit = cand[col] == seen_items
                seen = torch.zeros(len(y_idx), len(cand), dtype=torch.bool, device=cand.device)
                seen[seen_rows[hit], col[hit]] = True
                logits = (self.model.score_candidates(u, cand_vec)
                          + self.model.repeat_scores(seen, pids)) / self.cfg.temperature
                if self.cfg.logq_correction:
                    logits = logits - p.sample_logp[cand][None, :]
                losses.append(F.cross_entropy(logits, y_idx, reduction="sum"))
                pos_vec = cand_vec[y_idx]
                neg_vec = cand_vec[torch.randint(0, len(cand), (len(y_idx),),
                                                 device=cand.device)]
            if self.cfg.ctr_weight > 0:
                pos = self.model.ctr_logit(u, pos_vec)
                neg = self.model.ctr_logit(u, neg_vec)
                ctr_losses.append(
                    F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="sum")
                    + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg),
                                                         reduction="sum"))
            n_pos += int(valid.sum())
        n = max(n_pos, 1)
        rec = torch.stack(losses).sum() / n
        ctr = torch.stack(ctr_losses).sum() / (2 * n) if ctr_losses else rec.new_zeros(())
        loss = rec + self.cfg.ctr_weight * ctr
        return loss, {"loss": float(loss.detach()), "rec_loss": float(rec.detach()),
                      "ctr_loss": float(ctr.detach()), "positions": n_pos}

    def _sample(self, p: PlatformTensors, n: int) -> torch.Tensor:
        probs = p.sample_logp.exp()
        return torch.multinomial(probs, n, replacement=True)

    def _candidates(self, p: PlatformTensors, hist: torch.Tensor, lab: torch.Tensor,
                    valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate set = label items of the batch + sampled negatives.

        Returns (cand (M,), index of each valid position's label in cand (P,), a sparse item
        table (N+1, D) holding the vectors of the candidates and of the histories' items).
        """
        negs = self._sample(p, self.cfg.num_negatives)
        needed = torch.cat([lab[valid], negs, hist[valid]]).unique()  # sorted, unique
        vecs = item_vectors(self.model, p, needed)  # each distinct item encoded once
        table = vecs.new_zeros((p.num_items + 1, vecs.shape[1])).index_copy(0, needed, vecs)
        cand = torch.cat([lab[valid], negs]).unique()
        y_idx = torch.searchsorted(cand, lab[valid])
        return cand, y_idx, table
