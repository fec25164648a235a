"""The exported model: everything serving and evaluation need, nothing about training.

    EXPORT/model.safetensors        consolidated fp32 weights (any engine, any ZeRO stage)
    EXPORT/export.json              Recommender kwargs, platforms (model order), feature vocab,
                                    text encoder name, max history length, provenance
    EXPORT/items/<platform>.safetensors  per platform: brand/category ids, frozen text vectors
                                    (N+1, H) (row 0 = padding)
    EXPORT/items/<platform>.json    per platform: its platform id and item ids (index i + 1)
    EXPORT/catalog/<platform>.parquet  item index -> id, title, brand, category, price
    EXPORT/encoder/                 fine-tuned text encoder (only when it was trained)
    EXPORT/ann/<platform>.{faiss,json}  approximate index of a catalog of more than
                                    ``ann_threshold`` items (``recsys.model.ann``)

``load_export`` rebuilds the ``Recommender`` from this alone (no training config classes);
``export.json`` is read and written only as :class:`ExportMeta`.

Nothing in an export is unpickled when it is loaded (a registry write must not run code on a
serving replica): tensors are safetensors, ids JSON, catalogs Parquet, a fine-tuned encoder is
read with ``use_safetensors=True``, an index is faiss's binary format checked against its
SHA-256 before it is parsed. A file that fails to parse is an :class:`ExportError`
naming it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file, save_file

from recsys.config import StrictModel
from recsys.model.ann import DEFAULT_THRESHOLD, AnnError, AnnIndex, load_index, save_index
from recsys.model.recommender import Recommender

FORMAT_VERSION = 2  # 2: items as safetensors + JSON (1 held pickled id arrays in .npz)
META_FILE = "export.json"


class ExportError(ValueError):
    """An export file is missing, malformed, truncated or unsafe; the message names the file."""


class PrivacyCard(StrictModel):
    """How a model was trained with user-level DP-SGD (``recsys.training.dp_engine``): the
    guarantee (epsilon, delta) for the whole run, which covers any of its checkpoints, and the
    mechanism's numbers that it follows from."""

    model_config = ConfigDict(frozen=True)

    mechanism: Literal["DP-SGD"] = "DP-SGD"
    unit: Literal["user"] = "user"
    """One user's training rows, all of them, are what the guarantee protects."""
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    """Poisson sampling: each user is in a step independently with this probability."""
    expected_users_per_step: float
    steps: int
    steps_per_epoch: int
    users: int
    accountant: str
    target_epsilon: float | None = None
    opacus: str


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
    """The training metrics reported with the exported checkpoint (its epoch, validation
    scores, speed): the best epoch of a run, not its last."""
    example_set: str | None = None
    input_fingerprint: str | None = None
    seed: int | None = None
    """Seed of a synthetic (toy) model."""
    privacy: PrivacyCard | None = None
    """Set when the model was trained with DP-SGD (None: no formal privacy guarantee)."""
    data_until: dict[str, datetime] = Field(default_factory=dict)
    """Platform -> the newest event of its lake partition that the example set was built from
    (the end of the training data: the drift monitor's reference cutoff)."""

    @property
    def user_fraction(self) -> float:
        """Share of training users the model saw (the cold-start subset depends on it)."""
        return float((self.train_config or {}).get("user_fraction", 1.0))


class ExportMeta(ExportInfo):
    """``export.json``: the writer's :class:`ExportInfo` plus how to rebuild the model."""

    format_version: Literal[2] = FORMAT_VERSION
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
    raw = _read_json(meta_file)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ExportError(f"{meta_file}: export format {version} is not {FORMAT_VERSION} "
                          "(re-export the model with this version)")
    try:
        return ExportMeta.model_validate(raw)
    except ValueError as e:
        raise ExportError(f"{meta_file}: {e}") from None


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
                catalogs: dict[str, Path], ann_threshold: int = DEFAULT_THRESHOLD) -> Path:
    """Write an export directory (replacing an existing one). ``meta`` as a mapping is
    validated as :class:`ExportInfo` (callers not yet moved to the typed form). A platform
    with more than ``ann_threshold`` items (0: none) also gets an approximate index."""
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
        arrays = {"brand_ids": np.ascontiguousarray(it.brand_ids),
                  "category_ids": np.ascontiguousarray(it.category_ids)}
        if it.text_vecs is not None:
            arrays["text_vecs"] = np.ascontiguousarray(it.text_vecs, dtype=np.float32)
        save_arrays(arrays, str(tmp / "items" / f"{name}.safetensors"))
        (tmp / "items" / f"{name}.json").write_text(json.dumps(
            {"platform_id": int(it.platform_id), "item_ids": [str(i) for i in it.item_ids]}))
    for name, src in catalogs.items():
        shutil.copyfile(src, tmp / "catalog" / f"{name}.parquet")
    for name, it in items.items():
        if ann_threshold and it.num_items > ann_threshold and it.text_vecs is not None:
            save_index(tmp, name, scoring_vectors(model, it)[1:].numpy())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


