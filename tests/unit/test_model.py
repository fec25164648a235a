"""The recommender's components on tiny configs (BertModelTester-style): shapes, gradients,
causality, padding invariance, transfer to new platforms, and checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from recsys.model.encoder import TextEncoder, apply_lora, merge_lora
from recsys.model.recommender import (
    CTRHead,
    ItemTower,
    PlatformAdapter,
    Recommender,
    UserTower,
    count_parameters,
    seen_items,
)
from recsys.model.tables import ItemIdEmbedding

H, D, P, N, C, L = 32, 16, 2, 9, 3, 6  # text width, model width, platforms, items, depth, len
ARGS = dict(text_dim=H, dim=D, num_platforms=P, num_brands=5, num_categories=7, max_len=L,
            num_layers=2, num_heads=2, dropout=0.1, num_experts=3)


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=37, vocab_size=100))


def model(**kw: object) -> Recommender:
    torch.manual_seed(0)
    return Recommender(**{**ARGS, **kw})


def catalog() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text vectors (N+1, H), brand ids (N+1,), category ids (N+1, C); row 0 = padding."""
    g = torch.Generator().manual_seed(1)
    text = torch.randn(N + 1, H, generator=g)
    brands = torch.randint(0, 5, (N + 1,), generator=g)
    cats = torch.randint(0, 7, (N + 1, C), generator=g)
    brands[0], cats[0] = 0, 0
    return text, brands, cats


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])  # vocab 100
    return ids, (ids != 0).long()


# -- text encoder ---------------------------------------------------------------------------------


def test_text_encoder_mean_pools_real_tokens_only() -> None:
    enc = TextEncoder(tiny_bert()).eval()
    ids, mask = tokens()
    out = enc(ids, mask)
    assert out.shape == (2, H) and enc.hidden_size == H
    assert enc.model.pooler is None  # unused by mean pooling: dropped
    # More right padding does not change the pooled vector.
    ids2 = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(enc(ids2, (ids2 != 0).long()), out, atol=1e-5, rtol=1e-5)


