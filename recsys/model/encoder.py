"""The text encoder of the item tower: a Hugging Face ``AutoModel`` with mean pooling, and the LoRA
helpers that fine-tune it. Kept apart from ``recommender.py`` because only the fine-tuning modes
(``full``, ``lora``), the encoder cache and search run it; the recommender takes an instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
        """Width H of the text vectors (the recommender's ``text_dim``)."""
        return self._hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text vectors (N, H) of token ids (N, T); ``attention_mask`` (N, T) is 1 on tokens."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)              # (N, T, 1)
        summed = (hidden * mask).sum(dim=1)                               # (N, H)
        return summed / mask.sum(dim=1).clamp(min=1e-9)                   # (N, H)


def load_text_encoder(path_or_name: str) -> TextEncoder:
    """Load a pretrained encoder; ``bundled:all-MiniLM-L6-v2`` resolves to the packaged copy."""
    from transformers import AutoModel

    # Imported here, not at the top: keeps the model package free of the data layer at import.
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


__all__ = ["TextEncoder", "apply_lora", "load_text_encoder", "merge_lora"]