@torch.inference_mode()
def scoring_vectors(model: Recommender, it: ExportedItems, chunk: int = 65_536) -> torch.Tensor:
    """The vectors (N+1, D) that serving scores ``it``'s catalog by: the item table,
    L2-normalised when the model normalises; computed ``chunk`` items at a time (fp32, CPU)."""
    text, brands, cats = (torch.as_tensor(it.text_vecs), torch.as_tensor(it.brand_ids),
                          torch.as_tensor(it.category_ids))
    device = next(model.parameters()).device
    parts = [model.item_table(text.to(device), brands.to(device), cats.to(device),
                              it.platform_id, ids=torch.arange(i, min(i + chunk, len(brands)),
                                                               device=device)).float().cpu()
             for i in range(0, len(brands), chunk)]
    table = torch.cat(parts)
    return torch.nn.functional.normalize(table, dim=-1) if model.normalize else table


def load_ann(path: str | Path, platform: str, num_items: int, dim: int) -> AnnIndex | None:
    """The approximate index of ``platform`` in the export at ``path`` (None: it has none),
    checked against the export's items and weights: a stale or tampered one is an
    :class:`ExportError` naming the file."""
    path = Path(path)
    if not (path / "ann" / f"{platform}.json").exists():
        return None
    try:
        return load_index(path, platform, num_items, dim)
    except AnnError as e:
        raise ExportError(str(e)) from None


def load_export(path: str | Path, map_location: str = "cpu") -> Exported:
    """Rebuild an export: the model (eval mode, on ``map_location``), metadata and items.
    Raises :class:`ExportError` naming the file for anything malformed (nothing is unpickled)."""
    path = Path(path)
    meta = read_meta(path)
    encoder = None
    if meta.has_encoder:
        from transformers import AutoModel

        from recsys.model.encoder import TextEncoder

        try:  # safetensors only: a pytorch_model.bin would be a pickle
            encoder = TextEncoder(AutoModel.from_pretrained(str(path / "encoder"),
                                                            use_safetensors=True))
        except (OSError, ValueError, SafetensorError) as e:
            raise ExportError(f"{path / 'encoder'}: not a loadable safetensors encoder: {e}") \
                from None
    model = Recommender(**meta.architecture, text_encoder=encoder)
    weights_file = path / "model.safetensors"
    try:
        weights = load_file(str(weights_file), device=map_location)
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{weights_file}: not a valid safetensors file ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ExportError(f"{weights_file}: weights do not fit the model: {e}") from None
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ExportError(f"{weights_file}: weights do not match the model: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    items = {name: load_items(path, name) for name in meta.platforms_with_items}
    return Exported(path, model, meta, items)


def load_items(path: Path, platform: str) -> ExportedItems:
    """``items/<platform>.{json,safetensors}`` of the export at ``path``, checked for shape:
    one row per item id plus the padding row."""
    ids_file = path / "items" / f"{platform}.json"
    tensors_file = path / "items" / f"{platform}.safetensors"
    ids, pid = _read_ids(ids_file)
    try:
        arrays = load_arrays(str(tensors_file))
    except (OSError, SafetensorError) as e:
        raise ExportError(f"{tensors_file}: not a valid safetensors file ({e})") from None
    vecs = arrays.get("text_vecs")
    for key in ("brand_ids", "category_ids", *(["text_vecs"] if vecs is not None else [])):
        if key not in arrays or arrays[key].shape[0] != len(ids) + 1:
            raise ExportError(f"{tensors_file}: {key!r} must have {len(ids) + 1} rows (the "
                              f"{len(ids)} items of {ids_file.name} and padding)")
    return ExportedItems(platform=platform, platform_id=pid, item_ids=ids,
                         brand_ids=arrays["brand_ids"], category_ids=arrays["category_ids"],
                         text_vecs=vecs)


def item_ids(path: Path, platform: str) -> list[str] | None:
    """The item ids of ``platform`` in the export at ``path`` (None: it has no such catalog),
    read from its JSON alone (comparing catalogs needs no tensors)."""
    ids_file = path / "items" / f"{platform}.json"
    return _read_ids(ids_file)[0] if ids_file.exists() else None


def _read_ids(ids_file: Path) -> tuple[list[str], int]:
    """(item ids, platform id) of an ``items/<platform>.json``, checked for type."""
    raw = _read_json(ids_file)
    ids, pid = (raw.get("item_ids"), raw.get("platform_id")) if isinstance(raw, dict) else (None,
                                                                                            None)
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)
            and isinstance(pid, int)):
        raise ExportError(f"{ids_file}: expected {{'platform_id': int, 'item_ids': [str, ...]}}")
    return ids, pid


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