def test_lora_trains_only_lora_weights() -> None:
    enc = apply_lora(TextEncoder(tiny_bert()), r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids, mask = tokens()
    enc(ids, mask).pow(2).sum().backward()
    for n, p in enc.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    # Merged back into a plain BertModel: same outputs, no peft left.
    enc.eval()
    before = enc(ids, mask)
    merge_lora(enc)
    assert isinstance(enc.model, BertModel)
    torch.testing.assert_close(enc(ids, mask), before, atol=1e-5, rtol=1e-5)


def test_end_to_end_gradients_frozen_vs_lora_encoder() -> None:
    ids, mask = tokens()
    brands, cats = torch.tensor([0, 1, 2]), torch.tensor([[0, 0, 0], [1, 2, 0], [3, 0, 0]])
    for mode in ("frozen", "lora"):
        enc = TextEncoder(tiny_bert())
        if mode == "frozen":
            enc.requires_grad_(False)
        else:
            apply_lora(enc, r=2, alpha=4, dropout=0.0)
        m = model(text_encoder=enc)
        text = torch.cat([torch.zeros(1, H), m.encode_items_text(ids, mask)])   # (3, H)
        table = m.item_table(text, brands, cats, platform_id=1)
        history, pid = torch.tensor([[0, 1, 2], [2, 1, 2]]), torch.tensor([0, 1])
        user = m.user_vector(history, table, pid)
        scores = m.score(history, pid, table, user=user)
        loss = scores[:, 1:].sum() + m.ctr_logit(user, table[[1, 2]]).sum()
        loss.backward()
        for n, p in m.named_parameters():
            if n.startswith("text_encoder."):
                assert (p.grad is not None) == (mode == "lora" and "lora_" in n), (mode, n)
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, (mode, n)


def test_recommender_without_encoder_refuses_text() -> None:
    with pytest.raises(RuntimeError, match="frozen-cache"):
        model().encode_items_text(*tokens())


# -- item side ------------------------------------------------------------------------------------


def test_platform_adapter_mixes_experts_per_platform() -> None:
    torch.manual_seed(0)
    ad = PlatformAdapter(H, D, num_experts=3, num_platforms=P, dropout=0.0)
    x, pid = torch.randn(4, H), torch.tensor([0, 1, 0, 1])
    assert ad(x, pid).shape == (4, D)
    with torch.no_grad():
        ad.platform_gate.weight[1] = torch.tensor([5.0, 0.0, -5.0])
        ad.gate.weight.normal_()
    g = ad.gates(x, pid)
    torch.testing.assert_close(g.sum(-1), torch.ones(4))
    assert not torch.allclose(ad.gates(x, torch.zeros(4, dtype=torch.long)), g)
    # Expert k is exactly (x - b_k) @ W_k.
    k_only = torch.stack([(x - ad.bias[k]) @ ad.weight[k] for k in range(3)], dim=1)
    torch.testing.assert_close(ad(x, pid), (g.unsqueeze(-1) * k_only).sum(1))


def test_item_tower_shapes_and_category_mean_ignores_padding() -> None:
    torch.manual_seed(0)
    tower = ItemTower(H, D, num_brands=5, num_categories=7, num_platforms=P, num_experts=2,
                      dropout=0.0).eval()
    text, brands, cats = catalog()
    pid = torch.zeros(N + 1, dtype=torch.long)
    assert tower(text, brands, cats, pid).shape == (N + 1, D)
    one = torch.tensor([[3, 0, 0]])
    same = torch.tensor([[3, 3, 0]])  # mean over known levels: [3] and [3, 3] agree
    args = (text[:1], brands[:1])
    torch.testing.assert_close(tower(*args, one, pid[:1]), tower(*args, same, pid[:1]))
    assert torch.equal(tower.brand.weight[0], torch.zeros(D))


def test_item_table_row0_zero_and_score_padding_column() -> None:
    m = model().eval()
    table = m.item_table(*catalog(), platform_id=0)
    assert table.shape == (N + 1, D)
    assert torch.equal(table[0], torch.zeros(D))
    history = torch.tensor([[0, 1, 2], [0, 0, 4], [5, 6, 7]])
    scores = m.score(history, torch.tensor([0, 0, 0]), table)
    assert scores.shape == (3, N + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert scores.argmax(-1).ne(0).all()


# -- user side ------------------------------------------------------------------------------------


def test_user_tower_shapes() -> None:
    torch.manual_seed(0)
    tower = UserTower(D, max_len=L, num_platforms=P, num_layers=2, num_heads=2, dropout=0.1)
    out = tower(torch.randn(3, L, D), torch.ones(3, L, dtype=torch.bool), torch.tensor([0, 1, 1]))
    assert out.shape == (3, L, D)
    with pytest.raises(ValueError, match="max_len"):
        tower(torch.randn(1, L + 1, D), torch.ones(1, L + 1, dtype=torch.bool), torch.tensor([0]))


def test_user_states_are_causal() -> None:
    m = model().eval()
    table = m.item_table(*catalog(), platform_id=0)
    h1 = torch.tensor([[1, 2, 3, 4, 5, 6]])
    h2 = torch.tensor([[1, 2, 3, 9, 8, 7]])  # differs from position 3 on
    s1 = m.user_states(h1, table, torch.tensor([0]))
    s2 = m.user_states(h2, table, torch.tensor([0]))
    torch.testing.assert_close(s1[:, :3], s2[:, :3])
    assert not torch.allclose(s1[:, 3:], s2[:, 3:])


def test_left_padding_does_not_change_the_user_vector() -> None:
    m = model().eval()
    table = m.item_table(*catalog(), platform_id=1)
    pid = torch.tensor([1])
    short = torch.tensor([[4, 2, 7]])
    padded = torch.tensor([[0, 0, 0, 4, 2, 7]])
    u_short = m.user_vector(short, table, pid)
    u_padded = m.user_vector(padded, table, pid)
    torch.testing.assert_close(u_short, u_padded, atol=1e-5, rtol=1e-5)
    # And in a batch with other rows, and under inference_mode (the serving path).
    batch = torch.tensor([[0, 0, 0, 4, 2, 7], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
    with torch.inference_mode():
        u = m.user_vector(batch, table, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(u[0], u_short[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(u).all() and torch.equal(u[2], torch.zeros(D))


def test_fully_padded_rows_give_no_nans_in_training() -> None:
    m = model().train()
    table = m.item_table(*catalog(), platform_id=0)
    history = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 3, 1]])
    states = m.user_states(history, table, torch.tensor([0, 1]))
    states.sum().backward()
    assert torch.isfinite(states).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# -- heads ----------------------------------------------------------------------------------------


def test_ctr_head_returns_logits_that_depend_on_the_user() -> None:
    torch.manual_seed(0)
    head = CTRHead(D)
    items = torch.randn(2, D)
    u1, u2 = torch.randn(1, D).expand(2, D), torch.randn(1, D).expand(2, D)
    l1, l2 = head(u1, items), head(u2, items)
    assert l1.shape == (2,)
    # The user changes the order of the items, not only a common offset.
    assert not torch.allclose(l1[0] - l1[1], l2[0] - l2[1])


# -- transfer and checkpoints ---------------------------------------------------------------------


def test_add_platforms_keeps_old_platforms_unchanged() -> None:
    m = model().eval()
    text, brands, cats = catalog()
    history = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]])
    pid = torch.tensor([0, 1])
    before = [m.item_table(text, brands, cats, p) for p in range(P)]
    u_before = m.user_vector(history, before[0], pid)
    m.add_platforms(2)
    assert m.config["num_platforms"] == P + 2
    for p in range(P):
        torch.testing.assert_close(m.item_table(text, brands, cats, p), before[p])
    torch.testing.assert_close(m.user_vector(history, before[0], pid), u_before)
    new = m.item_table(text, brands, cats, P + 1)  # the new platform works, as the average one
    assert new.shape == (N + 1, D)
    torch.testing.assert_close(m.user_tower.platform.weight[P],
                               m.user_tower.platform.weight[:P].mean(0))


def test_resize_features_keeps_old_ids() -> None:
    m = model().eval()
    text, brands, cats = catalog()
    before = m.item_table(text, brands, cats, 0)
    m.resize_features(num_brands=8, num_categories=7)
    assert m.config["num_brands"] == 8 and m.item_tower.brand.num_embeddings == 8
    torch.testing.assert_close(m.item_table(text, brands, cats, 0), before)


def test_config_and_state_dict_round_trip(tmp_path: Path) -> None:
    m = model().eval()
    m.add_platforms(1)
    table_args = (*catalog(), 2)
    history = torch.tensor([[0, 0, 1, 2, 3, 4]])
    expected = m.user_vector(history, m.item_table(*table_args), torch.tensor([2]))

    rebuilt = Recommender(**m.config)
    rebuilt.load_state_dict(m.state_dict())
    save_file(m.state_dict(), tmp_path / "model.safetensors")
    from_file = Recommender(**m.config)
    from_file.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for r in (rebuilt.eval(), from_file.eval()):
        got = r.user_vector(history, r.item_table(*table_args), torch.tensor([2]))
        torch.testing.assert_close(got, expected)


# -- item id embeddings (text + ID) ---------------------------------------------------------------


def test_item_ids_start_at_zero_so_the_model_starts_as_text_only() -> None:
    text, brands, cats = catalog()
    plain, with_ids = model().eval(), model(item_counts=[N, 4]).eval()
    state = {k: v for k, v in with_ids.state_dict().items() if "item_id" not in k}
    assert set(with_ids.state_dict()) - set(state) == {"item_tower.item_id.embedding.weight"}
    plain.load_state_dict(state)
    for p in range(P):
        torch.testing.assert_close(with_ids.item_table(text, brands, cats, p),
                                   plain.item_table(text, brands, cats, p))
    # 1 shared zero row + N rows of platform 0 + 4 rows of platform 1
    assert with_ids.item_tower.item_id.embedding.num_embeddings == 1 + N + 4


def test_item_ids_get_gradients_and_separate_items_with_the_same_text() -> None:
    m = model(item_counts=[N, N], dropout=0.0)
    text, brands, cats = catalog()
    text[2], brands[2], cats[2] = text[1], brands[1], cats[1]  # items 1 and 2: same features
    table = m.item_table(text, brands, cats, 0)
    torch.testing.assert_close(table[1], table[2])
    user = m.user_vector(torch.tensor([[0, 0, 0, 3, 4, 5]]), table, torch.tensor([0]))
    scores = m.score(torch.tensor([[0, 0, 0, 3, 4, 5]]), torch.tensor([0]), table, user=user)
    loss = torch.nn.functional.cross_entropy(scores / 0.07, torch.tensor([1]))
    loss.backward()
    grad = m.item_tower.item_id.embedding.weight.grad
    assert grad[1:1 + N].abs().sum() > 0           # platform 0's rows learn
    assert torch.equal(grad[0], torch.zeros(D))     # the shared zero row never does
    assert torch.equal(grad[1 + N:], torch.zeros(N, D))  # platform 1 took no part
    with torch.no_grad():
        torch.optim.SGD(m.parameters(), lr=1.0).step()
        table = m.item_table(text, brands, cats, 0)
    assert not torch.allclose(table[1], table[2])   # the id part tells them apart now


def test_item_id_rows_are_per_platform_and_unknown_items_get_none() -> None:
    emb = ItemIdEmbedding([3, 0, 2], dim=4)
    with torch.no_grad():
        emb.embedding.weight.copy_(torch.arange(6.0)[:, None].expand(6, 4))  # row r = r
    ids = torch.tensor([1, 3, 4, 0, 1, 1, 2, 3])
    pid = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2])
    # platform 0 items 1, 3 -> rows 1, 3; item 4 is beyond its 3 items; 0 is padding;
    # platform 1 has no ids; platform 2 items 1, 2 -> rows 4, 5; its item 3 is unknown.
    assert emb(ids, pid)[:, 0].tolist() == [1, 3, 0, 0, 0, 4, 5, 0]


