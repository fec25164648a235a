"""The serving computation, pure and Ray-free: an export (+ user histories) in, ranked items out.

At load time every platform's catalog goes through the item tower once and is held as one matrix
(N+1, D); a recommendation runs only the user tower on the user's history and one top-k over that
matrix (over an approximate index's candidates for a catalog exported with one), and a search
only the text encoder on the query. The Serve app
(``recsys/serving/app.py``) wraps this class; tests and the benchmark call it directly.

Cross-platform transfer at serving time: the item tower maps every platform's items into one
space, so a user new to platform P but known on Q is served from their Q items, each embedded
with Q's own item table, run through the user tower with P's platform id.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from recsys.data.crossplatform import merge_histories
from recsys.data.lake import check_key
from recsys.data.pseudonym import Pseudonymizer, load_key
from recsys.model.ann import AnnIndex
from recsys.model.export import Exported, load_ann, load_export
from recsys.model.features import category_prefixes, normalise
from recsys.model.history import padded_user_vectors
from recsys.serving.history import HistoryStore, UserHistory
from recsys.serving.model_source import ModelSource, resolve_model
from recsys.serving.retrieval import search_items, top_items
from recsys.serving.rules import (
    QUERY,
    PlatformRules,
    ServingRules,
    explain,
    popular,
    rerank,
)
from recsys.serving.schemas import (
    Item,
    ModelInfo,
    Reason,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    SearchResponse,
)

log = logging.getLogger(__name__)


class UnknownPlatform(KeyError):
    """A request names a platform the model has no catalog for (HTTP 404)."""

    def __init__(self, platform: str, known: Sequence[str]) -> None:
        super().__init__(platform)
        self.known = sorted(known)
        self.message = f"unknown platform {platform!r}; this model serves {self.known}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:
        # Pickled as its constructor arguments: it crosses from a model replica to the gateway.
        return (UnknownPlatform, (self.args[0], self.known))


class SearchUnavailable(RuntimeError):
    """The export names no text encoder that could be loaded (HTTP 503)."""


# -- per-platform catalogs ----------------------------------------------------------------------


@dataclass
class Catalog:
    """One platform's items as the predictor needs them; index i + 1 <-> item_ids[i]."""

    platform: str
    platform_id: int
    item_ids: list[str]
    titles: list[str]
    brands: list[str | None]
    categories: list[list[str] | None]
    index: dict[str, int]               # item id -> item index (1..N)
    table: torch.Tensor                 # (N+1, D) item-tower output, the user tower's input
    scoring: torch.Tensor               # (N+1, D) the same, L2-normalised when the model is
    by_brand: dict[str, np.ndarray]     # normalised brand -> item indices
    by_category: dict[str, np.ndarray]  # normalised category prefix -> item indices
    popular: list[tuple[int, int]] = field(default_factory=list)  # (item index, event count)
    ann: AnnIndex | None = None         # approximate index (export's ann/, large catalogs only)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def _groups(values: list[list[str]]) -> dict[str, np.ndarray]:
    out: dict[str, list[int]] = {}
    for i, keys in enumerate(values, start=1):
        for key in keys:
            out.setdefault(key, []).append(i)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


# -- the predictor ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A recommendation request resolved to tensors, before the user tower runs."""

    request: RecommendRequest
    catalog: Catalog
    seq: torch.Tensor | None             # (L, D) history item vectors, oldest first; None: popular
    history_platforms: list[str]
    excluded: list[int]                  # item indices never to return
    allowed: np.ndarray | None           # item indices allowed by the filters (None: all)
    seen: list[int] = field(default_factory=list)  # this catalog's history item indices
    rules: PlatformRules = field(default_factory=PlatformRules)
    history: list[tuple[str, int]] = field(default_factory=list)  # seq's rows: (platform, index)


