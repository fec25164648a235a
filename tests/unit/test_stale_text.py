"""Full softmax with the encoder in the step and a stale catalog (``encoder.refresh_every_steps``):
the same loss as encoding every item when fresh, the encoder runs over the step's items only
between refreshes, and the cached rows move only on a refresh."""

from __future__ import annotations

import pytest
import torch

from recsys.model.recommender import Recommender
from recsys.training.config import EncoderConfig, LossConfig
from recsys.training.objective import RecommenderObjective
from tests.unit.test_negatives import CountingEncoder
from tests.unit.test_objective import assert_finite_grads, batch, platforms, tiny_bert_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def build(refresh_every: int) -> RecommenderObjective:
    enc = CountingEncoder(tiny_bert_encoder())
    torch.manual_seed(0)
    model = Recommender(text_dim=16, dim=16, num_platforms=2, num_brands=6, num_categories=8,
                        max_len=8, num_layers=1, num_heads=2, dropout=0.0, num_experts=2,
                        text_encoder=enc)
    return RecommenderObjective(model, LossConfig(kind="full_softmax"), platforms(tokens=True),
                                refresh_every=refresh_every)


def test_the_config_default_encodes_the_whole_catalog_every_step() -> None:
    assert EncoderConfig().refresh_every_steps == 0
    assert build(0).stale is None


def test_a_fresh_cache_gives_the_loss_of_encoding_every_item() -> None:
    """Dropout off (eval): cached rows equal what the encoder gives now."""
    data = batch()
    want, _ = build(0).eval()(*data)
    torch.manual_seed(0)
    got, _ = build(1).eval()(*data)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_between_refreshes_only_the_steps_items_are_encoded() -> None:
    obj = build(3).train()
    enc = obj.model.text_encoder
    history, target, platform = batch()
    per_step = []
    for _ in range(4):
        before = enc.rows
        loss, _ = obj(history, target, platform)
        loss.backward()
        per_step.append(enc.rows - before)
    assert_finite_grads(obj)
    assert enc.inner.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    labels = torch.cat([history[:, 1:], target[:, None]], dim=1)
    step_items = sum(len(torch.cat([labels[platform == q][history[platform == q] > 0],
                                    history[platform == q].flatten()]).unique().nonzero())
                     for q in (0, 1))
    catalog = 30 + 20
    assert per_step == [catalog + step_items, step_items, step_items, catalog + step_items]
    assert obj.stale.refreshes == 4  # two platforms, refreshed at steps 0 and 3


def test_cached_rows_move_only_on_a_refresh() -> None:
    obj = build(2).train()
    p = obj.platforms[0]
    old = obj.stale.vectors(obj.model, p).clone()
    with torch.no_grad():
        for w in obj.model.text_encoder.parameters():
            w.add_(0.05)
    torch.testing.assert_close(obj.stale.vectors(obj.model, p), old)  # not due yet
    obj.stale.advance()
    obj.stale.advance()
    new = obj.stale.vectors(obj.model, p)
    assert not torch.allclose(new[1:], old[1:]) and not new[0].any()