def test_grown_item_ids_keep_every_known_row() -> None:
    emb = ItemIdEmbedding([3, 2], dim=4)
    with torch.no_grad():
        emb.embedding.weight.normal_()
    ids, pid = torch.tensor([1, 2, 3, 1, 2]), torch.tensor([0, 0, 0, 1, 1])
    before = emb(ids, pid)
    big = emb.grown([5, 2, 4])  # more items on platform 0, a new platform 2
    torch.testing.assert_close(big(ids, pid), before)
    assert torch.equal(big(torch.tensor([4, 5, 1, 4]), torch.tensor([0, 0, 2, 2])),
                       torch.zeros(4, 4))
    with pytest.raises(ValueError, match="cannot shrink"):
        emb.grown([2, 2])


def test_add_platforms_and_round_trip_with_item_ids(tmp_path: Path) -> None:
    m = model(item_counts=[N, N]).eval()
    with torch.no_grad():
        m.item_tower.item_id.embedding.weight.normal_()
    text, brands, cats = catalog()
    before = m.item_table(text, brands, cats, 1)
    m.add_platforms(1)
    assert m.config["item_counts"] == [N, N, 0]
    m.set_item_counts([N, N, 5])
    torch.testing.assert_close(m.item_table(text, brands, cats, 1), before)
    save_file(m.state_dict(), tmp_path / "model.safetensors")
    rebuilt = Recommender(**m.config)
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for p in range(P + 1):
        torch.testing.assert_close(rebuilt.eval().item_table(text, brands, cats, p),
                                   m.item_table(text, brands, cats, p))
    with pytest.raises(ValueError, match="2 item counts for 3 platforms"):
        m.set_item_counts([N, N])


