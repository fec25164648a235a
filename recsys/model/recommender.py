"""The recommender, end to end in one file: text -> item vectors -> user states -> scores.

Text-based and transferable (UniSRec-style): an item is its text (title, brand, category) through a
pretrained encoder, not a per-platform ID, so a model pretrained on many shops scores the items
of a new shop without having seen them.

    TextEncoder       token ids (N, T)          -> text vectors (N, H)   (encoder.py; cached, LoRA)
    ItemTower         text (N, H) + brand + cat -> item vectors (N, D)   (PlatformAdapter inside)
                      [+ item id]                                        (optional, transductive)
    UserTower         history item vectors      -> user states (B, L, D) (causal, SASRec-style)
                      [+ each item's platform]                           (cross-platform history)
    score             user (B, D) . items       -> (B, N+1) full-catalog scores (retrieval)
                      [+ repeat bias on seen]                            (optional, per platform)
    CTRHead           [user; item; user*item]   -> click logit (B,)      (ranking)

Shapes: N items of one platform (item index 1..N, 0 = padding), H text width, D model width,
B batch, L history length (histories are LEFT-padded with 0, most recent item last), C category
depth, K experts, P platforms.

Plain ``nn.Module``s with flat typed arguments: no configs, no losses (a training wrapper owns
the loss), no Ray. ``Recommender.config`` holds the constructor arguments, so
``Recommender(**config)`` + ``load_state_dict`` rebuilds a checkpoint anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The LoRA helpers and the loader are re-exported (``__all__``) for callers that import them here.
from recsys.model.encoder import TextEncoder, apply_lora, load_text_encoder, merge_lora
from recsys.model.features import token_batch
from recsys.model.history import history_vectors, own_items
from recsys.model.tables import ItemIdEmbedding, grow_embedding

# -------------------------------------------------------------------------------------------------
# Item side


class PlatformAdapter(nn.Module):
    """UniSRec's MoE whitening adaptor: text space (H) -> model space (D), per platform.

    Expert k is a parametric whitening ``(x - b_k) @ W_k``; a softmax gate mixes the experts. The
    gate is ``x @ G`` plus a learned bias per platform, so each shop can lean on different experts
    while sharing all of them (the transferable part).
    """

    def __init__(self, text_dim: int, dim: int, num_experts: int, num_platforms: int,
                 dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(num_experts, text_dim))                # b: (K, H)
        self.weight = nn.Parameter(torch.randn(num_experts, text_dim, dim) * 0.02)  # W: (K, H, D)
        self.gate = nn.Linear(text_dim, num_experts, bias=False)                    # G: (H, K)
        nn.init.zeros_(self.gate.weight)  # start with uniform gates, as UniSRec
        self.platform_gate = nn.Embedding(num_platforms, num_experts)               # (P, K)
        nn.init.zeros_(self.platform_gate.weight)

    def gates(self, x: torch.Tensor, platform_ids: torch.Tensor) -> torch.Tensor:
        """Expert weights (N, K), rows sum to 1."""
        return F.softmax(self.gate(x) + self.platform_gate(platform_ids), dim=-1)

    def forward(self, x: torch.Tensor, platform_ids: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)                                                   # (N, H)
        # (x - b_k) @ W_k == x @ W_k - b_k @ W_k: never materialises an (N, K, H) tensor.
        experts = torch.einsum("nh,khd->nkd", x, self.weight)                 # (N, K, D)
        experts = experts - torch.einsum("kh,khd->kd", self.bias, self.weight)
        g = self.gates(x, platform_ids)                                       # (N, K)
        return torch.einsum("nk,nkd->nd", g, experts)                         # (N, D)

    def add_platforms(self, n: int) -> None:
        self.platform_gate = grow_embedding(self.platform_gate, n)


class ItemTower(nn.Module):
    """Item vector = adapted text + brand embedding + mean of category-prefix embeddings
    [+ an item id embedding when ``item_counts`` is given].

    Text first, so unseen items and new platforms get vectors too; the optional id part adds
    what an item's own history taught (zero for items without one).
    Brand and category ids share one vocabulary across platforms; id 0 = unknown/none.
    """

    def __init__(self, text_dim: int, dim: int, num_brands: int, num_categories: int,
                 num_platforms: int, num_experts: int, dropout: float,
                 item_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.item_id = ItemIdEmbedding(item_counts, dim) if item_counts is not None else None
        self.adapter = PlatformAdapter(text_dim, dim, num_experts, num_platforms, dropout)
        self.brand = nn.Embedding(num_brands, dim, padding_idx=0)
        self.category = nn.Embedding(num_categories, dim, padding_idx=0)
        for emb in (self.brand, self.category):
            nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                emb.weight[0].zero_()
        self.norm = nn.LayerNorm(dim)

    def forward(self, text_vecs: torch.Tensor, brand_ids: torch.Tensor,
                category_ids: torch.Tensor, platform_ids: torch.Tensor,
                item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``item_ids`` (N,): per-platform item indices, for the id part (None: text only, as
        for a search query)."""
        x = self.adapter(text_vecs, platform_ids)                             # (N, D)
        known = (category_ids != 0).unsqueeze(-1)                             # (N, C, 1)
        cat = (self.category(category_ids) * known).sum(dim=1)                # (N, D)
        cat = cat / known.sum(dim=1).clamp(min=1)                             # (N, D) mean
        x = x + self.brand(brand_ids) + cat
        if self.item_id is not None and item_ids is not None:
            x = x + self.item_id(item_ids, platform_ids)                      # (N, D)
        return self.norm(x)                                                   # (N, D)

    def set_item_counts(self, counts: Sequence[int]) -> None:
        """Id rows for ``counts`` items per platform (creates the table, or grows it)."""
        if self.item_id is None:
            self.item_id = ItemIdEmbedding([0] * len(counts), self.norm.normalized_shape[0]).to(
                self.brand.weight.device)
        self.item_id = self.item_id.grown(counts)

    def resize_features(self, num_brands: int, num_categories: int) -> None:
        """Grow the brand/category tables after ``FeatureVocab.extend``; new rows start at 0
        (same contribution as 'unknown') and are learnt during fine-tuning."""
        self.brand = grow_embedding(self.brand, num_brands - self.brand.num_embeddings,
                                     init="zeros")
        self.category = grow_embedding(self.category,
                                        num_categories - self.category.num_embeddings,
                                        init="zeros")


