"""The recommendation endpoint on Ray Serve: a FastAPI gateway in front of a model deployment
around ``recsys.serving.Predictor``.

    HTTP -> Serve proxy -> Gateway (FastAPI: validation, API key, status codes, retries)
        -> handle -> Recommender (Predictor: batching, alias polling; the tier that autoscales)

    serve run serve/config.yaml                                 # the champion, after make demo
    serve run serve/config.yaml model_uri=runs/demo/train/pretrain/export   (see serve/README.md)

``build_app`` is the typed application builder that ``serve run`` / ``serve deploy`` call with the
config's ``args`` (validated into ``AppArgs``). Nothing runs at import time: replicas import this
module, and ``serve run`` imports it in the controller.

No ``from __future__ import annotations`` here: Serve inspects the builder's annotation to
validate ``args`` into ``AppArgs``, and FastAPI reads handler annotations; both need real types.
"""

import asyncio
import logging
import threading
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from recsys.serving.access import Caller, RateLimiter, check_auth, load_keys
from recsys.serving.api import ERRORS, Authorized, api, api_key_header, caller_of, check_platform
from recsys.serving.args import AppArgs, load_predictor, local_path, tracking_uri
from recsys.serving.canary import Canary
from recsys.serving.feedback import open_log
from recsys.serving.metrics import CanaryMetrics, GatewayMetrics, ModelMetrics
from recsys.serving.predictor import (
    Predictor,
    Prepared,
    SearchUnavailable,
    UnknownPlatform,
    set_torch_threads,
)
from recsys.serving.schemas import (
    PLATFORM_PATTERN,
    REQUEST_ID_HEADER,
    FeedbackAccepted,
    FeedbackRequest,
    Health,
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    SearchResponse,
)
from recsys.serving.slots import (
    PLATFORM_FIELD,
    SINGLE_MODEL_ID,
    ModelSlot,
    model_id,
    uri_of,
)

log = logging.getLogger("recsys.serve")

READY_TIMEOUT_S = 5.0


