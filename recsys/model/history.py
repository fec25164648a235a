"""Cross-platform histories on the model side: each item of a history embedded with its own
platform's item table, and the items of the rows' own catalog.

A cross-platform history (``recsys.data.crossplatform``) holds item indices of several catalogs;
``history_platforms`` (B, L) says which (model platform ids). Training, validation, offline
evaluation and serving build user vectors through these two functions, so that an item from
another platform is never looked up in the wrong table.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def own_items(history: torch.Tensor, platform_ids: torch.Tensor,
              history_platforms: torch.Tensor | None) -> torch.Tensor:
    """``history`` (B, L) with the items of other platforms (``history_platforms`` (B, L) !=
    ``platform_ids`` (B,)) set to padding: the items of the rows' own catalog."""
    if history_platforms is None:
        return history
    return history.masked_fill(history_platforms != platform_ids.unsqueeze(1), 0)


def history_vectors(history: torch.Tensor, item_table: torch.Tensor, platform_ids: torch.Tensor,
                    history_platforms: torch.Tensor | None = None,
                    item_tables: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Item vectors (B, L, D) of left-padded histories (B, L), each item from its own
    platform's table: ``item_table`` for the rows' platform ``platform_ids`` (B,), and
    ``item_tables[q]`` for the positions whose ``history_platforms`` (B, L) is another ``q``
    (a table of any rows, as long as it has the items asked for). Padding (0) is zero."""
    own = own_items(history, platform_ids, history_platforms)
    seq = F.embedding(own, item_table)                                        # (B, L, D)
    if history_platforms is None:
        return seq
    elsewhere = (history != 0) & (history_platforms != platform_ids.unsqueeze(1))  # (B, L)
    if not bool(elsewhere.any()):
        return seq
    for q in history_platforms[elsewhere].unique().tolist():
        if item_tables is None or q not in item_tables:
            raise KeyError(f"a history holds items of platform id {q}, but no item table was "
                           "given for it (item_tables)")
        at = elsewhere & (history_platforms == q)                             # (B, L)
        vecs = F.embedding(history.masked_fill(~at, 0), item_tables[q])       # (B, L, D)
        seq = torch.where(at.unsqueeze(-1), vecs, seq)
    return seq


def padded_user_vectors(user_tower: torch.nn.Module, seqs: list[torch.Tensor],
                        platform_ids: list[int],
                        history_platforms: list[list[int]] | None = None) -> torch.Tensor:
    """User vectors (B, D) of B histories of item vectors ``seqs[b]`` (L_b, D), oldest first
    (each item from its own platform's table), for users on ``platform_ids[b]``;
    ``history_platforms[b]`` (L_b,) the platform id of each item (None: all own). One call of
    ``user_tower`` (``Recommender.user_tower``) over the left-padded batch: what serving runs
    for merged cross-platform histories (``recsys.data.crossplatform.merge_histories``)."""
    L = max(s.shape[0] for s in seqs)
    D = seqs[0].shape[1]
    seq = seqs[0].new_zeros((len(seqs), L, D))
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    pids = torch.tensor(platform_ids, dtype=torch.long)
    hp = pids[:, None].repeat(1, L)  # padding: the row's own platform
    for b, s in enumerate(seqs):
        n = s.shape[0]
        seq[b, L - n:] = s
        valid[b, L - n:] = True
        if history_platforms is not None:
            hp[b, L - n:] = torch.tensor(history_platforms[b], dtype=torch.long)
    marks = hp if history_platforms is not None else None
    return user_tower(seq, valid.to(seq.device), pids.to(seq.device),
                      None if marks is None else marks.to(seq.device))[:, -1]  # (B, D)
