"""Negatives of the sampled softmax, and the logQ correction of their proposal distribution.

A sampled softmax scores each training position against a candidate set C instead of the whole
catalog. C always holds the batch's own label items (in-batch negatives: every other position's
next item) plus ``loss.num_negatives`` items drawn by ``loss.negatives``:

* ``popularity`` (the default): drawn by training popularity (add-one counts of the items in
  the training rows). The in-batch labels follow (about) the same distribution, so the proposal
  is ``Q(j) = p_pop(j)``.
* ``in_batch``: no extra draws, only the batch's labels (``num_negatives`` unused). The proposal
  is the label frequency, ``Q(j) = p_pop(j)``: Yi et al., 2019.
* ``in_batch_uniform``: the batch's P labels plus K items drawn uniformly from the N items of
  the catalog: mixed negative sampling (Yang et al., 2020). Tail items the batch never holds
  still appear as negatives, and drawing them is O(K), whatever the catalog size.

logQ correction (Yi et al., 2019, "Sampling-bias-corrected neural modeling for large corpus
item recommendations", RecSys; Bengio & Senecal, 2008): a candidate j's logit is
``s(u, j) - log Q(j)``, with Q the proposal of the candidates. Popular items are candidates
more often than a full softmax would weigh them as negatives; subtracting ``log Q`` makes the
sampled softmax's gradient an estimate of the full softmax's (consistent as |C| grows) instead
of one biased against popular items. For a mixed proposal (Yang et al., 2020, "Mixed negative
sampling for learning two-tower neural networks in recommendations", WWW Companion) the
proposal mixes its two parts, weighted by how many draws each contributes to a step: P in-batch
labels drawn from the label frequency, K uniform draws.

The candidates are a *set* (each item one column, however often it was drawn), so the right Q
for the two in-batch kinds is the probability that j is in the set at all, as TensorFlow's
unique candidate samplers report it (``expected_count``)::

    Q(j) = 1 - (1 - p_pop(j)) ** P * (1 - 1/N) ** K

For rare items this is ``P * p_pop(j) + K / N`` (the expected number of draws, the textbook
mixture, up to a constant factor that no softmax sees); for items drawn almost surely it
saturates at 1, so when the batch covers most of a small catalog the correction fades and the
loss tends to the full softmax's, where the count form would keep pushing popular items down
(measured on Scientific: ``bench/scale_train.py --quality``). ``popularity`` keeps its original
per-draw ``log p_pop(j)`` (the default's results do not move). The label frequency ``p_pop`` is
estimated from the training counts (add-one, so every item has Q > 0) rather than from a
streaming estimate as in Yi et al.: the training data are fixed here.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

NegativeKind = Literal["popularity", "in_batch", "in_batch_uniform"]
NEGATIVE_KINDS: tuple[str, ...] = ("popularity", "in_batch", "in_batch_uniform")


def draw_negatives(kind: str, sample_logp: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` item indices (1..N) drawn for one step, with replacement; empty for ``in_batch``.

    ``sample_logp`` (N+1,): log training popularity (normalised, -inf at padding 0).
    ``popularity`` is an O(N) multinomial draw per call (as before this option existed, so the
    default's draws are unchanged); ``in_batch_uniform`` is O(n).
    """
    device = sample_logp.device
    if kind == "popularity":
        return torch.multinomial(sample_logp.exp(), n, replacement=True)
    if kind == "in_batch":
        return torch.zeros(0, dtype=torch.long, device=device)
    if kind == "in_batch_uniform":
        return torch.randint(1, len(sample_logp), (n,), device=device)
    raise ValueError(f"loss.negatives={kind!r}: expected one of {NEGATIVE_KINDS}")


def proposal_logq(kind: str, sample_logp: torch.Tensor, items: torch.Tensor,
                  num_in_batch: int, num_sampled: int) -> torch.Tensor:
    """log Q of ``items`` (M,) under ``kind``'s proposal (see the module docstring): the
    per-draw probability for ``popularity``, the inclusion probability for the others.

    ``num_in_batch``: P, the step's label positions; ``num_sampled``: K, the items drawn by
    :func:`draw_negatives`. Padding (0) gets -inf.
    """
    logp = sample_logp[items]                                                 # (M,)
    if kind == "popularity":
        return logp
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"loss.negatives={kind!r}: expected one of {NEGATIVE_KINDS}")
    n_items = len(sample_logp) - 1
    uniform = num_sampled if kind == "in_batch_uniform" else 0
    # log P(j not in the set) = P log(1 - p_j) + K log(1 - 1/N); log Q = log(1 - that)
    log_miss = (num_in_batch * torch.log1p(-logp.exp().clamp(max=1 - 1e-7))
                + uniform * math.log1p(-1.0 / max(n_items, 2)))               # (M,)
    logq = torch.log(-torch.expm1(log_miss).clamp(max=-1e-30))
    return torch.where(items > 0, logq, torch.full_like(logq, float("-inf")))


def proposal(kind: str, sample_logp: torch.Tensor, num_in_batch: int,
             num_sampled: int) -> torch.Tensor:
    """Q over the whole catalog (N+1,), padding 0 included (zero): for tests and reports."""
    items = torch.arange(len(sample_logp), device=sample_logp.device)
    return proposal_logq(kind, sample_logp, items, num_in_batch, num_sampled).exp()
