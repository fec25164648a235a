"""Vectors of the frozen text encoder, computed once per distinct text, ever.

With a frozen encoder an item's text vector never changes, so encoding it every epoch (or every
run, or for every platform that sells the item) is waste. Vectors are keyed by (encoder
fingerprint, text_hash) and kept as Parquet::

    CACHE/<fingerprint>/encoder.json            what the fingerprint stands for
    CACHE/<fingerprint>/vectors-<id>.parquet    text_hash: string, vector: list<float32>

Each call that computes something appends one new file (written to a temporary name, then
renamed), so readers never see half a file and concurrent writers cannot corrupt each other: at
worst two of them encode the same text twice, and the duplicates are identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from recsys.data.catalog import load_tokenizer, resolve_encoder_path
from recsys.model.encoder import TextEncoder, load_text_encoder
from recsys.model.features import ItemFeatures, token_batch

log = logging.getLogger(__name__)

POOLING = "mean-v1"
"""Part of the fingerprint: change it when TextEncoder's pooling changes."""


def encoder_fingerprint(encoder: str, max_tokens: int) -> str:
    """Short hash of what determines a vector: the encoder's name, config and weights, the
    truncation length and the pooling. Not its location, so copies of a model share a cache.

    The weights are hashed too (about 1 s for MiniLM's 90 MB): a fine-tuned copy of an encoder
    has the same config.json and often the same directory name.
    """
    resolved = resolve_encoder_path(encoder)
    path = Path(resolved)
    h = hashlib.sha256()
    h.update(f"{path.name}\n{max_tokens}\n{POOLING}\n".encode())
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: {encoder!r} is not a transformers "
                                    "model directory")
        h.update(config.read_bytes())
        for weights in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
            with weights.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    else:  # a hub id: its config stands for it (hub revisions are immutable per id + commit)
        from transformers import AutoConfig

        h.update(AutoConfig.from_pretrained(resolved).to_json_string().encode())
    return h.hexdigest()[:16]


