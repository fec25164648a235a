"""The exported model: everything serving and evaluation need, nothing about training.

    EXPORT/model.safetensors        consolidated fp32 weights (any engine, any ZeRO stage)
    EXPORT/export.json              Recommender kwargs, platforms (model order), feature vocab,
                                    text encoder name, max history length, provenance
    EXPORT/items/<platform>.npz     per platform: item ids, brand/category ids, frozen text
                                    vectors (N+1, H) (row 0 = padding)
    EXPORT/catalog/<platform>.parquet  item index -> id, title, brand, category, price
    EXPORT/encoder/                 fine-tuned text encoder (only when it was trained)

``load_export`` rebuilds the ``Recommender`` from this alone (no training config classes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recsys.model.recommender import Recommender

FORMAT_VERSION = 1


@dataclass
class ExportedItems:
    platform: str
    platform_id: int
    item_ids: list[str]  # item index i + 1 -> id
    brand_ids: np.ndarray  # (N+1,)
    category_ids: np.ndarray  # (N+1, C)
    text_vecs: np.ndarray | None  # (N+1, H)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


@dataclass
class Exported:
    path: Path
    model: Recommender
    meta: dict[str, Any]
    items: dict[str, ExportedItems]

    @property
    def platforms(self) -> list[str]:
        return list(self.meta["platforms"])


def save_export(path: str | Path, model: Recommender, state_dict: dict[str, torch.Tensor],
                meta: dict[str, Any], items: dict[str, ExportedItems],
                catalogs: dict[str, Path]) -> Path:
    """Write an export directory (replacing an existing one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "items").mkdir(parents=True)
    (tmp / "catalog").mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()
               if not k.startswith("text_encoder.")}
    save_file(weights, str(tmp / "model.safetensors"))
    if model.text_encoder is not None:
        model.text_encoder.model.save_pretrained(str(tmp / "encoder"))
    full_meta = {"format_version": FORMAT_VERSION, "model_config": model.config,
                 "has_encoder": model.text_encoder is not None, **meta}
    (tmp / "export.json").write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
    for name, it in items.items():
        np.savez(tmp / "items" / f"{name}.npz", item_ids=np.asarray(it.item_ids, dtype=object),
                 brand_ids=it.brand_ids, category_ids=it.category_ids,
                 text_vecs=it.text_vecs if it.text_vecs is not None else np.zeros((0, 0)),
                 platform_id=np.asarray(it.platform_id))
    for name, src in catalogs.items():
        shutil.copyfile(src, tmp / "catalog" / f"{name}.parquet")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_export(path: str | Path, map_location: str = "cpu") -> Exported:
    path = Path(path)
    meta_file = path / "export.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a model export (no export.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: export format {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}")
    encoder = None
    if meta.get("has_encoder"):
        from transformers import AutoModel

        from recsys.model.recommender import TextEncoder

        encoder = TextEncoder(AutoModel.from_pretrained(str(path / "encoder")))
    model = Recommender(**meta["model_config"], text_encoder=encoder)
    missing, unexpected = model.load_state_dict(
        load_file(str(path / "model.safetensors"), device=map_location), strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    items = {}
    for name in meta["platforms_with_items"]:
        z = np.load(path / "items" / f"{name}.npz", allow_pickle=True)
        vecs = z["text_vecs"]
        items[name] = ExportedItems(
            platform=name, platform_id=int(z["platform_id"]), item_ids=list(z["item_ids"]),
            brand_ids=z["brand_ids"], category_ids=z["category_ids"],
            text_vecs=vecs if vecs.size else None)
    return Exported(path, model, meta, items)
