"""The training wrapper's losses on tiny tensors: finite, positive, gradients where they belong,
positions counted right, and both softmax variants able to overfit a fixed batch; plus the
fine-tuning path where the text encoder (full or LoRA) runs inside the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from recsys.model.encoder import TextEncoder, apply_lora
from recsys.model.recommender import Recommender
from recsys.training.config import LossConfig
from recsys.training.items import PlatformItems
from recsys.training.objective import PlatformTensors, RecommenderObjective

H = D = 16  # text width, model width
SIZES = {0: 30, 1: 20}  # platform id -> catalog size N
BRANDS, CATEGORIES, DEPTH, MAX_LEN = 6, 8, 3, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dropout: float = 0.1, encoder: TextEncoder | None = None) -> Recommender:
    torch.manual_seed(0)
    return Recommender(text_dim=H, dim=D, num_platforms=2, num_brands=BRANDS,
                       num_categories=CATEGORIES, max_len=MAX_LEN, num_layers=1, num_heads=2,
                       dropout=dropout, num_experts=2, text_encoder=encoder)


def tiny_bert_encoder() -> TextEncoder:
    """A 1-layer BERT of width H built from a config: no download."""
    torch.manual_seed(0)
    return TextEncoder(BertModel(BertConfig(hidden_size=H, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=24,
                                            vocab_size=50, max_position_embeddings=16)))


def platform_items(pid: int, *, tokens: bool = False) -> PlatformItems:
    """Random catalog of platform ``pid``: cached text vectors, or token ids to fine-tune on."""
    rng = np.random.default_rng(pid)
    n = SIZES[pid]
    brands = rng.integers(0, BRANDS, n + 1)
    cats = rng.integers(0, CATEGORIES, (n + 1, DEPTH))
    brands[0], cats[0] = 0, 0
    vecs = rng.normal(size=(n + 1, H)).astype(np.float32)
    vecs[0] = 0.0
    toks = [np.zeros(0, np.int32)] + [rng.integers(1, 50, rng.integers(2, 6)).astype(np.int32)
                                      for _ in range(n)]
    return PlatformItems(name=f"shop{pid}", platform_id=pid, brand_ids=brands,
                         category_ids=cats, text_vecs=None if tokens else vecs,
                         token_ids=toks if tokens else None,
                         popularity=rng.integers(0, 5, n + 1).astype(np.float64))


def platforms(tokens: bool = False) -> dict[int, PlatformTensors]:
    return {pid: PlatformTensors.from_items(platform_items(pid, tokens=tokens),
                                            torch.device("cpu")) for pid in SIZES}


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded histories of both platforms, interleaved: (history (6, 5), target, platform)."""
    history = torch.tensor([[0, 0, 3, 7, 29],
                            [0, 0, 0, 5, 2],
                            [1, 2, 3, 4, 30],
                            [0, 0, 0, 0, 17],
                            [0, 8, 9, 10, 11],
                            [0, 0, 0, 20, 1]])
    target = torch.tensor([12, 19, 6, 4, 13, 3])
    platform = torch.tensor([0, 1, 0, 1, 0, 1])
    return history, target, platform


def objective(kind: str = "full_softmax", model: Recommender | None = None,
              tokens: bool = False, **loss: float | bool) -> RecommenderObjective:
    cfg = LossConfig(kind=kind, num_negatives=8, **loss)
    return RecommenderObjective(model or tiny_model(), cfg, platforms(tokens))


