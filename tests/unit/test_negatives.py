"""Sampled-softmax negatives: the proposals and their logQ values, candidate-only encoding (the
text encoder sees the step's items and nothing else of the catalog, with the same loss and
gradients as encoding the whole catalog), and a tiny run with each sampler learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.model.history import own_items
from recsys.model.recommender import Recommender
from recsys.training import objective as objective_module
from recsys.training.config import LossConfig
from recsys.training.negatives import draw_negatives, proposal, proposal_logq
from recsys.training.objective import RecommenderObjective, prefix_items
from tests.unit.test_objective import (
    batch,
    platforms,
    tiny_bert_encoder,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["popularity", "in_batch", "in_batch_uniform"]


def sample_logp(counts: list[float]) -> torch.Tensor:
    """As ``PlatformTensors.from_items``: add-one counts, normalised, -inf at padding 0."""
    pop = np.asarray(counts, np.float64) + 1.0
    pop[0] = 0.0
    logp = np.log(np.where(pop > 0, pop / pop.sum(), 1.0))
    logp[0] = -np.inf
    return torch.as_tensor(logp, dtype=torch.float32)


COUNTS = [0, 9, 0, 3, 1, 0, 50]  # item 0 is padding


def test_the_popularity_proposal_is_a_distribution_over_the_catalog() -> None:
    logp = sample_logp(COUNTS)
    q = proposal("popularity", logp, num_in_batch=12, num_sampled=5)
    assert q[0] == 0 and (q[1:] > 0).all()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6)
    items = torch.tensor([0, 1, 6])
    torch.testing.assert_close(proposal_logq("popularity", logp, items, 12, 5), logp[items])


@pytest.mark.parametrize("kind", ["in_batch", "in_batch_uniform"])
def test_in_batch_proposals_are_inclusion_probabilities(kind: str) -> None:
    """Q(j) = P(j in the candidate set): in (0, 1], summing to the expected set size."""
    logp = sample_logp(COUNTS)
    P, K, N = 12, 5, 6
    p_pop = (np.asarray(COUNTS[1:]) + 1) / (sum(COUNTS) + N)
    k = K if kind == "in_batch_uniform" else 0
    want = 1 - (1 - p_pop) ** P * (1 - 1 / N) ** k
    q = proposal(kind, logp, P, K)
    assert q[0] == 0
    np.testing.assert_allclose(q[1:].numpy(), want, rtol=1e-5)
    assert (q[1:] <= 1).all() and float(q.sum()) == pytest.approx(want.sum(), rel=1e-5)
    got = proposal_logq(kind, logp, torch.tensor([0, 1, 6]), P, K)
    assert got[0] == -math.inf


def test_the_mixed_proposal_is_the_draw_mixture_for_rare_items_and_saturates() -> None:
    """Few draws: proportional to ``P p_pop(j) + K / N`` (Yang et al.'s mixture; a constant
    factor is invisible to the softmax); many draws: every item ~surely in, Q -> 1."""
    n = 10_000
    logp = sample_logp([0] + list(range(1, n + 1)))
    p_pop = logp[1:].exp().double().numpy()
    P, K = 3, 2
    q = proposal("in_batch_uniform", logp, P, K)[1:].double().numpy()
    mix = P * p_pop + K / n
    np.testing.assert_allclose(q / q.sum(), mix / mix.sum(), rtol=2e-3)
    sure = proposal("in_batch_uniform", logp, 10**7, 10**7)[1:]
    torch.testing.assert_close(sure, torch.ones_like(sure))
    # no labels: uniform draws only, the same for every item
    uni = proposal_logq("in_batch_uniform", logp, torch.tensor([1, 5000, n]), 0, K)
    np.testing.assert_allclose(uni.exp().numpy(), 1 - (1 - 1 / n) ** K, rtol=1e-4)


def test_draws_are_catalog_items_never_padding() -> None:
    torch.manual_seed(0)
    logp = sample_logp([0] + [1] * 9 + [1000])
    uni = draw_negatives("in_batch_uniform", logp, 4000)
    assert uni.min() >= 1 and uni.max() <= 10
    assert len(uni.unique()) == 10 and (uni == 10).float().mean() < 0.2  # not by popularity
    pop = draw_negatives("popularity", logp, 4000)
    assert pop.min() >= 1 and (pop == 10).float().mean() > 0.9
    assert len(draw_negatives("in_batch", logp, 4000)) == 0
    with pytest.raises(ValueError, match="loss.negatives"):
        draw_negatives("hard", logp, 4)


class CountingEncoder(torch.nn.Module):
    """Wraps a text encoder, counting the rows it encodes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.hidden_size = inner.hidden_size
        self.rows = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.rows += input_ids.shape[0]
        return self.inner(input_ids, attention_mask)


