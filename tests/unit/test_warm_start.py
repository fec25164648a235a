"""Warm start from a champion (issue 23): a transfer export, the kind a champion is, is a
valid ``transfer.init_from``. Its towers, per-platform tables, item ids and repeat bias come
back exactly, and the catalog may have grown since (new items of the new logs get new rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.config import load_config
from recsys.model.export import ExportedItems, save_export
from recsys.training.config import TrainJobConfig
from recsys.training.model_setup import build_model
from recsys.training.trainer import load_init
from tests.unit import test_model_setup as setup
from tests.unit.test_export import write_catalog

pytestmark = pytest.mark.usefixtures("one_thread")
PLATFORMS = ["shop_a", "shop_b"]


def _config(mode: str) -> TrainJobConfig:
    extra = [f"mode={mode}", "model.item_ids=true", "model.repeat_bias=true"]
    if mode == "transfer":
        extra.append("transfer.init_from=unused")  # build_model is given the init itself
    return load_config(TrainJobConfig, None, setup.SMALL + extra)


def _champion(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """Pretrain on shop_a, transfer to shop_b, 'train' (perturb every weight), export."""
    pre = build_model(_config("pretrain"), setup.item_inputs(["shop_a"]), None, ["shop_a"])
    inputs = setup.item_inputs(PLATFORMS, setup.BIGGER)
    model = build_model(_config("transfer"), inputs,
                        {"config": pre.config, "state_dict": pre.state_dict()}, PLATFORMS)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.item_tower.item_id.embedding.weight[0] = 0  # the padding row never trains
    it = inputs.items["shop_b"]
    items = {"shop_b": ExportedItems("shop_b", 1, [f"b{i}" for i in range(1, len(it.brand_ids))],
                                     it.brand_ids, it.category_ids, it.text_vecs)}
    (tmp_path / "src").mkdir()
    catalog = write_catalog(tmp_path / "src" / "shop_b.parquet", items["shop_b"])
    meta = {"platforms": PLATFORMS, "platforms_with_items": ["shop_b"],
            "vocab": setup.BIGGER.to_dict(), "mode": "transfer", "strategy": "freeze_encoder"}
    return save_export(tmp_path / "champion", model, model.state_dict(), meta, items,
                       {"shop_b": catalog}), model


def test_a_transfer_export_warm_starts_exactly(tmp_path: Path) -> None:
    export, champion = _champion(tmp_path)
    init = load_init(export)
    assert init["platforms"] == PLATFORMS and init["vocab"] == setup.BIGGER
    warm = build_model(_config("transfer"), setup.item_inputs(PLATFORMS, setup.BIGGER), init,
                       PLATFORMS)
    mine, theirs = warm.state_dict(), champion.state_dict()
    assert mine.keys() == theirs.keys()
    assert any("item_id" in k for k in mine) and any(k.startswith("repeat") for k in mine)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], msg=k)


def test_new_items_of_the_new_logs_get_rows_and_the_old_ones_keep_theirs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export, champion = _champion(tmp_path)
    monkeypatch.setitem(setup.SIZES, "shop_b", setup.SIZES["shop_b"] + 3)
    warm = build_model(_config("transfer"), setup.item_inputs(PLATFORMS, setup.BIGGER),
                       load_init(export), PLATFORMS)
    old = dict(champion.named_parameters())
    grown = [k for k, p in warm.named_parameters() if p.shape != old[k].shape]
    assert grown and all("item_id" in k for k in grown), grown
    for k, p in warm.named_parameters():
        if k not in grown:
            torch.testing.assert_close(p, old[k], msg=k)
