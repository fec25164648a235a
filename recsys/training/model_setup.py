"""Config -> model: architecture, transfer initialisation, and which parameters train.

Transfer strategies (``transfer.strategy``):

* ``full``: everything trains, the text encoder included (it runs in the step);
* ``freeze_encoder``: the encoder is frozen (its vectors come from the cache); towers train;
* ``lora``: LoRA adapters on the encoder's attention train, with the towers; the base is frozen;
* ``adapter_only``: only the per-platform parts train (MoE adapter, platform embeddings, item
  id embeddings when ``model.item_ids``); the user tower, brand/category embeddings and the
  CTR head keep their pretrained weights;
* ``user_tower``: only the per-user part trains (user tower with its platform embeddings, repeat
  bias, CTR head); the item tower keeps its pretrained weights, so item vectors are a fixed
  function of public item text. What user-level DP-SGD trains (``recsys.training.privacy``):
  each user's gradient then involves that user's rows alone.
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.model.encoder import apply_lora, load_text_encoder
from recsys.model.recommender import Recommender
from recsys.training.config import TrainJobConfig
from recsys.training.items import ItemInputs


def model_kwargs(cfg: TrainJobConfig, inputs: ItemInputs, text_dim: int,
                 num_platforms: int) -> dict[str, Any]:
    return dict(
        text_dim=text_dim, dim=cfg.model.dim, num_platforms=num_platforms,
        num_brands=inputs.vocab.num_brands, num_categories=inputs.vocab.num_categories,
        max_len=cfg.data.sequences.max_seq_len, num_layers=cfg.model.num_layers,
        num_heads=cfg.model.num_heads, dropout=cfg.model.dropout,
        num_experts=cfg.model.num_experts, repeat_bias=cfg.model.repeat_bias)


def item_counts(inputs: ItemInputs, model_platforms: list[str]) -> list[int]:
    """Catalog size per model platform (0 for platforms this run has no items of)."""
    return [len(inputs.items[p].brand_ids) - 1 if p in inputs.items else 0
            for p in model_platforms]


def build_model(cfg: TrainJobConfig, inputs: ItemInputs, init: dict[str, Any] | None,
                model_platforms: list[str]) -> Recommender:
    """Build the Recommender; ``init`` = {"config": ..., "state_dict": ...} of a pretrain export.

    The pretrained model is rebuilt with its own sizes, loaded exactly, then grown to the new
    platforms (new rows start as the mean platform) and feature vocabulary (new brand/category
    rows start at zero, like 'unknown').
    """
    encoder = None
    if cfg.finetunes_encoder:
        encoder = load_text_encoder(cfg.data.text.encoder)
        if cfg.transfer.strategy == "lora":
            lo = cfg.encoder.lora
            encoder = apply_lora(encoder, r=lo.r, alpha=lo.alpha, dropout=lo.dropout)
    text_dim = encoder.hidden_size if encoder is not None else _text_dim(inputs)
    counts = item_counts(inputs, model_platforms) if cfg.model.item_ids else None
    if init is None:
        model = Recommender(**model_kwargs(cfg, inputs, text_dim, len(model_platforms)),
                            item_counts=counts, text_encoder=encoder)
    else:
        pre = dict(init["config"])
        pre["dropout"] = cfg.model.dropout
        model = Recommender(**pre)
        model.load_state_dict(init["state_dict"])
        grow = len(model_platforms) - pre["num_platforms"]
        if grow > 0:
            model.add_platforms(grow)
        model.resize_features(inputs.vocab.num_brands, inputs.vocab.num_categories)
        if cfg.model.repeat_bias:  # a source model without one starts the target's at 0
            model.enable_repeat_bias()
        if counts is not None:  # keep the pretrained rows, add the new platforms' items
            known = model.config.get("item_counts") or [0] * len(counts)
            model.set_item_counts([max(a, b) for a, b in zip(known, counts, strict=True)])
        if cfg.transfer.shrink < 1 or cfg.transfer.perturb > 0:
            shrink_perturb(model, cfg.transfer.shrink, cfg.transfer.perturb)
        if encoder is not None:
            if encoder.hidden_size != pre["text_dim"]:
                raise ValueError(f"encoder hidden size {encoder.hidden_size} != pretrained "
                                 f"text_dim {pre['text_dim']}")
            model.text_encoder = encoder
    set_trainable(model, cfg)
    return model


@torch.no_grad()
def shrink_perturb(model: Recommender, shrink: float, perturb: float) -> None:
    """``p <- shrink * p + perturb * q`` for every tower/head parameter ``p``, where ``q`` is
    the same parameter of a freshly initialised Recommender (the text encoder is left alone).

    Called on the grown model, before the optimizer exists. Normalisation gains (ones) and
    zero-initialised tables scale like any other weight: that is the method as published.
    """
    fresh = dict(Recommender(**model.config).named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("text_encoder."):
            continue
        p.mul_(shrink).add_(fresh[name].to(p.device, p.dtype), alpha=perturb)


def _text_dim(inputs: ItemInputs) -> int:
    for items in inputs.items.values():
        if items.text_vecs is not None:
            return int(items.text_vecs.shape[1])
    raise ValueError("no text vectors prepared and no encoder to fine-tune")


def set_trainable(model: Recommender, cfg: TrainJobConfig) -> None:
    # Outside transfer the config only admits freeze_encoder and full; full puts the encoder in
    # the step (``finetunes_encoder``), so it must train there too, not run frozen.
    strategy = cfg.transfer.strategy
    for p in model.parameters():
        p.requires_grad_(True)
    if model.text_encoder is not None:
        if strategy == "lora":
            for name, p in model.text_encoder.named_parameters():
                p.requires_grad_("lora_" in name)
        elif strategy != "full":
            model.text_encoder.requires_grad_(False)
    if strategy == "user_tower":
        model.requires_grad_(False)
        for part in (model.user_tower, model.repeat, model.ctr_head):
            if part is not None:
                part.requires_grad_(True)
    if strategy == "adapter_only":
        model.requires_grad_(False)
        model.item_tower.adapter.requires_grad_(True)
        if model.repeat is not None:  # one score per platform
            model.repeat.requires_grad_(True)
        if model.item_tower.item_id is not None:  # per-item, hence per-platform
            model.item_tower.item_id.requires_grad_(True)
        for name, p in model.user_tower.named_parameters():
            if "platform" in name:
                p.requires_grad_(True)


def trainable_summary(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": train}
