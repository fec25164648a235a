"""Config -> model: which parameters train under each transfer strategy, and the transfer
initialisation (a pretrained platform's outputs survive growing the model to new platforms and a
larger feature vocabulary). The text encoder is a tiny BERT built from a config: no download."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

import recsys.training.model_setup as model_setup
from recsys.config import load_config
from recsys.model.encoder import TextEncoder
from recsys.model.features import FeatureVocab
from recsys.model.recommender import Recommender
from recsys.training.config import TrainJobConfig
from recsys.training.items import ItemInputs, PlatformItems
from recsys.training.model_setup import build_model, set_trainable, trainable_summary
from recsys.training.objective import PlatformTensors

H = 16  # text width (cached vectors and the tiny encoder alike)
SMALL = ["model.dim=16", "model.num_heads=2", "model.num_layers=1", "model.num_experts=2",
         "model.dropout=0.1", "data.sequences.max_seq_len=8"]
VOCAB = FeatureVocab(brands={"acme": 1, "globex": 2, "initech": 3},
                     categories={"home": 1, "home > kitchen": 2, "toys": 3, "toys > lego": 4})
BIGGER = FeatureVocab(brands={**VOCAB.brands, "umbrella": 4, "wayne": 5},
                      categories={**VOCAB.categories, "garden": 5})
SIZES = {"shop_a": 12, "shop_b": 9}


pytestmark = pytest.mark.usefixtures("one_thread")


def config(mode: str = "pretrain", strategy: str | None = None) -> TrainJobConfig:
    extra = [f"mode={mode}"]
    if mode == "transfer":
        extra.append("transfer.init_from=runs/pretrain/export")  # not read by build_model
    if strategy:
        extra.append(f"transfer.strategy={strategy}")
    return load_config(TrainJobConfig, None, SMALL + extra)


def items(name: str, pid: int, vocab: FeatureVocab) -> PlatformItems:
    """Random catalog whose brand/category ids stay inside ``vocab``; seeded by the name."""
    rng = np.random.default_rng(sum(map(ord, name)))
    n = SIZES[name]
    brands = rng.integers(0, vocab.num_brands, n + 1)
    cats = rng.integers(0, vocab.num_categories, (n + 1, vocab.max_depth))
    vecs = rng.normal(size=(n + 1, H)).astype(np.float32)
    brands[0], cats[0], vecs[0] = 0, 0, 0.0
    return PlatformItems(name=name, platform_id=pid, brand_ids=brands, category_ids=cats,
                         text_vecs=vecs, token_ids=None, popularity=np.ones(n + 1))


def item_inputs(platforms: list[str], vocab: FeatureVocab = VOCAB) -> ItemInputs:
    return ItemInputs(platforms=platforms, vocab=vocab,
                      items={p: items(p, i, vocab) for i, p in enumerate(platforms)})


def tiny_bert_encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(BertModel(BertConfig(hidden_size=H, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=24,
                                            vocab_size=50, max_position_embeddings=16)))


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``load_text_encoder`` returns a tiny BERT; the list records the names asked for."""
    asked: list[str] = []

    def load(name: str) -> TextEncoder:
        asked.append(name)
        return tiny_bert_encoder()

    monkeypatch.setattr(model_setup, "load_text_encoder", load)
    return asked