# -------------------------------------------------------------------------------------------------
# User side


class UserTower(nn.Module):
    """SASRec: a causal Transformer over the item vectors of a user's history.

    Positions count back from the most recent item (the last column always has position
    ``max_len - 1``), so left padding never shifts a real item's position: a history gives the
    same states however much padding its batch needs.

    Every position adds the embedding of the platform the user is on; an item from another
    platform (cross-platform history) also adds *that* platform's: "seen elsewhere, there".
    A history of the platform's own items gives the same states with or without it.
    """

    def __init__(self, dim: int, max_len: int, num_platforms: int, num_layers: int,
                 num_heads: int, dropout: float) -> None:
        super().__init__()
        self.max_len = max_len
        self.num_heads = num_heads
        self.position = nn.Embedding(max_len, dim)
        self.platform = nn.Embedding(num_platforms, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.platform.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim,
                                           dropout=dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # Pre-norm blocks leave the residual stream unnormalised: a final LayerNorm, as GPT-2.
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)

    def forward(self, seq: torch.Tensor, valid: torch.Tensor, platform_ids: torch.Tensor,
                history_platforms: torch.Tensor | None = None) -> torch.Tensor:
        """States (B, L, D) of item vectors ``seq``; ``valid`` (B, L) marks real items,
        ``history_platforms`` (B, L) each item's platform (None: all the target's own)."""
        B, L, D = seq.shape
        if L > self.max_len:
            raise ValueError(f"history length {L} > max_len {self.max_len}: cut histories to "
                             "the most recent max_len items")
        pos = torch.arange(self.max_len - L, self.max_len, device=seq.device)   # (L,)
        x = seq + self.position(pos) + self.platform(platform_ids).unsqueeze(1)  # (B, L, D)
        if history_platforms is not None:
            elsewhere = valid & (history_platforms != platform_ids.unsqueeze(1))  # (B, L)
            x = x + self.platform(history_platforms) * elsewhere.unsqueeze(-1)   # (B, L, D)
        x = self.dropout(x) * valid.unsqueeze(-1)                                # (B, L, D)
        x = self.encoder(x, mask=self._attention_mask(valid))                    # (B, L, D)
        return x * valid.unsqueeze(-1)  # padding positions carry no state

    def _attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """(B * heads, L, L) bool, True = blocked: causal and padding keys blocked, but every
        position may attend to itself, so no softmax row is empty (no NaNs on padding rows)."""
        B, L = valid.shape
        idx = torch.arange(L, device=valid.device)
        causal = idx[None, :] <= idx[:, None]                                   # (L, L) j <= i
        allowed = causal[None] & valid[:, None, :]                              # (B, L, L)
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=valid.device)[None]
        return (~allowed).repeat_interleave(self.num_heads, dim=0)              # (B*heads, L, L)

    def add_platforms(self, n: int) -> None:
        self.platform = grow_embedding(self.platform, n)


