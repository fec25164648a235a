"""Approximate nearest-neighbour index of a large catalog, built at export, loaded by serving.

    EXPORT/ann/<platform>.faiss   ``faiss.serialize_index`` bytes (faiss's own binary format)
    EXPORT/ann/<platform>.json    :class:`AnnMeta`: kind, parameters, item count, dimension and
                                  SHA-256 of the index file and of the inputs it was built from

The index holds a platform's *scoring* item vectors (the item tower's output, L2-normalised when
the model normalises: ``Predictor``'s ``Catalog.scoring``), rows 1..N (faiss id i = item index
i + 1), searched by inner product. It only proposes candidates: serving re-scores them exactly
with the model (repeat bias, exclusions, filters), so its approximation costs recall, never a
wrong score.

IVF-Flat (``faiss.IndexIVFFlat``, inner product): ``nlist`` ~ 2 sqrt(N) k-means cells, ``nprobe``
of them scanned per query. On clustered 128-d vectors it reached recall@10 >= 0.95 at
``nprobe / nlist`` ~ 1.5% (see ``bench/scale_serving.py``); HNSW (M=32, efConstruction=40) built
2x slower on 2 cores and recalled < 0.5 on the same vectors, so it is not offered.

Nothing is unpickled: the index is faiss's binary format, parsed only after its SHA-256 matches
the sidecar, and the sidecar's input checksums (``items/<platform>.safetensors`` and
``model.safetensors``) refuse an index left over from other items or other weights. Any
mismatch is an :class:`~recsys.model.export.ExportError` naming the file.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ConfigDict, ValidationError

from recsys.config import StrictModel

ANN_DIR = "ann"
DEFAULT_THRESHOLD = 100_000
"""Catalogs with more items than this get an index (0: never build one)."""


class AnnError(ValueError):
    """An index file is missing, tampered with, or stale (the message names the file).
    ``recsys.model.export`` re-raises it as an ``ExportError``."""


class AnnMeta(StrictModel):
    """``ann/<platform>.json``: how the index was built and what from."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["ivf_flat"] = "ivf_flat"
    metric: Literal["inner_product"] = "inner_product"
    nlist: int
    nprobe: int
    """Cells scanned per query (serving may override)."""
    num_items: int
    dim: int
    index_sha256: str
    """Of ``ann/<platform>.faiss``: checked before faiss parses it."""
    inputs_sha256: dict[str, str]
    """Export file (relative path) -> SHA-256 when the index was built: items and weights."""
    build_seconds: float


@dataclass
class AnnIndex:
    """A loaded index: ``search`` returns item indices (1..N), best first."""

    index: object  # faiss.IndexIVFFlat
    meta: AnnMeta

    @property
    def num_items(self) -> int:
        return self.meta.num_items

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> np.ndarray:
        """Item indices (B, k) of the ``k`` best candidates of each query (B, D); -1 is
        returned by faiss as 0 here (padding: callers drop it)."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.meta.nprobe))
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32),
                                   min(k, self.num_items), params=params)  # index not mutated
        return ids + 1  # faiss id -1 (not found) -> 0 (padding)


def default_params(num_items: int) -> tuple[int, int]:
    """(nlist, nprobe) for a catalog of ``num_items``: ~2 sqrt(N) cells, ~1.5% of them (>= 16)
    scanned: recall@10 >= 0.95 on clustered vectors up to 1M items (``bench/scale_serving``)."""
    nlist = max(1, min(num_items // 39, int(round(2 * math.sqrt(num_items)))))
    return nlist, min(nlist, max(16, math.ceil(nlist * 0.015)))


def build_index(vectors: np.ndarray, nlist: int | None = None, nprobe: int | None = None,
                seed: int = 0, train_per_cell: int = 39) -> tuple[object, dict[str, float | int]]:
    """An IVF-Flat inner-product index over ``vectors`` (N, D) (faiss id i = row i) and its
    parameters. k-means trains on at most ``train_per_cell`` * nlist rows (seeded sample)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    d_nlist, d_nprobe = default_params(n)
    nlist, nprobe = nlist or d_nlist, nprobe or d_nprobe
    started = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = min(n, train_per_cell * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    index.train(x[rows])
    index.add(x)
    index.nprobe = nprobe  # the default of a plain ``index.search``
    return index, {"nlist": nlist, "nprobe": nprobe,
                   "build_seconds": round(time.perf_counter() - started, 3)}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def input_files(platform: str) -> list[str]:
    """Export files (relative) an index of ``platform`` depends on."""
    return [f"items/{platform}.safetensors", "model.safetensors"]


def save_index(root: Path, platform: str, vectors: np.ndarray, **params: int) -> AnnMeta:
    """Build and write ``ann/<platform>.{faiss,json}`` under the export directory ``root``
    (whose item and weight files must already be written) from item vectors (N, D)."""
    import faiss

    index, built = build_index(vectors, **params)
    out = root / ANN_DIR
    out.mkdir(exist_ok=True)
    data = faiss.serialize_index(index)  # a uint8 numpy array, faiss's binary format
    (out / f"{platform}.faiss").write_bytes(data.tobytes())
    meta = AnnMeta(nlist=int(built["nlist"]), nprobe=int(built["nprobe"]),
                   num_items=int(vectors.shape[0]), dim=int(vectors.shape[1]),
                   index_sha256=hashlib.sha256(data.tobytes()).hexdigest(),
                   inputs_sha256={f: sha256_file(root / f) for f in input_files(platform)},
                   build_seconds=float(built["build_seconds"]))
    (out / f"{platform}.json").write_text(meta.model_dump_json(indent=2) + "\n")
    return meta


def load_index(root: Path, platform: str, num_items: int, dim: int) -> AnnIndex:
    """The index of ``platform`` in the export at ``root``, refused (:class:`AnnError` naming
    the file) when its bytes, its inputs, its item count or its dimension do not match."""
    import faiss

    meta_file = root / ANN_DIR / f"{platform}.json"
    index_file = root / ANN_DIR / f"{platform}.faiss"
    try:
        meta = AnnMeta.model_validate_json(meta_file.read_text())
    except FileNotFoundError:
        raise AnnError(f"{meta_file}: missing") from None
    except (OSError, UnicodeDecodeError, ValidationError) as e:
        raise AnnError(f"{meta_file}: not a valid index description ({e})") from None
    for rel, expected in meta.inputs_sha256.items():
        if rel not in input_files(platform):
            raise AnnError(f"{meta_file}: unexpected input {rel!r}")
        if not (root / rel).exists() or sha256_file(root / rel) != expected:
            raise AnnError(f"{index_file}: stale: built from another {rel} (re-export)")
    if meta.num_items != num_items or meta.dim != dim:
        raise AnnError(f"{index_file}: built for {meta.num_items} items of dim {meta.dim}, the "
                       f"catalog has {num_items} of dim {dim} (re-export)")
    try:
        data = index_file.read_bytes()
    except OSError as e:
        raise AnnError(f"{index_file}: unreadable ({e})") from None
    if hashlib.sha256(data).hexdigest() != meta.index_sha256:
        raise AnnError(f"{index_file}: SHA-256 differs from {meta_file.name} (tampered or "
                       "truncated)")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise AnnError(f"{index_file}: not a faiss index ({e})") from None
    if index.ntotal != num_items or index.d != dim:
        raise AnnError(f"{index_file}: holds {index.ntotal} vectors of dim {index.d}, "
                       f"expected {num_items} of dim {dim}")
    return AnnIndex(index, meta)