@serve.deployment(name="Recommender", max_ongoing_requests=64)
class Recommender:
    """The model tier: a replica holds up to ``max_models_per_replica`` models, one
    ``ModelSlot`` per platform's champion (``recsys/serving/slots.py``: why Serve's model
    multiplexing), each swapped in place when its own alias moves. Called by the Gateway through
    a handle, never over HTTP; this is the deployment that autoscales with load."""

    def __init__(self, args: AppArgs) -> None:
        self._stop = threading.Event()
        self.args = args
        set_torch_threads(args.torch_threads)
        self._recommend_batch.set_max_batch_size(args.max_batch_size)
        self._recommend_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.metrics = ModelMetrics()  # recsys/serving/metrics.py
        self.canary = Canary(args.canary, lambda model, uri: ModelSlot(
            model, uri, lambda u: load_predictor(self.args, u)), CanaryMetrics().count)
        self.slots: dict[str, ModelSlot] = {}
        self._unknown: dict[str, float] = {}  # platform -> until when it is known not to exist
        async def load(model: str) -> ModelSlot:  # a plain function: Serve keeps its cache on it
            return await self._load_slot(model)

        self._slot = serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)(
            load)
        preload = args.platforms if PLATFORM_FIELD in args.model_uri else [SINGLE_MODEL_ID]
        for model in dict.fromkeys(preload):
            self.slots[model] = self._new_slot(model)
        if args.poll_interval_s > 0:
            threading.Thread(target=self._poll, name="alias-watch", daemon=True).start()

    # -- the models -------------------------------------------------------------------------------

    def _new_slot(self, model: str) -> ModelSlot:
        uri = uri_of(self.args.model_uri, model)
        try:
            return ModelSlot(model, uri,
                             lambda u: self._loaded(model, load_predictor(self.args, u)),
                             lambda name: self.metrics.load_failures.inc(tags={"model": name}))
        except LookupError:  # no such registered model or alias: not a platform we serve
            self._unknown[model] = time.monotonic() + max(self.args.poll_interval_s, 1.0)
            raise UnknownPlatform(model, [m for m in self.slots if m != SINGLE_MODEL_ID]) \
                from None

    def _loaded(self, model: str, predictor: Predictor) -> Predictor:
        """A model loaded (first time or swap): its version per platform it serves here."""
        platforms = predictor.platforms if model == SINGLE_MODEL_ID else [model]
        self.metrics.loaded(platforms, predictor.source.version,
                            {p: c.num_items for p, c in predictor.catalogs.items()})
        return predictor

    def _answered(self, out: RecommendResponse | SearchResponse, predictor: Predictor,
                  started: float) -> None:
        endpoint = "search" if isinstance(out, SearchResponse) else "recommend"
        self.metrics.answered(
            out.platform, "search" if endpoint == "search" else out.source, endpoint,
            [i.item_id for i in out.items], [i.score for i in out.items],
            predictor.catalog(out.platform).num_items, (time.perf_counter() - started) * 1000)

    async def _load_slot(self, model: str) -> ModelSlot:
        """Serve's multiplexing calls this for a model id not in its cache (LRU beyond
        ``max_models_per_replica``); a preloaded or still-held slot is reused."""
        slot = self.slots.get(model)
        if slot is None or slot.retired:
            if self._unknown.get(model, 0.0) > time.monotonic():
                raise UnknownPlatform(model, [m for m in self.slots if m != SINGLE_MODEL_ID])
            slot = await asyncio.to_thread(self._new_slot, model)  # seconds: off the loop
            self.slots[model] = slot
        return slot

    async def _predictor(self, platform: str) -> Predictor:
        return (await self._slot(model_id(self.args.model_uri, platform))).predictor

    def _poll(self) -> None:
        """Every ``poll_interval_s``: each held slot checks its alias (``ModelSlot.poll``)."""
        tracking = tracking_uri(self.args)
        while not self._stop.wait(self.args.poll_interval_s):
            for model, slot in list(self.slots.items()):
                if slot.retired:
                    self.slots.pop(model, None)
                    continue
                slot.poll(tracking, self.args.poll_interval_s, self.args.reload_backoff_max_s)
            self.canary.poll({m: s for m, s in self.slots.items() if not s.retired}, tracking,
                             self.args.poll_interval_s, self.args.reload_backoff_max_s)

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()

    # -- what the gateway calls -------------------------------------------------------------------

    def ready(self) -> Health:
        """``ready`` when every held model serves its alias' version, ``stale`` when one
        serves an older one because the newer failed to load."""
        held = {m: s.status() for m, s in self.slots.items() if not s.retired}
        if not held:
            return Health(status="ready", detail="no model loaded yet: each platform's model "
                                                 "loads on its first request")
        status = "stale" if any(st == "stale" for st, _ in held.values()) else "ready"
        detail = "; ".join(f"{m}: {d}" if m != SINGLE_MODEL_ID else d
                           for m, (_, d) in held.items())
        platforms = sorted({p for s in self.slots.values() for p in s.predictor.platforms})
        return Health(status=status, detail=f"{detail}; platforms {platforms}")

    async def info(self, platform: str) -> ModelInfo:
        return (await self._predictor(platform)).info()

    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """Raises UnknownPlatform (the gateway answers 404). In a canary the platform's
        challenger answers its share of users, the champion when it fails (canary.py)."""
        model = model_id(self.args.model_uri, body.platform)
        predictor = await self._predictor(body.platform)  # one model for the whole request
        challenger = self.canary.route(model, body)
        if challenger is not None:
            try:
                out = await self._recommend_with(challenger.predictor, body, count_errors=False)
                self.canary.answered(model, body.platform, "challenger")
                return out.model_copy(update={"served_by": "challenger"})
            except Exception as e:  # noqa: BLE001 (counted; the champion answers instead)
                self.canary.fell_back(model, body.platform)
                log.warning("challenger of %s failed, the champion answers: %r", model, e)
        out = await self._recommend_with(predictor, body)
        if self.canary.enabled:
            self.canary.answered(model, body.platform, "champion")
        return out

    async def _recommend_with(self, predictor: Predictor, body: RecommendRequest,
                              count_errors: bool = True) -> RecommendResponse:
        started = time.perf_counter()
        try:
            prepared = predictor.prepare(body)
            if self.args.max_batch_size > 1:
                out = await self._recommend_batch((predictor, prepared))
            else:
                out = predictor.recommend_many([prepared])[0]
        except UnknownPlatform:
            raise  # a caller's made-up name: no label for it (the gateway answers 404)
        except Exception:
            if count_errors:
                self.metrics.failed(body.platform)  # a served platform: a bounded label
            raise
        self._answered(out, predictor, started)
        return out

    def canary_stats(self, platform: str) -> dict:
        """This replica's canary counts for ``platform`` (``recsys.production.canary``)."""
        return self.canary.stats(model_id(self.args.model_uri, platform))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _recommend_batch(self, requests: list[tuple[Predictor, Prepared]]
                               ) -> list[RecommendResponse]:
        """One user-tower call per model for every request that arrived together."""
        out: list[RecommendResponse | None] = [None] * len(requests)
        by_model: dict[int, list[int]] = {}
        for i, (p, _) in enumerate(requests):
            by_model.setdefault(id(p), []).append(i)
        for rows in by_model.values():
            predictor = requests[rows[0]][0]
            for i, res in zip(rows, predictor.recommend_many([requests[i][1] for i in rows])):
                out[i] = res
        return out  # type: ignore[return-value]

    async def search(self, body: SearchRequest) -> SearchResponse:
        """Raises UnknownPlatform / SearchUnavailable (the gateway answers 404 / 503)."""
        started = time.perf_counter()
        predictor = await self._predictor(body.platform)
        try:
            out = predictor.search(body)
        except UnknownPlatform:
            raise
        except Exception:  # SearchUnavailable (503) included
            self.metrics.failed(body.platform)
            raise
        self._answered(out, predictor, started)
        return out