def grad_names(module: nn.Module) -> set[str]:
    """Parameters that received a non-zero gradient."""
    return {n for n, p in module.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def assert_finite_grads(module: nn.Module) -> None:
    bad = [n for n, p in module.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


# -- full softmax ---------------------------------------------------------------------------------


def test_full_softmax_loss_is_finite_and_trains_every_part() -> None:
    obj = objective()
    loss, stats = obj(*batch())
    assert torch.isfinite(loss) and loss.item() > 0
    assert stats["loss"] == pytest.approx(stats["rec_loss"] + 0.1 * stats["ctr_loss"], rel=1e-5)
    loss.backward()
    assert_finite_grads(obj)
    names = {n for n, _ in obj.model.named_parameters()}
    for part in ("item_tower.", "user_tower.", "ctr_head."):
        missing = {n for n in names if n.startswith(part)} - grad_names(obj.model)
        # Every tensor of each part learns (padding rows of the brand/category tables aside).
        assert not missing, f"{part} parameters without gradient: {sorted(missing)}"


def test_positions_count_the_non_padding_history_items() -> None:
    history, target, platform = batch()
    for kind in ("full_softmax", "sampled_softmax"):
        _, stats = objective(kind)(history, target, platform)
        assert stats["positions"] == int((history > 0).sum()) == 17


def test_row_zero_of_an_item_table_is_zero() -> None:
    model = tiny_model()
    for p in platforms().values():
        table = p.item_table(model)
        assert table.shape == (p.num_items + 1, D)
        assert torch.equal(table[0], torch.zeros(D))
        assert table[1:].abs().sum(-1).gt(0).all()


def test_item_table_of_ids_are_rows_of_the_full_table() -> None:
    model = tiny_model().eval()  # eval: dropout would make two calls differ
    for p in platforms().values():
        ids = torch.tensor([0, 5, 1, p.num_items, 5])
        torch.testing.assert_close(p.item_table(model, ids), p.item_table(model)[ids])


def test_ctr_weight_zero_leaves_the_ctr_head_out() -> None:
    for kind in ("full_softmax", "sampled_softmax"):
        obj = objective(kind, ctr_weight=0.0)
        loss, stats = obj(*batch())
        loss.backward()
        assert stats["ctr_loss"] == 0.0 and stats["loss"] == pytest.approx(stats["rec_loss"])
        assert all(p.grad is None for p in obj.model.ctr_head.parameters())
        assert "user_tower.platform.weight" in grad_names(obj.model)


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax"])
def test_a_bf16_model_takes_the_fp32_vector_cache(kind: str) -> None:
    """DeepSpeed with bf16 casts the module's parameters, not the cached text vectors (plain
    tensors beside the module): the step must still run."""
    torch.manual_seed(0)
    obj = objective(kind).bfloat16()
    assert obj.platforms[0].text_vecs.dtype == torch.float32
    loss, stats = obj(*batch())
    assert torch.isfinite(loss) and stats["positions"] == 17
    loss.backward()
    assert_finite_grads(obj)
    assert obj.model.item_tower.adapter.weight.grad.dtype == torch.bfloat16


# -- sampled softmax ------------------------------------------------------------------------------


@pytest.mark.parametrize("logq", [True, False])
def test_sampled_softmax_loss_and_gradients(logq: bool) -> None:
    torch.manual_seed(1)
    obj = objective("sampled_softmax", logq_correction=logq)
    loss, stats = obj(*batch())
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert_finite_grads(obj)
    got = grad_names(obj.model)
    for part in ("item_tower.adapter.", "user_tower.", "ctr_head."):
        assert any(n.startswith(part) for n in got), part


def test_logq_correction_changes_the_loss() -> None:
    """Same seed, same negatives: only the correction differs (and it must do something)."""
    losses = []
    for logq in (True, False):
        torch.manual_seed(3)
        losses.append(objective("sampled_softmax", logq_correction=logq,
                                ctr_weight=0.0)(*batch())[0].item())
    assert losses[0] != pytest.approx(losses[1])


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax"])
def test_a_fixed_batch_can_be_overfit(kind: str) -> None:
    torch.manual_seed(0)
    obj = objective(kind, model=tiny_model(dropout=0.0), temperature=0.1)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    data = batch()
    losses = []
    for _ in range(30):
        loss, _ = obj(*data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:3]), losses


# -- fine-tuning the text encoder in the step -----------------------------------------------------


def test_fine_tuning_the_whole_encoder_gives_it_gradients() -> None:
    torch.manual_seed(2)
    obj = objective("sampled_softmax", model=tiny_model(encoder=tiny_bert_encoder()), tokens=True)
    loss, _ = obj(*batch())
    assert torch.isfinite(loss)
    loss.backward()
    assert_finite_grads(obj)
    enc = {n for n, _ in obj.model.text_encoder.named_parameters()}
    # token_type_embeddings: only type 0 is used, its row gets a gradient.
    assert enc - grad_names(obj.model.text_encoder) == set()


def test_lora_fine_tuning_only_moves_the_lora_weights() -> None:
    torch.manual_seed(2)
    enc = apply_lora(tiny_bert_encoder(), r=2, alpha=4, dropout=0.0)
    obj = objective("sampled_softmax", model=tiny_model(encoder=enc), tokens=True)
    loss, _ = obj(*batch())
    loss.backward()
    assert_finite_grads(obj)
    with_grad = {n for n, p in obj.model.text_encoder.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert with_grad == {n for n, p in obj.model.text_encoder.named_parameters()
                         if "lora_" in n}
    assert any(n.startswith("item_tower.") for n in grad_names(obj.model))


def test_full_softmax_with_the_encoder_in_the_step_stays_finite() -> None:
    """The whole catalog is encoded, padding row 0 (no tokens) included: its pooled vector must
    not poison the gradients even though the row is masked to zero afterwards."""
    obj = objective("full_softmax", model=tiny_model(encoder=tiny_bert_encoder()), tokens=True)
    loss, _ = obj(*batch())
    assert torch.isfinite(loss)
    loss.backward()
    assert_finite_grads(obj)
    assert "item_tower.adapter.weight" in grad_names(obj.model)


class NanOnEmptyRows(TextEncoder):
    """The tiny BERT, but a row without tokens comes out NaN, as from CUDA's fused attention
    kernels (CPU attention gives a finite vector for it)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids, attention_mask)
        empty = attention_mask.sum(dim=1) == 0
        return torch.where(empty[:, None], torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax"])
def test_the_padding_row_never_goes_through_the_encoder(kind: str) -> None:
    """On an H200 in bf16 the padding row's NaN gradients made ZeRO skip every step of a
    ``full`` / ``lora`` transfer; here the catalog (padding row included) stays finite."""
    enc = tiny_bert_encoder()
    obj = objective(kind, model=tiny_model(encoder=NanOnEmptyRows(enc.model)), tokens=True)
    loss, _ = obj(*batch())
    assert torch.isfinite(loss)
    loss.backward()
    assert_finite_grads(obj)
    table = obj.platforms[0].item_table(obj.model)
    assert torch.isfinite(table).all() and not table[0].any()


def test_prefix_items_pairs_each_position_with_the_items_seen_by_then() -> None:
    from recsys.training.objective import prefix_items

    history, _, _ = batch()
    valid = history > 0
    rows, items = prefix_items(history, valid)
    want = []  # brute force, in the loss's row order (history[valid], row-major)
    r = 0
    for b in range(history.shape[0]):
        for t in range(history.shape[1]):
            if valid[b, t]:
                want += [(r, int(i)) for i in history[b, :t + 1] if i > 0]
                r += 1
    assert sorted(zip(rows.tolist(), items.tolist(), strict=True)) == sorted(want)
    assert int(rows.max()) == int(valid.sum()) - 1


@pytest.mark.parametrize("kind", ["full_softmax", "sampled_softmax"])
def test_repeat_bias_starts_neutral_and_learns_per_platform(kind: str) -> None:
    """A zero bias leaves the loss as without one; trained on data where the next item is
    always one just seen, the bias of that platform rises (and only that platform's)."""
    plain = objective(kind, model=tiny_model(dropout=0.0))
    with_bias = tiny_model(dropout=0.0)
    with_bias.enable_repeat_bias()
    biased = objective(kind, model=with_bias)
    history, target, platform = batch()
    torch.manual_seed(1)
    a, _ = plain(history, target, platform)
    torch.manual_seed(1)
    b, _ = biased(history, target, platform)
    assert torch.allclose(a, b)
    # On platform 0 people take the same item again and again: every next item was seen.
    hist0 = torch.tensor([[0, 3, 3, 3, 3], [0, 0, 7, 7, 7], [5, 5, 5, 5, 5]])
    target0, platform0 = torch.tensor([3, 7, 5]), torch.zeros(3, dtype=torch.long)
    opt = torch.optim.Adam([with_bias.repeat.weight], lr=0.05)
    for _ in range(30):
        loss, _ = biased(hist0, target0, platform0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bias = with_bias.repeat.weight.detach().squeeze(-1)
    assert bias[0] > 0.3 and bias[1] == 0.0