def encode_device() -> torch.device:
    """Where one-off catalog encoding runs: this process's GPU if it has one (a GPU head node,
    a single-GPU machine), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TextVectorCache:
    """Frozen-encoder vectors by text hash, on disk; encodes only what is missing."""

    def __init__(self, cache_dir: str | Path, encoder: str, max_tokens: int,
                 text_encoder: TextEncoder | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        """``text_encoder``: an already loaded copy of ``encoder`` (else loaded on first miss).
        ``max_tokens`` must match the example set's ``text.max_tokens`` when token ids from
        ``tokens.parquet`` are passed."""
        self.encoder = encoder
        self.max_tokens = max_tokens
        self.fingerprint = encoder_fingerprint(encoder, max_tokens)
        self.dir = Path(cache_dir) / self.fingerprint
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.hits = 0
        self.misses = 0
        self._text_encoder = text_encoder
        self._index: dict[str, int] = {}
        self._chunks: list[np.ndarray] = []   # vectors in index order, concatenated lazily
        self._load()

    def __len__(self) -> int:
        return len(self._index)

    def _load(self) -> None:
        for f in sorted(self.dir.glob("vectors-*.parquet")):
            self._add(pq.read_table(f))

    def _add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        hashes = table["text_hash"].to_pylist()
        vecs = table["vector"].combine_chunks()
        dim = len(vecs[0])
        mat = vecs.values.to_numpy().astype(np.float32, copy=False).reshape(-1, dim)
        keep = []
        for i, h in enumerate(hashes):
            if h not in self._index:  # duplicates from concurrent writers are identical
                self._index[h] = len(self._index)
                keep.append(i)
        if keep:
            self._chunks.append(mat[keep])

    def _matrix(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]

    def vectors(self, text_hashes: Sequence[str],
                texts_or_tokens: Sequence[str | np.ndarray | Sequence[int]]) -> np.ndarray:
        """Vectors (n, H) float32 in the order of ``text_hashes``.

        ``texts_or_tokens[i]`` belongs to ``text_hashes[i]``: the text (tokenised here) or, better,
        its token ids from ``tokens.parquet``. Only hashes not in the cache are encoded, each
        once. ``hits`` / ``misses`` count distinct hashes found / encoded, summed over calls.
        """
        if len(text_hashes) != len(texts_or_tokens):
            raise ValueError(f"{len(text_hashes)} text hashes but {len(texts_or_tokens)} "
                             "texts/token lists")
        todo: dict[str, str | np.ndarray | Sequence[int]] = {}
        for h, t in zip(text_hashes, texts_or_tokens):
            if h not in self._index and h not in todo:
                todo[h] = t
        hits = len(set(text_hashes)) - len(todo)
        self.hits += hits
        self.misses += len(todo)
        if todo:
            log.info("text vectors (%s): %d cached, %d to encode", self.fingerprint, hits,
                     len(todo))
            self._encode_and_store(list(todo), list(todo.values()))
        if not text_hashes:
            return np.zeros((0, self.dim or 0), np.float32)
        return self._matrix()[[self._index[h] for h in text_hashes]]

    @property
    def dim(self) -> int | None:
        return self._chunks[0].shape[1] if self._chunks else None

    def item_vectors(self, features: ItemFeatures,
                     token_ids: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Text vectors (N+1, H) of a platform's catalog, row 0 (padding) zero: the
        ``text_vecs`` argument of ``Recommender.item_table``. ``token_ids``: from
        ``features.load_token_ids`` (texts are tokenised here where a hash is missing)."""
        token_ids = token_ids or {}
        inputs = [token_ids.get(h, t) for h, t in zip(features.text_hash, features.text)]
        vecs = self.vectors(features.text_hash, inputs)
        return np.concatenate([np.zeros((1, vecs.shape[1]), np.float32), vecs])

    # -- encoding -------------------------------------------------------------------------------

    def _tokens(self, items: list[str | np.ndarray | Sequence[int]]) -> list[np.ndarray]:
        texts = [i for i, x in enumerate(items) if isinstance(x, str)]
        out: list[np.ndarray] = [np.asarray(x, np.int64) if not isinstance(x, str) else
                                 np.zeros(0, np.int64) for x in items]
        if texts:
            tok = load_tokenizer(self.encoder)
            ids = tok([items[i] for i in texts], truncation=True, max_length=self.max_tokens,
                      padding=False)["input_ids"]
            for i, t in zip(texts, ids):
                out[i] = np.asarray(t, np.int64)
        too_long = max((len(t) for t in out), default=0)
        if too_long > self.max_tokens:
            raise ValueError(f"token ids of length {too_long} > max_tokens {self.max_tokens}: "
                             "the cache's max_tokens must equal the example set's "
                             "text.max_tokens")
        return out

    def _encode_and_store(self, hashes: list[str],
                          items: list[str | np.ndarray | Sequence[int]]) -> None:
        tokens = self._tokens(items)
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.encoder)
        enc = self._text_encoder.to(self.device).eval()
        order = np.argsort([len(t) for t in tokens], kind="stable")  # similar lengths together
        out = np.zeros((len(tokens), enc.hidden_size), np.float32)
        with torch.inference_mode(), tqdm(total=len(tokens), desc="encoding item texts",
                                          unit="text", leave=False,
                                          disable=None) as bar:  # None: off when not a terminal
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                input_ids, mask = token_batch([tokens[i] for i in rows])
                vecs = enc(input_ids.to(self.device), mask.to(self.device))    # (b, H)
                out[rows] = vecs.float().cpu().numpy()
                bar.update(len(rows))
        table = pa.table({
            "text_hash": pa.array(hashes, pa.string()),
            "vector": pa.ListArray.from_arrays(
                pa.array(np.arange(0, out.size + 1, out.shape[1], dtype=np.int32)),
                pa.array(out.reshape(-1), pa.float32())),
        })
        self._write(table)
        self._add(table)

    def _write(self, table: pa.Table) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "encoder.json"
        if not meta.exists():
            meta.write_text(json.dumps({"encoder": self.encoder, "max_tokens": self.max_tokens,
                                        "pooling": POOLING}, indent=2) + "\n")
        name = f"vectors-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / name)
