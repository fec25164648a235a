"""Full softmax with the text encoder in the step, without encoding the whole catalog each step.

Under ``transfer.strategy=full`` / ``lora`` a full softmax needs every item's vector, and today's
path runs the trainable encoder over the whole catalog every step (forward and backward): the
step's cost grows with the catalog. With ``encoder.refresh_every_steps`` = K > 0, each platform
keeps its catalog's text vectors (N+1, H) from the encoder as a plain tensor (no gradient),
re-encoded every K training steps (under ``no_grad``, dropout off). A step then encodes only its
own items with gradient (the labels, the histories' items, the shown CTR negatives), writes them
over their cached rows, and runs the item tower over the whole table as before: the softmax is
still over every item, the items of the step are exact, and the other items' text vectors are
at most K steps old (they still get gradients through the item tower, not through the encoder).
The stale-embedding idea of cross-batch memory (Wang et al., 2020, "Cross-Batch Memory for
Embedding Learning"); K = 1 gives today's loss values exactly.

Evaluation is untouched: validation and test encode the whole catalog afresh (``item_table``).
The sampled softmax needs none of this: it reads no item outside the step's candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from recsys.model.features import token_batch
from recsys.model.recommender import Recommender


class PlatformTensors(Protocol):
    """What is read of ``recsys.training.objective.PlatformTensors`` (which imports this
    module, so it is described here rather than imported)."""

    platform_id: int
    brand_ids: torch.Tensor
    category_ids: torch.Tensor
    token_ids: Sequence[np.ndarray] | None

    @property
    def num_items(self) -> int: ...


class StaleTextVectors:
    """Per platform, the catalog's text vectors from the model's encoder, refreshed every
    ``every`` steps; :meth:`item_table` gives the full item table of a step."""

    def __init__(self, every: int, batch_size: int = 256) -> None:
        if every < 1:
            raise ValueError(f"encoder.refresh_every_steps={every}: must be >= 1 here")
        self.every = every
        self.batch_size = batch_size
        self.step = 0
        self.refreshes = 0
        self._vecs: dict[int, torch.Tensor] = {}      # platform id -> (N+1, H) fp32, no grad
        self._at: dict[int, int] = {}                 # platform id -> step of its last refresh

    def advance(self) -> None:
        """One training step done (the objective calls it once per forward in training)."""
        self.step += 1

    @torch.no_grad()
    def _encode_all(self, model: Recommender, p: PlatformTensors) -> torch.Tensor:
        enc = model.text_encoder
        device = p.brand_ids.device
        out = torch.zeros(p.num_items + 1, model.config["text_dim"], device=device)
        was_training = enc.training
        enc.eval()
        try:
            for start in range(1, p.num_items + 1, self.batch_size):
                ids = list(range(start, min(start + self.batch_size, p.num_items + 1)))
                input_ids, mask = token_batch([p.token_ids[i] for i in ids])
                out[start:start + len(ids)] = model.encode_items_text(
                    input_ids.to(device), mask.to(device)).float()
        finally:
            enc.train(was_training)
        self.refreshes += 1
        return out

    def vectors(self, model: Recommender, p: PlatformTensors) -> torch.Tensor:
        """The platform's cached text vectors (N+1, H), re-encoded if ``every`` steps old."""
        pid = p.platform_id
        if pid not in self._vecs or self.step - self._at[pid] >= self.every:
            self._vecs[pid] = self._encode_all(model, p)
            self._at[pid] = self.step
        return self._vecs[pid]

    def item_table(self, model: Recommender, p: PlatformTensors,
                   step_items: torch.Tensor) -> torch.Tensor:
        """Item table (N+1, D) of a step: ``step_items`` (any shape, 0 ignored) encoded now with
        gradient, every other item from the cache."""
        cached = self.vectors(model, p)                                        # (N+1, H)
        ids = step_items.flatten().unique()
        ids = ids[ids > 0]                                                     # (S,)
        if len(ids):
            input_ids, mask = token_batch([p.token_ids[i] for i in ids.tolist()])
            fresh = model.encode_items_text(input_ids.to(cached.device),
                                            mask.to(cached.device))            # (S, H)
            text = cached.index_copy(0, ids, fresh.to(cached.dtype))           # (N+1, H)
        else:
            text = cached
        return model.item_table(text, p.brand_ids, p.category_ids, p.platform_id)