def pretrained(platforms: tuple[str, ...] = ("shop_a",)) -> tuple[Recommender, dict[str, Any]]:
    """A 'pretrain' model with every weight moved off its initial value (so that a platform
    row that is zero or a copy at init cannot hide a mistake), and its export-like init."""
    torch.manual_seed(0)
    model = build_model(config("pretrain"), item_inputs(list(platforms)), None, list(platforms))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    init = {"config": dict(model.config),
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    return model.eval(), init


def trainable(model: Recommender) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names(model: Recommender, prefix: str = "") -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


# -- which parameters train -----------------------------------------------------------------------


def test_pretrain_builds_the_configured_architecture_and_trains_it_all() -> None:
    model = build_model(config("pretrain"), item_inputs(["shop_a", "shop_b"]), None,
                        ["shop_a", "shop_b"])
    assert model.text_encoder is None
    assert {k: model.config[k] for k in ("text_dim", "dim", "num_platforms", "num_brands",
                                         "num_categories", "max_len", "num_layers",
                                         "num_experts")} == dict(
        text_dim=H, dim=16, num_platforms=2, num_brands=4, num_categories=5, max_len=8,
        num_layers=1, num_experts=2)
    assert trainable(model) == names(model)
    summary = trainable_summary(model)
    assert summary["params_trainable"] == summary["params_total"] > 0


def test_freeze_encoder_trains_the_towers_without_an_encoder(fake_encoder: list[str]) -> None:
    _, init = pretrained()
    model = build_model(config("transfer", "freeze_encoder"), item_inputs(["shop_a", "shop_b"]),
                        init, ["shop_a", "shop_b"])
    assert model.text_encoder is None and fake_encoder == []  # vectors come from the cache
    assert trainable(model) == names(model)


def test_full_trains_everything_the_encoder_included(fake_encoder: list[str]) -> None:
    _, init = pretrained()
    model = build_model(config("transfer", "full"), item_inputs(["shop_a", "shop_b"]), init,
                        ["shop_a", "shop_b"])
    assert model.text_encoder is not None and len(fake_encoder) == 1
    assert names(model, "text_encoder.")
    assert trainable(model) == names(model)


def test_lora_trains_lora_weights_and_towers_not_the_encoder_base(
        fake_encoder: list[str]) -> None:
    _, init = pretrained()
    model = build_model(config("transfer", "lora"), item_inputs(["shop_a", "shop_b"]), init,
                        ["shop_a", "shop_b"])
    enc = names(model, "text_encoder.")
    lora = {n for n in enc if "lora_" in n}
    assert lora and lora != enc
    assert trainable(model) == (names(model) - enc) | lora


def test_adapter_only_trains_the_per_platform_parts_only() -> None:
    _, init = pretrained()
    model = build_model(config("transfer", "adapter_only"), item_inputs(["shop_a", "shop_b"]),
                        init, ["shop_a", "shop_b"])
    expected = names(model, "item_tower.adapter.") | {"user_tower.platform.weight",
                                                      "repeat.weight"}
    assert trainable(model) == expected
    assert not trainable(model) & names(model, "ctr_head.")


def test_set_trainable_undoes_an_earlier_strategy() -> None:
    """Strategies are applied from 'everything trains', not on top of the previous state."""
    _, init = pretrained()
    model = build_model(config("transfer", "adapter_only"), item_inputs(["shop_a"]), init,
                        ["shop_a"])
    set_trainable(model, config("transfer", "freeze_encoder"))
    assert trainable(model) == names(model)


def test_pretraining_with_the_full_strategy_trains_the_encoder(fake_encoder: list[str]) -> None:
    """``transfer.strategy=full`` is accepted outside transfer and puts the encoder in the step
    (``finetunes_encoder``); an encoder that runs every step must then also learn."""
    cfg = config("pretrain", "full")
    assert cfg.finetunes_encoder
    model = build_model(cfg, item_inputs(["shop_a"]), None, ["shop_a"])
    assert model.text_encoder is not None
    assert trainable(model) == names(model)


# -- transfer initialisation ----------------------------------------------------------------------


def test_transfer_keeps_the_pretrained_platform_and_adds_the_new_one() -> None:
    pre, init = pretrained()
    old_a = item_inputs(["shop_a"]).items["shop_a"]
    history = torch.tensor([[0, 0, 3, 1, 7], [2, 4, 6, 8, 10]])
    pid_a = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        table_a = PlatformTensors.from_items(old_a, torch.device("cpu")).item_table(pre)
        user_a = pre.user_vector(history, table_a, pid_a)

    inputs = item_inputs(["shop_a", "shop_b"], BIGGER)
    inputs.items["shop_a"] = old_a  # its ids are the same under the extended vocabulary
    model = build_model(config("transfer", "freeze_encoder"), inputs, init,
                        ["shop_a", "shop_b"]).eval()
    assert model.config["num_platforms"] == 2
    assert (model.config["num_brands"], model.config["num_categories"]) == (6, 6)
    with torch.no_grad():
        tensors = {n: PlatformTensors.from_items(it, torch.device("cpu"))
                   for n, it in inputs.items.items()}
        new_table_a = tensors["shop_a"].item_table(model)
        torch.testing.assert_close(new_table_a, table_a)
        torch.testing.assert_close(model.user_vector(history, new_table_a, pid_a), user_a)
        table_b = tensors["shop_b"].item_table(model)
    assert table_b.shape == (SIZES["shop_b"] + 1, 16) and torch.isfinite(table_b).all()
    # New rows: platform B starts as the mean platform, new brands/categories as 'unknown'.
    torch.testing.assert_close(model.user_tower.platform.weight[1],
                               pre.user_tower.platform.weight[0])
    torch.testing.assert_close(model.item_tower.adapter.platform_gate.weight[1],
                               pre.item_tower.adapter.platform_gate.weight[0])
    assert torch.equal(model.item_tower.brand.weight[4:], torch.zeros(2, 16))
    assert torch.equal(model.item_tower.category.weight[5:], torch.zeros(1, 16))
    # The init was not modified in place (the driver reuses it for the export).
    assert init["config"]["num_platforms"] == 1 and init["config"]["num_brands"] == 4


def test_item_ids_cover_the_run_platforms_and_transfer_keeps_pretrained_rows() -> None:
    ids = ["model.item_ids=true"]
    pre = build_model(load_config(TrainJobConfig, None, SMALL + ids), item_inputs(["shop_a"]),
                      None, ["shop_a"])
    assert pre.config["item_counts"] == [SIZES["shop_a"]]
    with torch.no_grad():
        pre.item_tower.item_id.embedding.weight.normal_()
    init = {"config": dict(pre.config), "state_dict": pre.state_dict()}
    cfg = load_config(TrainJobConfig, None, SMALL + ids + [
        "mode=transfer", "transfer.init_from=x", "transfer.strategy=adapter_only"])
    # The transfer run has items of shop_b only: shop_a keeps its pretrained rows.
    model = build_model(cfg, item_inputs(["shop_b"]), init, ["shop_a", "shop_b"])
    assert model.config["item_counts"] == [SIZES["shop_a"], SIZES["shop_b"]]
    rows = SIZES["shop_a"] + 1
    torch.testing.assert_close(model.item_tower.item_id.embedding.weight[1:rows],
                               pre.item_tower.item_id.embedding.weight[1:])
    assert torch.equal(model.item_tower.item_id.embedding.weight[rows:],
                       torch.zeros(SIZES["shop_b"], 16))
    assert "item_tower.item_id.embedding.weight" in trainable(model)  # per-platform part


def test_transfer_takes_the_new_dropout_but_keeps_the_pretrained_sizes() -> None:
    _, init = pretrained()
    cfg = load_config(TrainJobConfig, None, ["mode=transfer", "transfer.init_from=x",
                                             "model.dropout=0.3"])  # model.dim default 64
    model = build_model(cfg, item_inputs(["shop_a"]), init, ["shop_a"])
    assert model.config["dim"] == 16 and model.config["dropout"] == 0.3


def test_transfer_refuses_an_encoder_of_another_width(monkeypatch: pytest.MonkeyPatch) -> None:
    _, init = pretrained()
    torch.manual_seed(0)
    wide = TextEncoder(BertModel(BertConfig(hidden_size=2 * H, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=24,
                                            vocab_size=50, max_position_embeddings=16)))
    monkeypatch.setattr(model_setup, "load_text_encoder", lambda name: wide)
    with pytest.raises(ValueError, match="encoder hidden size 32 != pretrained text_dim 16"):
        build_model(config("transfer", "full"), item_inputs(["shop_a"]), init, ["shop_a"])


def test_shrink_and_perturb_mixes_pretrained_and_fresh_weights() -> None:
    model, _ = pretrained()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    model_setup.shrink_perturb(model, 0.5, 0.25)
    torch.manual_seed(1)  # the same draw for the fresh model
    fresh = dict(Recommender(**model.config).named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[n] + 0.25 * fresh[n])


def test_transfer_shrinks_the_towers_but_not_the_encoder(fake_encoder: list[str]) -> None:
    _, init = pretrained()
    plain = build_model(config("transfer", "lora"), item_inputs(["shop_a"]), init, ["shop_a"])
    cfg = load_config(TrainJobConfig, None, SMALL + [
        "mode=transfer", "transfer.init_from=x", "transfer.strategy=lora", "transfer.shrink=0.5"])
    shrunk = build_model(cfg, item_inputs(["shop_a"]), init, ["shop_a"])
    towers = {n for n, _ in plain.named_parameters() if not n.startswith("text_encoder.")}
    assert any(n.startswith("user_tower.") for n in towers)
    for (n, p), (_, q) in zip(shrunk.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(p, 0.5 * q if n in towers else q)
    assert trainable(shrunk) == trainable(plain)


def test_shrink_and_perturb_are_bounded() -> None:
    for bad in ("transfer.shrink=0", "transfer.shrink=1.5", "transfer.perturb=-0.1"):
        with pytest.raises(ValueError, match="transfer"):
            load_config(TrainJobConfig, None, ["mode=transfer", "transfer.init_from=x", bad])


# -- learning rates ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,encoder_lr", [("full", 5e-5), ("lora", 5e-4)])
def test_the_encoder_trains_at_its_own_rate(fake_encoder: list[str], strategy: str,
                                            encoder_lr: float) -> None:
    """A pretrained BERT fine-tuned at the towers' rate is wrecked; LoRA's fresh adapters take
    their own (larger) step. Every trainable parameter is in exactly one group."""
    from recsys.training.engine import param_groups

    _, init = pretrained()
    cfg = config("transfer", strategy)
    model = build_model(cfg, item_inputs(["shop_a", "shop_b"]), init, ["shop_a", "shop_b"])
    groups = param_groups(model, cfg)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    encoder = {id(p) for n, p in model.named_parameters()
               if n.startswith("text_encoder.") and p.requires_grad}
    assert set(by_lr) == {cfg.optim.lr, encoder_lr}
    assert by_lr[encoder_lr] == encoder and encoder
    assert by_lr[cfg.optim.lr] | encoder == {id(p) for p in model.parameters() if p.requires_grad}
    assert not by_lr[cfg.optim.lr] & encoder


def test_without_an_encoder_in_the_step_there_is_one_group() -> None:
    from recsys.training.engine import param_groups

    cfg = config("pretrain")
    model = build_model(cfg, item_inputs(["shop_a"]), None, ["shop_a"])
    (group,) = param_groups(model, cfg)
    assert group["lr"] == cfg.optim.lr
    assert len(group["params"]) == len(list(model.parameters()))


def test_lr_decay_scales_every_group_from_its_own_rate(fake_encoder: list[str]) -> None:
    from recsys.training.engine import Engine, param_groups

    _, init = pretrained()
    cfg = config("transfer", "full")
    model = build_model(cfg, item_inputs(["shop_a", "shop_b"]), init, ["shop_a", "shop_b"])
    engine = Engine()
    engine.optimizer = torch.optim.AdamW(param_groups(model, cfg))
    engine.base_lrs = [g["lr"] for g in engine.optimizer.param_groups]
    engine.scale_lr(0.5)
    engine.scale_lr(0.25)  # from the configured rates, not compounded on the last call
    assert [g["lr"] for g in engine.optimizer.param_groups] == [cfg.optim.lr * 0.25,
                                                                 cfg.encoder.lr * 0.25]
