"""The exported model: everything serving and evaluation need, nothing about training.

    EXPORT/model.safetensors        consolidated fp32 weights (any engine, any ZeRO stage)
    EXPORT/export.json              Recommender kwargs, platforms (model order), feature vocab,
                                    text encoder name, max history length, provenance
    EXPORT/items/<platform>.npz     per platform: item ids, brand/category ids, frozen text
                                    vectors (N+1, H) (row 0 = padding)
    EXPORT/catalog/<platform>.parquet  item index -> id, title, brand, category, price
    EXPORT/encoder/                 fine-tuned text encoder (only when it was trained)

``load_export`` rebuilds the ``Recommender`` from this alone (no training config classes);
``export.json`` is read and written only as :class:`ExportMeta`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save_file

from recsys.config import StrictModel
from recsys.model.recommender import Recommender

FORMAT_VERSION = 1
META_FILE = "export.json"


class ExportInfo(StrictModel):
    """What the writer of an export says about it (``save_export`` adds the model's part)."""

    # NaN/inf metrics (a diverged run) are written as JSON's NaN/Infinity, as ``json.dumps`` does.
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    platforms: list[str]
    """Every platform of the model, in platform-id order."""
    platforms_with_items: list[str]
    """Platforms whose catalogs are in ``items/`` (the model can score these)."""
    vocab: dict[str, Any] | None = None
    """``FeatureVocab.to_dict()`` of the brand/category ids (a transfer run extends it)."""
    encoder: str | None = None
    """Text encoder whose vectors were cached at training (search encodes queries with it)."""
    max_tokens: int = 64
    mode: str | None = None
    strategy: str | None = None
    train_config: dict[str, Any] | None = None
    """The resolved ``TrainJobConfig`` as JSON: provenance, not read back as a config."""
    metrics: dict[str, int | float] = Field(default_factory=dict)
    """The last reported training metrics (validation scores, speed)."""
    example_set: str | None = None
    input_fingerprint: str | None = None
    seed: int | None = None
    """Seed of a synthetic (toy) model."""

    @property
    def user_fraction(self) -> float:
        """Share of training users the model saw (the cold-start subset depends on it)."""
        return float((self.train_config or {}).get("user_fraction", 1.0))


class ExportMeta(ExportInfo):
    """``export.json``: the writer's :class:`ExportInfo` plus how to rebuild the model."""

    format_version: Literal[1] = FORMAT_VERSION
    architecture: dict[str, Any] = Field(alias="model_config")
    """``Recommender(**architecture)`` rebuilds the model (stored as ``model_config``)."""
    has_encoder: bool = False
    """A fine-tuned text encoder is saved in ``encoder/``."""

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


def read_meta(path: str | Path) -> ExportMeta:
    """The metadata of the export directory ``path``, checked against this code's format."""
    meta_file = Path(path) / META_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a model export (no {META_FILE})")
    raw = json.loads(meta_file.read_text())
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: export format {version} is not {FORMAT_VERSION}")
    return ExportMeta.model_validate(raw)


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
    meta: ExportMeta
    items: dict[str, ExportedItems]

    @property
    def platforms(self) -> list[str]:
        return list(self.meta.platforms)

    def item_table(self, platform: str) -> torch.Tensor:
        """Item vectors (N+1, D) of ``platform``'s catalog (``Recommender.item_table``)."""
        it = self.items[platform]
        return self.model.item_table(
            None if it.text_vecs is None else torch.as_tensor(it.text_vecs),
            torch.as_tensor(it.brand_ids), torch.as_tensor(it.category_ids), it.platform_id)


def save_export(path: str | Path, model: Recommender, state_dict: dict[str, torch.Tensor],
                meta: ExportInfo | Mapping[str, Any], items: dict[str, ExportedItems],
                catalogs: dict[str, Path]) -> Path:
    """Write an export directory (replacing an existing one). ``meta`` as a mapping is
    validated as :class:`ExportInfo` (callers not yet moved to the typed form)."""
    info = meta if isinstance(meta, ExportInfo) else ExportInfo.model_validate(dict(meta))
    full = ExportMeta.model_validate({**info.model_dump(), "model_config": model.config,
                                      "has_encoder": model.text_encoder is not None})
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
    (tmp / META_FILE).write_text(full.to_json())
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
    """Rebuild an export: the model (eval mode, on ``map_location``), metadata and items."""
    path = Path(path)
    meta = read_meta(path)
    encoder = None
    if meta.has_encoder:
        from transformers import AutoModel

        from recsys.model.encoder import TextEncoder

        encoder = TextEncoder(AutoModel.from_pretrained(str(path / "encoder")))
    model = Recommender(**meta.architecture, text_encoder=encoder)
    missing, unexpected = model.load_state_dict(
        load_file(str(path / "model.safetensors"), device=map_location), strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    items = {}
    for name in meta.platforms_with_items:
        z = np.load(path / "items" / f"{name}.npz", allow_pickle=True)
        vecs = z["text_vecs"]
        items[name] = ExportedItems(
            platform=name, platform_id=int(z["platform_id"]), item_ids=list(z["item_ids"]),
            brand_ids=z["brand_ids"], category_ids=z["category_ids"],
            text_vecs=vecs if vecs.size else None)
    return Exported(path, model, meta, items)
