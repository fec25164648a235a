"""Embedding tables that grow: per-(platform, item) id vectors, and rows added for new platforms
or feature values. Transfer surgery for ``recommender.py``: a pretrained table keeps every row
exactly, new rows start at the mean (a new platform as the average one) or at zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ItemIdEmbedding(nn.Module):
    """One learned vector per (platform, item): the transductive part of an item vector.

    Text generalises to items never seen in training; an id vector memorises what text misses
    about items that have history (UniSRec's text+ID fine-tuning). Rows start at zero, so an
    item starts as its text vector and an unknown item (index beyond its platform's count, a
    platform without ids, padding) stays text only.

    Layout: row 0 is a shared zero row; item i (1..count_p) of platform p is row
    ``offsets[p] + i`` with ``offsets[p] = sum(counts[:p])``.
    """

    def __init__(self, counts: Sequence[int], dim: int) -> None:
        super().__init__()
        if any(c < 0 for c in counts):
            raise ValueError(f"item counts must be >= 0, got {list(counts)}")
        self.counts_list = [int(c) for c in counts]
        self.register_buffer("counts", torch.tensor(self.counts_list, dtype=torch.long),
                             persistent=False)
        offsets = [0]
        for c in self.counts_list[:-1]:
            offsets.append(offsets[-1] + c)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long),
                             persistent=False)
        self.embedding = nn.Embedding(1 + sum(self.counts_list), dim, padding_idx=0)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, item_ids: torch.Tensor, platform_ids: torch.Tensor) -> torch.Tensor:
        """(N, D) id vectors of per-platform item indices ``item_ids`` (N,)."""
        known = (item_ids > 0) & (item_ids <= self.counts[platform_ids])
        rows = torch.where(known, self.offsets[platform_ids] + item_ids,
                           torch.zeros_like(item_ids))
        return self.embedding(rows)                                           # (N, D)

    def grown(self, counts: Sequence[int]) -> ItemIdEmbedding:
        """A copy with room for ``counts`` (one per platform, each >= the current count, more
        platforms allowed); every known row keeps its vector, new rows start at zero."""
        old = self.counts_list
        if len(counts) < len(old) or any(n < o for n, o in zip(counts, old, strict=False)):
            raise ValueError(f"item id table cannot shrink: {old} -> {list(counts)}")
        new = ItemIdEmbedding(counts, self.embedding.embedding_dim).to(
            self.embedding.weight.device, self.embedding.weight.dtype)
        with torch.no_grad():
            for p, c in enumerate(old):
                if c:
                    src = int(self.offsets[p]) + 1
                    dst = int(new.offsets[p]) + 1
                    new.embedding.weight[dst:dst + c] = self.embedding.weight[src:src + c]
        new.embedding.weight.requires_grad_(self.embedding.weight.requires_grad)
        return new


def grow_embedding(emb: nn.Embedding, n: int, init: str = "mean") -> nn.Embedding:
    """A copy of ``emb`` with ``n`` more rows: the mean of the old rows (a new platform starts as
    the average platform) or zeros. Old rows are copied exactly."""
    if n < 0:
        raise ValueError(f"cannot shrink an embedding table (by {-n} rows)")
    if n == 0:
        return emb
    old = emb.weight.data
    new = nn.Embedding(emb.num_embeddings + n, emb.embedding_dim, padding_idx=emb.padding_idx,
                       device=old.device, dtype=old.dtype)
    with torch.no_grad():
        new.weight[: emb.num_embeddings] = old
        if init == "mean":
            new.weight[emb.num_embeddings:] = old.mean(dim=0, keepdim=True)
        else:
            new.weight[emb.num_embeddings:] = 0.0
    new.weight.requires_grad_(emb.weight.requires_grad)
    return new