def test_parameter_count_of_the_reference_config() -> None:
    m = Recommender(text_dim=384, dim=64, num_platforms=3, num_brands=41, num_categories=41,
                    max_len=50, num_layers=2, num_heads=2, dropout=0.1, num_experts=4)
    assert count_parameters(m) == 210_445
    assert count_parameters(m) == count_parameters(m, trainable_only=True)


# -- repeat bias ----------------------------------------------------------------------------------


def test_repeat_bias_adds_the_platforms_score_to_seen_items_only() -> None:
    m = model(repeat_bias=True).eval()
    table = m.item_table(*catalog(), platform_id=0)
    user = torch.randn(2, D)
    history = torch.tensor([[0, 0, 0, 2, 5, 2], [0, 0, 0, 0, 0, 7]])
    seen = seen_items(history, N + 1)
    assert seen.sum(1).tolist() == [2, 1] and not seen[:, 0].any()
    pid = torch.tensor([0, 1])
    plain = m.score(torch.zeros_like(history), pid, table, user=user)  # nothing seen
    torch.testing.assert_close(m.score(history, pid, table, user=user), plain)  # starts at 0
    with torch.no_grad():
        m.repeat.weight.copy_(torch.tensor([[-0.5], [0.25]]))
    diff = m.score(history, pid, table, user=user) - plain
    diff[:, 0] = 0  # padding column: -inf in both
    want = torch.zeros(2, N + 1)
    want[0, [2, 5]], want[1, 7] = -0.5, 0.25
    torch.testing.assert_close(diff, want)
    m.add_platforms(1)  # a new platform starts at the mean bias; the old ones keep theirs
    torch.testing.assert_close(m.repeat.weight.squeeze(-1), torch.tensor([-0.5, 0.25, -0.125]))
    rebuilt = Recommender(**m.config)
    rebuilt.load_state_dict(m.state_dict())
    torch.testing.assert_close(rebuilt.repeat.weight, m.repeat.weight)


def test_repeat_bias_can_be_added_to_a_model_without_one() -> None:
    m = model().eval()
    assert m.repeat is None and m.config["repeat_bias"] is False
    table, user, pid = m.item_table(*catalog(), platform_id=0), torch.randn(1, D), torch.tensor([0])
    seen = torch.ones(1, N + 1, dtype=torch.bool)
    assert torch.equal(m.score_items(user, table, seen, pid),
                       m.score_items(user, table, ~seen, pid))
    m.enable_repeat_bias()
    assert m.config["repeat_bias"] is True and m.repeat.weight.shape == (P, 1)
    assert m.repeat.weight.abs().sum() == 0
