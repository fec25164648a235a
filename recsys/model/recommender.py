"""The recommender, end to end in one file: text -> item vectors -> user states -> scores.

Text-based and transferable (UniSRec-style): an item is its text (title, brand, category) through a
pretrained encoder, not a per-platform ID, so a model pretrained on many shops scores the items
of a new shop without having seen them.

    TextEncoder       token ids (N, T)          -> text vectors (N, H)   (frozen + cached, or LoRA)
    ItemTower         text (N, H) + brand + cat -> item vectors (N, D)   (PlatformAdapter inside)
                      [+ item id]                                        (optional, transductive)
    UserTower         history item vectors      -> user states (B, L, D) (causal, SASRec-style)
    score_all         user (B, D) . items       -> (B, N+1) full-catalog scores (retrieval)
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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# -------------------------------------------------------------------------------------------------
# Text encoder


class TextEncoder(nn.Module):
    """A Hugging Face encoder (``AutoModel``) with masked mean pooling.

    Mean over the non-padding tokens, as sentence-transformers pools all-MiniLM-L6-v2 (its final
    L2 normalisation is left out: the PlatformAdapter centres and projects the vectors anyway).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # The pooler (dense on [CLS]) is unused by mean pooling; drop it so that every parameter
        # gets a gradient when fine-tuning (DDP and ZeRO complain about unused parameters).
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.model = model
        self._hidden_size = int(model.config.hidden_size)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)              # (N, T, 1)
        summed = (hidden * mask).sum(dim=1)                               # (N, H)
        return summed / mask.sum(dim=1).clamp(min=1e-9)                   # (N, H)


def load_text_encoder(path_or_name: str) -> TextEncoder:
    """Load a pretrained encoder; ``bundled:all-MiniLM-L6-v2`` resolves to the packaged copy."""
    from transformers import AutoModel

    # Imported here, not at the top: keeps this file free of the config layer at import time.
    from recsys.data.catalog import resolve_encoder_path

    return TextEncoder(AutoModel.from_pretrained(resolve_encoder_path(path_or_name)))


def apply_lora(
    encoder: TextEncoder,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] = ("query", "value"),
) -> TextEncoder:
    """Wrap the encoder's attention projections with LoRA (peft); everything else is frozen.

    Fine-tunes the text side with ~0.1% of its weights, so it fits beside the recommender in
    memory and cannot drift far from the pretrained encoder. Modifies ``encoder`` in place.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), bias="none")
    encoder.model = get_peft_model(encoder.model, config)  # freezes the base weights
    return encoder


def merge_lora(encoder: TextEncoder) -> TextEncoder:
    """Fold the LoRA weights into the base model, so that serving needs neither peft nor the
    adapter's extra matmuls. Modifies ``encoder`` in place."""
    encoder.model = encoder.model.merge_and_unload()
    return encoder


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
        self.platform_gate = _grow_embedding(self.platform_gate, n)


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
        self.brand = _grow_embedding(self.brand, num_brands - self.brand.num_embeddings,
                                     init="zeros")
        self.category = _grow_embedding(self.category,
                                        num_categories - self.category.num_embeddings,
                                        init="zeros")


# -------------------------------------------------------------------------------------------------
# User side


