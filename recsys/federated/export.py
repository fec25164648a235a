"""The server's side of the model: catalog-only item inputs and the export of the global model.

The server reads the platforms' catalogs (item ids, text, brand, category: what each shop
publishes anyway) to agree on one feature vocabulary and to write the export's item tables. It
never reads a split: item popularity, which the pooled job derives from the training events,
stays zero here (the export does not use it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.data.examples import ExampleSet
from recsys.federated.config import FederatedJobConfig
from recsys.model.export import ExportedItems, ExportInfo, save_export
from recsys.model.recommender import Recommender
from recsys.training.items import ItemInputs, PlatformItems


def catalog_inputs(es: ExampleSet, platforms: list[str], cfg: FederatedJobConfig) -> ItemInputs:
    """Item inputs of every client platform from the catalogs and the text-vector cache."""
    from recsys.model.encoder_cache import TextVectorCache, encode_device
    from recsys.model.features import load_item_features, load_token_ids

    vocab, feats = load_item_features(es.path, platforms)
    tokens = load_token_ids(es.path)
    cache = TextVectorCache(Path(cfg.encoder.cache_dir), cfg.data.text.encoder,
                            cfg.data.text.max_tokens, device=encode_device())
    out = ItemInputs(platforms=list(platforms), vocab=vocab)
    for pid, name in enumerate(platforms):
        f = feats[name]
        out.items[name] = PlatformItems(
            name=name, platform_id=pid, brand_ids=f.brand_ids, category_ids=f.category_ids,
            text_vecs=cache.item_vectors(f, tokens), token_ids=None,
            popularity=np.zeros(len(f.item_ids) + 1))
    out.cache_stats = {"hits": cache.hits, "misses": cache.misses}
    return out


def write_export(out: Path, cfg: FederatedJobConfig, es: ExampleSet, inputs: ItemInputs,
                 model: Recommender, metrics: dict[str, Any]) -> Path:
    """The global model as a pretrain export (``recsys.model.export``): what
    ``transfer.init_from`` reads, in the same format as pooled pretraining's."""
    import pyarrow.parquet as pq

    items = {}
    for name, pi in inputs.items.items():
        catalog = es.path / "catalog" / f"{name}.parquet"
        ids = pq.read_table(catalog, columns=["item_id"])["item_id"].to_pylist()
        items[name] = ExportedItems(platform=name, platform_id=pi.platform_id, item_ids=ids,
                                    brand_ids=pi.brand_ids, category_ids=pi.category_ids,
                                    text_vecs=pi.text_vecs)
    meta = ExportInfo(
        platforms=list(inputs.platforms), platforms_with_items=list(items),
        vocab=inputs.vocab.to_dict(), encoder=cfg.data.text.encoder,
        max_tokens=cfg.data.text.max_tokens,
        train_config=cfg.train_config().model_dump(mode="json"),
        mode="pretrain", strategy=f"federated_{cfg.federated.algorithm}",
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        example_set=str(es.path), input_fingerprint=es.manifest.input_fingerprint,
        data_until={p: c.last_event for p, c in es.manifest.platforms.items()
                    if c.last_event is not None})
    catalogs = {p: es.path / "catalog" / f"{p}.parquet" for p in items}
    state: dict[str, torch.Tensor] = model.state_dict()
    return save_export(out, model, state, meta, items, catalogs, ann_threshold=cfg.ann_threshold)