def reference_loss(obj: RecommenderObjective, negs: torch.Tensor, history: torch.Tensor,
                   target: torch.Tensor, platform: torch.Tensor) -> torch.Tensor:
    """The sampled softmax computed on whole-catalog item tables (every item encoded), with the
    given negatives: what candidate-only encoding must reproduce."""
    model, cfg = obj.model, obj.cfg
    labels = torch.cat([history[:, 1:], target[:, None]], dim=1)
    total, n = torch.zeros(()), 0
    for pid in platform.unique().tolist():
        rows = platform == pid
        p = obj.platforms[pid]
        hist, lab = history[rows], labels[rows]
        valid = hist > 0
        table = p.item_table(model)  # (N+1, D): the whole catalog through the encoder
        u = model.user_states(hist, table, platform[rows])[valid]
        y = lab[valid]
        cand = torch.cat([y, negs]).unique()
        seen = torch.zeros(len(y), len(cand), dtype=torch.bool)
        r, items = prefix_items(own_items(hist, platform[rows], None), valid)
        for row, item in zip(r.tolist(), items.tolist(), strict=True):
            hit = (cand == item).nonzero()
            if len(hit):
                seen[row, int(hit)] = True
        logits = model.score_items(u, table[cand], seen, platform[rows][:1].expand(len(y)))
        logits = logits / cfg.temperature - proposal_logq(cfg.negatives, p.sample_logp, cand,
                                                          len(y), len(negs))
        total = total + F.cross_entropy(logits, torch.searchsorted(cand, y), reduction="sum")
        n += len(y)
    return total / n


@pytest.mark.parametrize("negatives", ["popularity", "in_batch_uniform"])
def test_candidate_only_encoding_matches_encoding_the_whole_catalog(
        negatives: str, monkeypatch: pytest.MonkeyPatch) -> None:
    negs = torch.tensor([5, 14, 14, 2])
    monkeypatch.setattr(objective_module, "draw_negatives", lambda kind, logp, n: negs)

    def build() -> RecommenderObjective:
        enc = CountingEncoder(tiny_bert_encoder())
        torch.manual_seed(0)
        model = Recommender(text_dim=16, dim=16, num_platforms=2, num_brands=6,
                            num_categories=8, max_len=8, num_layers=1, num_heads=2,
                            dropout=0.0, num_experts=2, text_encoder=enc)
        model.enable_repeat_bias()
        with torch.no_grad():
            model.repeat.weight.fill_(0.5)  # the seen mask must land on the same candidates
        cfg = LossConfig(kind="sampled_softmax", negatives=negatives, num_negatives=4,
                         ctr_weight=0.0)
        # eval: the BERT's own dropout would make the two encodings differ
        return RecommenderObjective(model, cfg, platforms(tokens=True)).eval()

    history, target, platform = batch()
    ours, ref = build(), build()
    loss, _ = ours(history, target, platform)
    want = reference_loss(ref, negs, history, target, platform)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    want.backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The encoder saw each of the step's items once: nothing else of the 30 + 20 items.
    step_items = 0
    labels = torch.cat([history[:, 1:], target[:, None]], dim=1)
    for pid in (0, 1):
        rows = platform == pid
        step_items += len(torch.cat([labels[rows][history[rows] > 0], negs,
                                     history[rows][history[rows] > 0]]).unique())
    assert ours.model.text_encoder.rows == step_items < 50
    assert ref.model.text_encoder.rows == 50


@pytest.mark.parametrize("negatives", KINDS)
def test_a_tiny_sampled_softmax_run_learns_with_each_sampler(negatives: str) -> None:
    torch.manual_seed(0)
    cfg = LossConfig(kind="sampled_softmax", negatives=negatives, num_negatives=8,
                     temperature=0.1)
    obj = RecommenderObjective(tiny_model(dropout=0.0), cfg, platforms())
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    data = batch()
    losses = []
    for _ in range(30):
        loss, stats = obj(*data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert stats["positions"] == 17 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