class UserTower(nn.Module):
    """SASRec: a causal Transformer over the item vectors of a user's history.

    Positions count back from the most recent item (the last column always has position
    ``max_len - 1``), so left padding never shifts a real item's position: a history gives the
    same states however much padding its batch needs.
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

    def forward(self, seq: torch.Tensor, valid: torch.Tensor,
                platform_ids: torch.Tensor) -> torch.Tensor:
        B, L, D = seq.shape
        if L > self.max_len:
            raise ValueError(f"history length {L} > max_len {self.max_len}: cut histories to "
                             "the most recent max_len items")
        pos = torch.arange(self.max_len - L, self.max_len, device=seq.device)   # (L,)
        x = seq + self.position(pos) + self.platform(platform_ids).unsqueeze(1)  # (B, L, D)
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
        self.platform = _grow_embedding(self.platform, n)


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

    def item_table(self, text_vecs: torch.Tensor, brand_ids: torch.Tensor,
                   category_ids: torch.Tensor, platform_id: int) -> torch.Tensor:
        """Vectors of a whole catalog (N+1, D) for one platform; row 0 (padding) is zero.

        Inputs are indexed by item index, row 0 included (its values are ignored).
        """
        n = text_vecs.shape[0] - 1
        platform_ids = torch.full((n,), platform_id, dtype=torch.long, device=text_vecs.device)
        item_ids = torch.arange(1, n + 1, device=text_vecs.device)
        items = self.item_tower(text_vecs[1:], brand_ids[1:], category_ids[1:],
                                platform_ids, item_ids)                       # (N, D)
        return torch.cat([items.new_zeros(1, items.shape[1]), items], dim=0)  # (N+1, D)

    # -- users ------------------------------------------------------------------------------------

    def user_states(self, history: torch.Tensor, item_table: torch.Tensor,
                    platform_ids: torch.Tensor) -> torch.Tensor:
        """States (B, L, D) of left-padded histories (B, L); state t summarises items <= t."""
        seq = F.embedding(history, item_table)                               # (B, L, D)
        return self.user_tower(seq, history != 0, platform_ids)              # (B, L, D)

    def user_vector(self, history: torch.Tensor, item_table: torch.Tensor,
                    platform_ids: torch.Tensor) -> torch.Tensor:
        """User vector (B, D): the state at the last (most recent) position."""
        return self.user_states(history, item_table, platform_ids)[:, -1]   # (B, D)

    # -- scores -----------------------------------------------------------------------------------

    def score_candidates(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores (B, M) of users (B, D) against any item vectors (M, D): cosine when
        ``normalize`` (UniSRec; the loss divides by a temperature), else the dot product."""
        if self.normalize:
            user, items = F.normalize(user, dim=-1), F.normalize(items, dim=-1)
        return user @ items.T                                                 # (B, M)

    def score_all(self, user: torch.Tensor, item_table: torch.Tensor,
                  seen: torch.Tensor | None = None,
                  platform_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, N+1) against the whole catalog; padding column 0 is -inf. ``seen``
        (B, N+1) bool, with ``platform_ids`` (B,): items already in each user's history
        (:func:`seen_items`), which get the platform's repeat bias."""
        scores = self.score_candidates(user, item_table)                      # (B, N+1)
        if seen is not None and platform_ids is not None:
            scores = scores + self.repeat_scores(seen, platform_ids)
        pad = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        pad[0] = True
        return scores.masked_fill(pad, float("-inf"))

    def repeat_scores(self, seen: torch.Tensor, platform_ids: torch.Tensor) -> torch.Tensor:
        """What the repeat bias adds to scores (B, M): the platform's bias where ``seen``
        (B, M) is True, else 0 (also everywhere for a model without a repeat bias)."""
        if self.repeat is None:
            return torch.zeros(seen.shape, dtype=self.ctr_head.linear.weight.dtype,
                               device=seen.device)
        bias = self.repeat(platform_ids)                                      # (B, 1)
        return seen.to(bias.dtype) * bias                                     # (B, M)

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
            self.repeat = _grow_embedding(self.repeat, n)
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


def _grow_embedding(emb: nn.Embedding, n: int, init: str = "mean") -> nn.Embedding:
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


def seen_items(history: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(B, num_rows) bool: the items of each history (B, L) (0 = padding, never marked)."""
    seen = torch.zeros(history.shape[0], num_rows, dtype=torch.bool, device=history.device)
    seen.scatter_(1, history, True)
    seen[:, 0] = False
    return seen


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CTRHead", "ItemIdEmbedding", "ItemTower", "PlatformAdapter", "Recommender", "TextEncoder",
    "UserTower",
    "apply_lora", "count_parameters", "load_text_encoder", "merge_lora", "seen_items",
]
