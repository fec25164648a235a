"""Full ranking over a large catalog in bounded memory: users are scored against ``chunk`` items
at a time, counting per user the items that score above (and level with) the target and keeping
a running top k, so a batch holds (B, chunk) scores, never (B, N+1).

Same protocol and formula as ``rank_of_target`` on ``Recommender.score``: every item competes
except padding and the target itself (the history-excluded variant also drops the user's own
history items), ties count half, the repeat bias applies to the user's own items. The target's
score is computed once per user by the same ``score_items``; ``rank_batches`` switches to this
path only for catalogs of more than ``chunk`` items, so smaller ones keep the exact code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.model.recommender import Recommender

CHUNK_ITEMS = 65_536
"""Items scored at once: (B, 65,536) fp32 is 128 MiB for a batch of 512 users."""


@dataclass
class ChunkedRanks:
    rank: torch.Tensor                 # (B,) float64, 1-based, ties half
    rank_excl: torch.Tensor | None     # (B,) the same with the own history excluded
    top: torch.Tensor | None           # (B, k) item indices, best first (k=0: None)
    top_scores: torch.Tensor | None    # (B, k)


def _in_chunk(items: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(B, hi - lo) bool: columns lo..hi-1 that appear in each row of ``items`` (B, L)."""
    mask = torch.zeros(items.shape[0], hi - lo + 1, dtype=torch.bool, device=items.device)
    inside = (items >= lo) & (items < hi)
    cols = torch.where(inside, items - lo, hi - lo)  # outside -> a spare last column
    return mask.scatter_(1, cols, True)[:, :-1]


@torch.inference_mode()
def chunked_ranks(model: Recommender, user: torch.Tensor, table: torch.Tensor,
                  own: torch.Tensor, platform_ids: torch.Tensor, targets: torch.Tensor, *,
                  exclude_own: bool = False, k: int = 0, chunk: int = CHUNK_ITEMS
                  ) -> ChunkedRanks:
    """Ranks of ``targets`` (B,) for users (B, D) over a catalog ``table`` (N+1, D), given each
    row's own items ``own`` (B, L) (0 = padding; they get the repeat bias and, with
    ``exclude_own``, are excluded); with ``k``, each user's top k items too."""
    batch = user.shape[0]
    rows = torch.arange(batch, device=user.device)
    n_cols = table.shape[0]
    t_seen = (own == targets[:, None]).any(dim=1)                                     # (B,)
    diag = torch.eye(batch, dtype=torch.bool, device=user.device) & t_seen[:, None]
    t_score = model.score_items(user, table[targets], diag, platform_ids)[rows, rows]  # (B,)
    greater = torch.zeros(batch, dtype=torch.int64, device=user.device)
    tied = torch.zeros_like(greater)
    greater_x, tied_x = torch.zeros_like(greater), torch.zeros_like(greater)
    top_s = torch.full((batch, 0), float("-inf"), device=user.device)
    top_i = torch.zeros((batch, 0), dtype=torch.long, device=user.device)
    for lo in range(0, n_cols, chunk):
        hi = min(lo + chunk, n_cols)
        seen = _in_chunk(own, lo, hi)                                                 # (B, c)
        scores = model.score_items(user, table[lo:hi], seen, platform_ids)          # (B, c)
        if torch.isnan(scores[:, 1 if lo == 0 else 0:]).any():
            raise ValueError("scores contain NaN: every comparison with NaN is false, so the "
                             "target would rank first")
        competes = torch.ones_like(seen)
        if lo == 0:
            competes[:, 0] = False                                                    # padding
        competes &= ~_in_chunk(targets[:, None], lo, hi)
        above = (scores > t_score[:, None]) & competes
        level = (scores == t_score[:, None]) & competes
        greater += above.sum(dim=1)
        tied += level.sum(dim=1)
        if exclude_own:
            greater_x += (above & ~seen).sum(dim=1)
            tied_x += (level & ~seen).sum(dim=1)
        if k:
            masked = scores.masked_fill(_padding(seen, lo), float("-inf"))       # (B, c)
            vals, idx = torch.topk(torch.cat([top_s, masked], 1),
                                   min(k, top_s.shape[1] + masked.shape[1]), dim=1)
            top_i = torch.gather(torch.cat([top_i, torch.arange(lo, hi, device=user.device)
                                            .expand(batch, -1)], 1), 1, idx)
            top_s = vals
    rank = 1.0 + greater.double() + 0.5 * tied.double()
    rank_x = 1.0 + greater_x.double() + 0.5 * tied_x.double() if exclude_own else None
    return ChunkedRanks(rank, rank_x, top_i if k else None, top_s if k else None)


def _padding(like: torch.Tensor, lo: int) -> torch.Tensor:
    """(B, c) bool: True at the padding column (item 0) when the chunk starts at 0."""
    pad = torch.zeros_like(like)
    if lo == 0:
        pad[:, 0] = True
    return pad