@serve.deployment(name="Gateway", max_ongoing_requests=256)
@serve.ingress(api)
class Gateway:
    """The HTTP tier: validation, API key, body limit and status codes; the model work is a
    handle call to a Recommender replica.

    Why two tiers: when a model replica dies (killed, out of memory, its node lost), Serve's
    HTTP proxy answers 500 for the requests it was streaming into that replica (measured: 7 of
    1807 in ``bench/serve.py``'s kill test), while a handle call from this tier is re-routed by
    Serve's router to another (or the restarted) replica. A ``RayActorError`` that still surfaces
    here is sent again, up to ``retries`` times; both endpoints only read, so a repeat is safe.
    Costs one handle hop per request."""

    def __init__(self, args: AppArgs, model: DeploymentHandle) -> None:
        self.args = args
        self.model = model
        self._handles: dict[str, DeploymentHandle] = {}
        key_file = local_path(args.api_key_file) if args.api_key_file else None
        keys = load_keys(key_file, args.api_key_env)
        check_auth(args.auth, keys)  # fails closed: no key and no explicit auth: none
        api.state.auth, api.state.keys = args.auth, keys
        api.state.limiter = RateLimiter(args.rate_limit_per_s)
        api.state.max_body_bytes = args.max_body_bytes
        self.metrics = GatewayMetrics()  # latency per platform, retries, unanswered calls
        self.feedback = open_log(args)  # impressions and /feedback to Parquet; None: off

    def __del__(self) -> None:  # Serve's graceful shutdown: write what the log holds
        if getattr(self, "feedback", None) is not None:
            self.feedback.close()

    def _handle(self, platform: str) -> DeploymentHandle:
        """The model tier's handle routed by ``platform``'s multiplexed model id, made once per
        model id (not per request); at most 256 kept, so that made-up platform names cannot
        grow the cache."""
        model = model_id(self.args.model_uri, platform)
        handle = self._handles.get(model)
        if handle is None:
            if len(self._handles) >= 256:
                self._handles.pop(next(iter(self._handles)))
            handle = self._handles[model] = self.model.options(multiplexed_model_id=model)
        return handle

    async def _call(self, method: str, *call_args: object, caller: Caller | None = None,
                    platform: str | None = None) -> object:
        """The model tier's ``method``; with ``platform``, routed to replicas that hold that
        platform's model (Serve's multiplexed model id)."""
        handle = self.model if platform is None else self._handle(platform)
        for attempt in range(self.args.retries + 1):
            try:
                return await getattr(handle, method).remote(*call_args)
            except RayTaskError as e:  # the replica raised: its own errors become 404 / 503
                if isinstance(e.cause, UnknownPlatform):  # the platforms only to full keys
                    full = caller is not None and caller.authenticated and caller.platforms \
                        is None
                    raise HTTPException(404, str(e.cause) if full else
                                        f"unknown platform {e.cause.args[0]!r}") from None
                if isinstance(e.cause, SearchUnavailable):
                    raise HTTPException(503, f"search unavailable: {e.cause}") from None
                raise
            except RayActorError as e:
                if attempt == self.args.retries:
                    if platform is not None:
                        self.metrics.unavailable(platform)
                    raise HTTPException(503, f"model replicas unavailable after "
                                             f"{attempt + 1} attempts; retry later") from e
                self.metrics.retried.inc(tags={"endpoint": method})
                log.warning("%s: model replica failed (%s); attempt %d of %d", method,
                            type(e).__name__, attempt + 2, self.args.retries + 1)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _timed(self, method: str, body: RecommendRequest | SearchRequest,
                     caller: Caller) -> object:
        """``_call`` timed per platform and endpoint (``recsys_request_ms``)."""
        started, answered = time.perf_counter(), False
        try:
            out = await self._call(method, body, caller=caller, platform=body.platform)
            answered = True
            return out
        finally:
            self.metrics.observe(body.platform, method, started, answered)

    # -- endpoints --------------------------------------------------------------------------------

    @api.get("/healthz", response_model=Health, tags=["health"])
    def healthz(self) -> Health:
        """Liveness: the HTTP tier answers."""
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health}})
    async def readyz(self, request: Request,
                     key: Annotated[str | None, Depends(api_key_header)] = None
                     ) -> Health | JSONResponse:
        """Readiness: a model replica has the model and every platform's item matrix loaded
        (``stale``: it serves, but the newest champion failed to load). What is served, and
        why it is stale, only with a key: an anonymous probe learns no platform or version."""
        try:
            health = await asyncio.wait_for(self._call("ready"), timeout=READY_TIMEOUT_S)
        except (TimeoutError, HTTPException):
            health = Health(status="loading", detail="no model replica answered")
        caller = caller_of(request, key)
        if caller is None or not caller.authenticated:
            health = Health(status=health.status)
        if health.status not in ("ready", "stale"):
            return JSONResponse(health.model_dump(), status_code=503)
        return health

    @api.get("/model", response_model=ModelInfo, responses=ERRORS)
    async def model_info(self, caller: Authorized,
                         platform: Annotated[str | None, Query(pattern=PLATFORM_PATTERN)] = None
                         ) -> ModelInfo:
        """The model that serves ``platform`` (required when each platform has its own)."""
        if platform is None:
            if PLATFORM_FIELD in self.args.model_uri:
                raise HTTPException(422, "each platform has its own model: ask for one "
                                         "with ?platform=<name>")
            platform = SINGLE_MODEL_ID
        else:
            check_platform(caller, platform)
        return await self._call("info", platform, caller=caller, platform=platform)

    @api.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(self, body: RecommendRequest, caller: Authorized,
                        response: Response) -> RecommendResponse:
        """Top-k items for a user on a platform; falls back to popular items without history.
        The answer's ``request_id`` (also its x-recsys-request-id header) is what /feedback
        names."""
        check_platform(caller, body.platform)
        out = await self._timed("recommend", body, caller)
        response.headers[REQUEST_ID_HEADER] = out.request_id
        if self.feedback is not None:  # only a queue put (recsys/serving/feedback.py)
            self.feedback.served(body.user_id, out, self.metrics.platform(body.platform))
        return out

    @api.post("/feedback", status_code=202, response_model=FeedbackAccepted, responses=ERRORS)
    async def feedback_event(self, body: FeedbackRequest, caller: Authorized) -> FeedbackAccepted:
        """A click, cart or purchase of an item of the answer ``request_id``: logged for ingest
        (404 when the app keeps no log, 503 when its queue is full: retry later)."""
        check_platform(caller, body.platform)
        if self.feedback is None:
            raise HTTPException(404, "this app keeps no feedback log (feedback.dir is null)")
        if not self.feedback.feedback(body, self.metrics.platform(body.platform)):
            raise HTTPException(503, "feedback queue full; retry later",
                                headers={"Retry-After": "1"})
        return FeedbackAccepted(request_id=body.request_id)

    @api.post("/search", response_model=SearchResponse, responses=ERRORS)
    async def search(self, body: SearchRequest, caller: Authorized) -> SearchResponse:
        """Items of a platform closest to a text query, in the same space as recommendations."""
        check_platform(caller, body.platform)
        return await self._timed("search", body, caller)


def compose(args: AppArgs, model_options: dict | None = None,
            gateway_options: dict | None = None):  # noqa: ANN201 (serve.Application)
    """Gateway -> Recommender, with deployment options (``.options(...)``) for either tier."""
    model = Recommender.options(**(model_options or {})).bind(args)
    return Gateway.options(**(gateway_options or {})).bind(args, model)


def build_app(args: AppArgs):  # noqa: ANN201  (serve.Application; the annotation must stay a class)
    """Typed application builder: ``import_path: serve.app:build_app`` in serve/config.yaml
    (whose ``deployments`` section sets each tier's options by name)."""
    return compose(args)