# -------------------------------------------------------------------------------------------------
# Heads


class CTRHead(nn.Module):
    """Click logit from a user and an item vector: ``w . [u; i; u * i] + b``.

    The product term is what makes it personal: with ``[u; i]`` alone the logit is
    ``w_u . u + w_i . i``, and every user would rank the items in the same order.
    Returns the logit; the training wrapper applies BCE-with-logits, serving a sigmoid.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * dim, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        x = torch.cat([user, item, user * item], dim=-1)                      # (B, 3D)
        return self.linear(x).squeeze(-1)                                     # (B,)


# -------------------------------------------------------------------------------------------------
# The model


class Recommender(nn.Module):
    """Item tower + user tower + CTR head, and optionally the text encoder.

    ``text_encoder`` is None when text vectors come from a frozen-encoder cache (the default
    mode); pass one (e.g. after :func:`apply_lora`) to fine-tune it end to end. It is not part of
    ``config``: it is saved and loaded on its own (``save_pretrained``).

    Id conventions: ``num_brands`` / ``num_categories`` are vocabulary sizes including id 0
    (``FeatureVocab.num_brands``); platform ids are 0..num_platforms-1. ``item_counts``
    (catalog size per platform id, 0 = none) switches on per-item id embeddings.

    ``repeat_bias``: one learned score per platform, added to the items already in a user's
    history. How often people take an item again is a property of the shop (a gift shop's
    re-orders, a lab-supplies shop's one-off purchases), and a text model cannot learn it from
    item vectors: the user vector sits near the vectors of the items just seen, which therefore
    score high. Starts at 0 (no effect).
    """

    def __init__(
        self,
        text_dim: int,
        dim: int,
        num_platforms: int,
        num_brands: int,
        num_categories: int,
        max_len: int,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.1,
        num_experts: int = 4,
        normalize: bool = True,
        item_counts: list[int] | None = None,
        repeat_bias: bool = False,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if text_encoder is not None and text_encoder.hidden_size != text_dim:
            raise ValueError(f"text_dim {text_dim} != text encoder hidden size "
                             f"{text_encoder.hidden_size}")
        self.config: dict[str, Any] = dict(
            text_dim=text_dim, dim=dim, num_platforms=num_platforms, num_brands=num_brands,
            num_categories=num_categories, max_len=max_len, num_layers=num_layers,
            num_heads=num_heads, dropout=dropout, num_experts=num_experts, normalize=normalize,
            item_counts=list(item_counts) if item_counts is not None else None,
            repeat_bias=repeat_bias)
        if item_counts is not None and len(item_counts) != num_platforms:
            raise ValueError(f"item_counts has {len(item_counts)} entries for {num_platforms} "
                             "platforms")
        self.normalize = normalize
        self.text_encoder = text_encoder
        self.item_tower = ItemTower(text_dim, dim, num_brands, num_categories, num_platforms,
                                    num_experts, dropout, item_counts)
        self.user_tower = UserTower(dim, max_len, num_platforms, num_layers, num_heads, dropout)
        self.ctr_head = CTRHead(dim)
        self.repeat: nn.Embedding | None = None
        if repeat_bias:
            self.enable_repeat_bias()

    # -- items ------------------------------------------------------------------------------------

    def encode_items_text(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
        """Text vectors (N, H) through the model's own (fine-tuned) encoder."""
        if self.text_encoder is None:
            raise RuntimeError("this Recommender has no text_encoder (frozen-cache mode): "
                               "take text vectors from the encoder cache")
        return self.text_encoder(input_ids, attention_mask)

    def item_table(self, text_vecs: torch.Tensor | None, brand_ids: torch.Tensor,
                   category_ids: torch.Tensor, platform_id: int, *,
                   ids: torch.Tensor | None = None,
                   token_ids: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """Item vectors of one platform's catalog (N+1, D), row 0 (padding) zero; or of the
        items ``ids`` (M,) only. The one way an item table is built: training, validation,
        offline evaluation, the pyfunc and serving all call it.

        Inputs are indexed by item index, row 0 included: ``brand_ids`` (N+1,), ``category_ids``
        (N+1, C), cached text vectors ``text_vecs`` (N+1, H). With a text encoder and
        ``token_ids`` (N+1 arrays) the text is encoded here instead, each requested item once.
        """
        device = brand_ids.device
        all_ids = torch.arange(len(brand_ids), device=device) if ids is None else ids
        dtype = self.item_tower.adapter.weight.dtype
        if self.text_encoder is not None and token_ids is not None:
            # The padding row (id 0) has no tokens and never goes through the encoder: an
            # all-masked row can come out NaN from CUDA's fused attention, and NaN gradients
            # (zeroing the row afterwards does not stop them) make ZeRO skip every step.
            real = (all_ids > 0).nonzero().squeeze(1)                       # (R,) rows with text
            text = torch.zeros(len(all_ids), self.config["text_dim"], device=device, dtype=dtype)
            if len(real):
                input_ids, mask = token_batch([token_ids[i] for i in all_ids[real].tolist()])
                encoded = self.encode_items_text(input_ids.to(device), mask.to(device))  # (R, H)
                text = text.index_copy(0, real, encoded.to(dtype))
        elif text_vecs is None:
            raise ValueError("no cached text vectors for the item tower, and "
                             + ("no token ids for the model's text encoder"
                                if self.text_encoder is not None else "no text encoder"))
        else:  # cached vectors are fp32; DeepSpeed's bf16 casts the parameters, not this cache
            text = text_vecs[all_ids].to(dtype)                                 # (M, H)
        pid = torch.full_like(all_ids, platform_id)
        vecs = self.item_tower(text, brand_ids[all_ids], category_ids[all_ids], pid, all_ids)
        return vecs.masked_fill((all_ids == 0).unsqueeze(-1), 0.0)  # (M, D) padding row zero

    # -- users ------------------------------------------------------------------------------------

    def user_states(self, history: torch.Tensor, item_table: torch.Tensor,
                    platform_ids: torch.Tensor, history_platforms: torch.Tensor | None = None,
                    item_tables: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """States (B, L, D) of left-padded histories (B, L); state t summarises items <= t.
        A cross-platform history gives each item's platform id ``history_platforms`` (B, L)
        and those platforms' ``item_tables`` (see :func:`history_vectors`)."""
        seq = history_vectors(history, item_table, platform_ids, history_platforms,
                              item_tables)                                    # (B, L, D)
        return self.user_tower(seq, history != 0, platform_ids, history_platforms)

    def user_vector(self, history: torch.Tensor, item_table: torch.Tensor,
                    platform_ids: torch.Tensor, history_platforms: torch.Tensor | None = None,
                    item_tables: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """User vector (B, D): the state at the last (most recent) position."""
        return self.user_states(history, item_table, platform_ids, history_platforms,
                                item_tables)[:, -1]                           # (B, D)

    # -- scores -----------------------------------------------------------------------------------

    def score(self, history: torch.Tensor, platform_ids: torch.Tensor, item_table: torch.Tensor,
              *, user: torch.Tensor | None = None,
              history_platforms: torch.Tensor | None = None,
              item_tables: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Scores (B, N+1) of left-padded histories (B, L) against a whole catalog
        ``item_table`` (N+1, D): similarity, plus the platform's repeat bias on the items of
        each history; padding column 0 is -inf. The one scoring path of validation, offline
        evaluation, the pyfunc and serving.

        ``user`` (B, D): user vectors computed elsewhere (serving runs one user-tower batch over
        histories from several platforms); ``history`` then only marks the items seen here (in
        a cross-platform history, ``history_platforms``, only this platform's items count).
        """
        if user is None:
            user = self.user_vector(history, item_table, platform_ids, history_platforms,
                                    item_tables)                              # (B, D)
        seen = seen_items(own_items(history, platform_ids, history_platforms),
                          item_table.shape[0])                                # (B, N+1)
        return mask_padding(self.score_items(user, item_table, seen, platform_ids))

    def score_items(self, user: torch.Tensor, items: torch.Tensor, seen: torch.Tensor,
                    platform_ids: torch.Tensor) -> torch.Tensor:
        """Scores (B, M) of users (B, D) against item vectors (M, D): cosine when ``normalize``
        (UniSRec; the loss divides by a temperature), else the dot product; plus the repeat
        bias where ``seen`` (B, M) is True. The training loss's logits (any candidate set)."""
        if self.normalize:
            user, items = F.normalize(user, dim=-1), F.normalize(items, dim=-1)
        scores = user @ items.T                                               # (B, M)
        if self.repeat is None:
            return scores
        bias = self.repeat(platform_ids)                                      # (B, 1)
        return scores + seen.to(bias.dtype) * bias                            # (B, M)

    def enable_repeat_bias(self) -> None:
        """Add the per-platform repeat bias (zero: scores unchanged) to a model without one,
        e.g. one pretrained before it existed. Call before building the optimizer."""
        if self.repeat is None:
            self.repeat = nn.Embedding(self.config["num_platforms"], 1,
                                       device=self.ctr_head.linear.weight.device)
            nn.init.zeros_(self.repeat.weight)
        self.config["repeat_bias"] = True

    def ctr_logit(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Click logits (B,) of (user, item) pairs."""
        return self.ctr_head(user, items)

    # -- transfer ---------------------------------------------------------------------------------

    def add_platforms(self, n: int) -> None:
        """Room for ``n`` new platforms (ids num_platforms..+n-1), initialised to the mean of the
        known ones. Existing platforms' outputs are unchanged. Call before building the
        optimizer: the grown tables are new Parameters."""
        self.item_tower.adapter.add_platforms(n)
        self.user_tower.add_platforms(n)
        if self.repeat is not None:
            self.repeat = grow_embedding(self.repeat, n)
        self.config["num_platforms"] += n
        if self.item_tower.item_id is not None:  # new platforms: no id rows until set
            self.set_item_counts(self.item_tower.item_id.counts_list + [0] * n)

    def set_item_counts(self, counts: list[int]) -> None:
        """Id embeddings for ``counts`` items per platform: created (all zero) or grown, known
        rows kept. Call before building the optimizer: the table is a new Parameter."""
        if len(counts) != self.config["num_platforms"]:
            raise ValueError(f"{len(counts)} item counts for {self.config['num_platforms']} "
                             "platforms")
        self.item_tower.set_item_counts(counts)
        self.config["item_counts"] = list(self.item_tower.item_id.counts_list)

    def resize_features(self, num_brands: int, num_categories: int) -> None:
        """Grow brand/category tables to an extended ``FeatureVocab`` (never shrinks)."""
        self.item_tower.resize_features(num_brands, num_categories)
        self.config["num_brands"] = self.item_tower.brand.num_embeddings
        self.config["num_categories"] = self.item_tower.category.num_embeddings


def mask_padding(scores: torch.Tensor) -> torch.Tensor:
    """Scores (B, N+1) over a catalog with the padding column 0 at -inf (never ranked)."""
    pad = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    pad[0] = True
    return scores.masked_fill(pad, float("-inf"))


def seen_items(history: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(B, num_rows) bool: the items of each history (B, L) (0 = padding, never marked)."""
    seen = torch.zeros(history.shape[0], num_rows, dtype=torch.bool, device=history.device)
    seen.scatter_(1, history, True)
    seen[:, 0] = False
    return seen


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (only those that train, with ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CTRHead", "ItemIdEmbedding", "ItemTower", "PlatformAdapter", "Recommender", "TextEncoder",
    "UserTower",
    "apply_lora", "count_parameters", "history_vectors", "load_text_encoder", "mask_padding",
    "merge_lora", "own_items", "seen_items",
]