class Predictor:
    """Recommend and search over one export; immutable after construction (swap, don't mutate)."""

    def __init__(self, exported: Exported, source: ModelSource,
                 history: HistoryStore | None = None,
                 pseudonymizer: Pseudonymizer | None = None, search: bool = True,
                 rules: ServingRules | None = None, int8_search: bool = False,
                 approximate: bool = True) -> None:
        self.exported = exported
        self.approximate = approximate  # use the export's index where it has one
        self.source = source
        self.model = exported.model.eval()
        self.history = history or HistoryStore()
        self.pseudonymizer = pseudonymizer
        self.max_len = int(self.model.config["max_len"])
        # A model trained on merged cross-platform histories is served merged ones too.
        trained = (exported.meta.train_config or {}).get("data", {}).get("sequences", {})
        self.merge = bool((trained or {}).get("cross_platform", False))
        self.normalize = bool(self.model.config.get("normalize", True))
        started = time.perf_counter()
        self.catalogs = {name: self._catalog(name) for name in exported.items}
        rules = rules or ServingRules()
        self.rules = {name: rules.of(name) for name in self.catalogs}  # a server rule per shop
        if unknown := set(rules.platforms()) - set(self.catalogs):
            log.warning("rules for %s, which this model does not serve", sorted(unknown))
        self.encoder, self.tokenizer, self.search_error = (None, None, None)
        self.int8_search = int8_search  # the query encoder's Linear layers in int8
        if search:
            self._load_text_encoder()
        else:
            self.search_error = "search disabled by configuration"
        log.info("predictor %s: %s catalogs %s ready in %.1f s", source.uri,
                 len(self.catalogs), {n: c.num_items for n, c in self.catalogs.items()},
                 time.perf_counter() - started)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_export(cls, path: str | Path, lake: str | Path | None = None, *,
                    source: ModelSource | None = None, search: bool = True,
                    pseudonymizer: Pseudonymizer | None = None,
                    rules: ServingRules | None = None, int8_search: bool = False,
                    approximate: bool = True) -> Predictor:
        """Load an export directory; ``lake`` supplies user histories and popular items."""
        source = source or resolve_model(str(path))
        exported = load_export(source.export_path)
        history = None
        if lake is not None:
            if pseudonymizer is None:
                key, where = load_key(create_if_missing=False)
                log.info("pseudonym key from %s", where)
                pseudonymizer = Pseudonymizer(key, where)
            # Another key than the lake's would find no user: refuse to start (KeyMismatchError).
            check_key(lake, pseudonymizer, list(exported.items), purpose="serve")
            history = HistoryStore.from_lake(lake, platforms=list(exported.items),
                                             max_len=int(exported.model.config["max_len"]))
        else:
            log.warning("no lake: no user histories, and no popular items for the fallback")
        return cls(exported, source, history, pseudonymizer, search, rules, int8_search,
                   approximate)

    @classmethod
    def from_model_uri(cls, uri: str, lake: str | Path | None = None, *,
                       tracking_uri: str | None = None, download_dir: str | Path | None = None,
                       search: bool = True, pseudonymizer: Pseudonymizer | None = None,
                       rules: ServingRules | None = None, int8_search: bool = False,
                       approximate: bool = True) -> Predictor:
        """A local export path or ``models:/name@alias`` (downloaded from the registry; the
        download is removed again when the export does not load)."""
        source = resolve_model(uri, tracking_uri, download_dir)
        try:
            return cls.from_export(source.export_path, lake, source=source, search=search,
                                   pseudonymizer=pseudonymizer, rules=rules,
                                   int8_search=int8_search, approximate=approximate)
        except BaseException:
            source.discard()
            raise

    @torch.inference_mode()
    def _catalog(self, name: str) -> Catalog:
        it = self.exported.items[name]
        table = self.model.item_table(torch.as_tensor(it.text_vecs),
                                      torch.as_tensor(it.brand_ids),
                                      torch.as_tensor(it.category_ids),
                                      it.platform_id) if it.text_vecs is not None else None
        if table is None:
            raise ValueError(f"{self.exported.path}: items/{name}.safetensors has no text vectors")
        path = self.exported.path / "catalog" / f"{name}.parquet"
        cat = pq.read_table(path, columns=["item_id", "title", "brand", "category"])
        if cat["item_id"].to_pylist() != it.item_ids:
            raise ValueError(f"{path}: item ids differ from items/{name}.json")
        brands = cat["brand"].to_pylist()
        categories = cat["category"].to_pylist()
        index = {item: i + 1 for i, item in enumerate(it.item_ids)}
        popular = [(index[item], n) for item, n in self.history.popular.get(name, [])
                   if item in index]
        return Catalog(
            platform=name, platform_id=it.platform_id, item_ids=it.item_ids,
            titles=cat["title"].to_pylist(), brands=brands, categories=categories, index=index,
            table=table, scoring=F.normalize(table, dim=-1) if self.normalize else table,
            by_brand=_groups([[normalise(b)] if b else [] for b in brands]),
            by_category=_groups([category_prefixes(c, 64) for c in categories]),
            popular=popular, ann=load_ann(self.exported.path, name, it.num_items, table.shape[1])
            if self.approximate else None)

    def _load_text_encoder(self) -> None:
        """Search needs the item tower's text encoder: the fine-tuned one in the export, else
        the frozen encoder named in export.json (its vectors were cached at training)."""
        from recsys.data.catalog import load_tokenizer
        from recsys.model.recommender import load_text_encoder

        name = self.exported.meta.encoder
        if name is None:
            self.search_error = "the export names no text encoder (export.json 'encoder')"
            return
        try:
            self.tokenizer = load_tokenizer(name)
            self.encoder = (self.model.text_encoder if self.model.text_encoder is not None
                            else load_text_encoder(name)).eval()
            if self.int8_search:
                from recsys.serving.quantize import quantize_encoder

                self.encoder = quantize_encoder(self.encoder)
        except (OSError, ValueError) as e:
            self.search_error = f"text encoder {name!r} could not be loaded: {e}"
            log.warning("search unavailable: %s", self.search_error)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def platforms(self) -> list[str]:
        return list(self.catalogs)

    def info(self) -> ModelInfo:
        s = self.source
        return ModelInfo(name=s.name, version=s.version, alias=s.alias, uri=s.uri,
                         export_path=str(s.export_path), platforms=self.platforms,
                         search=self.encoder is not None)

    def catalog(self, platform: str) -> Catalog:
        try:
            return self.catalogs[platform]
        except KeyError:
            raise UnknownPlatform(platform, list(self.catalogs)) from None

    # -- recommend -------------------------------------------------------------------------------

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """One request, end to end (the unbatched path)."""
        return self.recommend_many([self.prepare(request)])[0]

    def prepare(self, request: RecommendRequest) -> Prepared:
        """Resolve the user's history to item vectors and the platform's rules to excluded
        items (the session's, and what the user bought unless the shop allows repurchase);
        raises UnknownPlatform before any work."""
        cat = self.catalog(request.platform)
        rules = self.rules[cat.platform]
        histories = self._histories(request.user_id)
        own = histories.get(cat.platform)
        excluded = {cat.index[i] for i in own.purchased
                    if i in cat.index} if own and not rules.repurchase else set()
        if rules.exclude_session_items:
            excluded.update(cat.index[i] for i in request.recent_items if i in cat.index)
        allowed = self._allowed(cat, request)
        session = [(cat.platform, cat.index[i]) for i in request.recent_items if i in cat.index]
        if self.merge:  # every platform's history, merged by time as in training, then session
            rows = (self._merged(cat.platform, histories) + session)[-self.max_len:]
        else:  # own history and session; the other platforms' only when there is none
            rows = ([(cat.platform, cat.index[i]) for i in (own.items if own else ())
                     if i in cat.index] + session)[-self.max_len:] \
                or self._merged(cat.platform, {p: h for p, h in histories.items()
                                               if p != cat.platform})
        seq = torch.stack([self.catalogs[p].table[i] for p, i in rows]) if rows else None
        return Prepared(request, cat, seq, sorted({p for p, _ in rows}), sorted(excluded),
                        allowed, seen=[i for p, i in rows if p == cat.platform], rules=rules,
                        history=rows)

    def _histories(self, user_id: str | None) -> dict[str, UserHistory]:
        if user_id is None or self.pseudonymizer is None:
            return {}
        return self.history.lookup(self.pseudonymizer.one(user_id))

    def _merged(self, target: str, histories: dict[str, UserHistory]) -> list[tuple[str, int]]:
        """The user's items on every platform the model knows, merged by time as training
        merges them (``merge_histories``), each to be embedded with its own platform's item
        table (one space for all platforms: the point of the item tower)."""
        known = {}
        for p, h in histories.items():
            if p in self.catalogs:
                index = self.catalogs[p].index
                kept = [(index[i], t) for i, t in zip(h.items, h.times_us) if i in index]
                known[p] = ([i for i, _ in kept], [t for _, t in kept])
        items, platforms = merge_histories(target, known, self.max_len)
        return list(zip(platforms, items))

    @staticmethod
    def _allowed(cat: Catalog, request: RecommendRequest) -> np.ndarray | None:
        f = request.filters
        if f is None or (f.brand is None and f.category is None):
            return None
        allowed = np.arange(1, cat.num_items + 1)
        empty = np.zeros(0, np.int64)
        if f.brand is not None:
            allowed = np.intersect1d(allowed, cat.by_brand.get(normalise(f.brand), empty))
        if f.category is not None:
            key = " > ".join(normalise(p) for p in f.category.split(">") if normalise(p))
            allowed = np.intersect1d(allowed, cat.by_category.get(key, empty))
        return allowed

    @torch.inference_mode()
    def user_vectors(self, prepared: Sequence[Prepared]) -> torch.Tensor:
        """User vectors (B, D) of requests that have a history: one user-tower call, histories
        left-padded (positions count from the newest item, so padding changes nothing)."""
        # Each position marked with its item's platform, as in training (own-only: unchanged).
        marks = [[self.catalogs[q].platform_id for q, _ in p.history] for p in prepared]
        return padded_user_vectors(self.model.user_tower, [p.seq for p in prepared],
                                   [p.catalog.platform_id for p in prepared], marks)  # (B, D)

    def recommend_many(self, prepared: Sequence[Prepared]) -> list[RecommendResponse]:
        """A batch of prepared requests: one user-tower call for all that have a history."""
        with_history = [p for p in prepared if p.seq is not None]
        users = iter(self.user_vectors(with_history)) if with_history else iter(())
        version = self.source.version
        out = []
        for p in prepared:
            if p.seq is None:
                items, source = self._popular(p), "popular"
            else:
                items, source = self._top_k(p, next(users)), "model"
            out.append(RecommendResponse(platform=p.catalog.platform, source=source, items=items,
                                         model_version=version))
        return out

    @torch.inference_mode()
    def _top_k(self, p: Prepared, user: torch.Tensor) -> list[Item]:
        """The model's catalog scores (``Recommender.score``: the repeat bias on this catalog's
        items of the user's history, as in training), exclusions and filters applied
        (``retrieval.top_items``: through the catalog's approximate index when it has one)."""
        cat = p.catalog
        top_n = p.rules.rerank_top_n
        idx, values = top_items(self.model, cat.table, cat.ann, user, p.seen, cat.platform_id,
                                max(top_n, p.request.k), p.excluded, p.allowed)
        if top_n:  # two stages: retrieval's top N, re-ordered by the CTR head
            idx, values = rerank(self.model.ctr_logit, user, cat.table[idx], idx, p.request.k)
        # Why: per item, the history item most like it (cosine; O(k L D), once per request),
        # named only when it is this platform's: other shops' items are never named here.
        reasons = explain(cat.platform, cat.titles, cat.item_ids, p.seq, p.history,
                          cat.table[idx]) if p.rules.reasons else [None] * len(idx)
        return [self._item(cat, i, s, r) for i, s, r in zip(idx, values, reasons)]

    def _popular(self, p: Prepared) -> list[Item]:
        excluded = set(p.excluded)
        allowed = None if p.allowed is None else set(p.allowed.tolist())
        reason = popular(p.catalog.platform) if p.rules.reasons else None
        out = []
        for i, count in p.catalog.popular:
            if i in excluded or (allowed is not None and i not in allowed):
                continue
            out.append(self._item(p.catalog, i, float(count), reason))
            if len(out) == p.request.k:
                break
        return out

    @staticmethod
    def _item(cat: Catalog, i: int, score: float, reason: Reason | None = None) -> Item:
        return Item(item_id=cat.item_ids[i - 1], title=cat.titles[i - 1] or "", score=score,
                    brand=cat.brands[i - 1], category=cat.categories[i - 1], reason=reason)

    # -- search ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def query_vector(self, platform: str, query: str) -> torch.Tensor:
        """Text query -> the item space of ``platform`` (D,): text encoder -> item tower with
        no brand and no category -> the platform's adapter, as an item of that shop."""
        cat = self.catalog(platform)
        if self.encoder is None or self.tokenizer is None:
            raise SearchUnavailable(self.search_error or "search unavailable")
        max_tokens = self.exported.meta.max_tokens
        tok = self.tokenizer([query], truncation=True, max_length=max_tokens,
                             return_tensors="pt")
        text = self.encoder(tok["input_ids"], tok["attention_mask"])             # (1, H)
        depth = self.exported.items[platform].category_ids.shape[1]
        vec = self.model.item_tower(text, torch.zeros(1, dtype=torch.long),
                                    torch.zeros(1, depth, dtype=torch.long),
                                    torch.tensor([cat.platform_id]))             # (1, D)
        return vec[0]

    @torch.inference_mode()
    def search(self, request: SearchRequest) -> SearchResponse:
        cat = self.catalog(request.platform)
        vec = self.query_vector(request.platform, request.query)
        if self.normalize:
            vec = F.normalize(vec, dim=-1)
        idx, values = search_items(cat.scoring, cat.ann, vec, request.k)
        reason = QUERY if self.rules[cat.platform].reasons else None
        items = [self._item(cat, i, s, reason) for i, s in zip(idx, values)]
        return SearchResponse(platform=cat.platform, query=request.query, items=items,
                              model_version=self.source.version)


def set_torch_threads(n: int | None) -> None:
    """A replica's intra-op threads: on a 2-core machine with several replicas, one each."""
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
