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
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from recsys.config import StrictModel
from recsys.data.pseudonym import DEFAULT_KEY_FILE, KEY_ENV, KEY_FILE_ENV, Pseudonymizer, load_key
from recsys.serving.model_source import is_registry_uri, parse_models_uri, registry_version
from recsys.serving.predictor import (
    Predictor,
    Prepared,
    SearchUnavailable,
    UnknownPlatform,
    set_torch_threads,
)
from recsys.serving.schemas import (
    ErrorBody,
    Health,
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    SearchResponse,
)
from recsys.settings import get_settings

log = logging.getLogger("recsys.serve")

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY_HEADER = "x-api-key"
READY_TIMEOUT_S = 5.0


class AppArgs(StrictModel):
    """The app's ``args`` in serve/config.yaml (or ``serve run ... key=value``)."""

    model_uri: str = Field(
        "models:/recsys-shop_c@champion",
        description="models:/<name>@<alias> / models:/<name>/<version> in the MLflow registry, "
                    "or a training run's export dir (relative paths: to the repo root)")
    lake: str | None = Field("runs/demo/lake", description="lake with the users' events "
                             "(histories, purchases, popular items); null: none")
    tracking_uri: str | None = Field(None, description="MLflow server for models:/ uris "
                                     "(default: $RECSYS_MLFLOW_TRACKING_URI, else the local "
                                     "server the jobs started under runs/mlflow)")
    poll_interval_s: float = Field(30.0, ge=0, description="how often a replica checks the "
                                   "alias for a new version (0: never); swaps without downtime")
    search: bool = Field(True, description="load the text encoder for /search")
    max_batch_size: int = Field(16, ge=1, le=256, description="user-tower batch (1: no "
                                "batching)")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1.0)
    torch_threads: int = Field(1, ge=0, description="intra-op threads per replica (0: torch's "
                               "default)")
    api_key_env: str = Field("RECSYS_API_KEY", description="environment variable holding the "
                             "API key; unset or empty: no key required")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    download_dir: str | None = Field(None, description="where registry models are downloaded "
                                     "(default: a temporary directory)")
    retries: int = Field(2, ge=0, le=5, description="times the gateway repeats a model call "
                         "whose replica died mid-request (reads only, so safe to repeat)")


def local_path(path: str) -> Path:
    """Relative paths in the config mean the repo root (replicas may run elsewhere), unless
    they exist relative to the current directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return REPO_ROOT / p


def tracking_uri(args: AppArgs) -> str | None:
    """The registry to read: the app's ``tracking_uri``, ``$RECSYS_MLFLOW_TRACKING_URI``, else
    the local server that the jobs started (``<work_dir>/mlflow/server.json``), if it is up.
    Never starts a server: a replica must not own the registry."""
    from recsys.tracking.server import default_root, read_detached

    settings = get_settings()
    uri = args.tracking_uri or settings.mlflow_tracking_uri
    if uri:
        return uri
    info = read_detached(local_path(str(default_root(settings))))
    return str(info["uri"]) if info else None


def load_predictor(args: AppArgs) -> Predictor:
    """What a replica serves, from the app args (a registry uri is resolved and downloaded)."""
    tracking = tracking_uri(args)
    lake = local_path(args.lake) if args.lake else None
    pseudonymizer = None
    if lake is not None:
        # The key that pseudonymised the lake: $RECSYS_PSEUDONYM_KEY, $RECSYS_PSEUDONYM_KEY_FILE,
        # else the repo's .recsys/pseudonym.key (a replica's working directory may be elsewhere).
        key_file = None
        if not os.environ.get(KEY_ENV) and not os.environ.get(KEY_FILE_ENV):
            key_file = local_path(str(DEFAULT_KEY_FILE))
        pseudonymizer = Pseudonymizer(load_key(create_if_missing=False, key_file=key_file)[0])
    if is_registry_uri(args.model_uri):
        return Predictor.from_model_uri(args.model_uri, lake, tracking_uri=tracking,
                                        download_dir=args.download_dir, search=args.search,
                                        pseudonymizer=pseudonymizer)
    return Predictor.from_export(local_path(args.model_uri), lake, search=args.search,
                                 pseudonymizer=pseudonymizer)


# -- HTTP plumbing ------------------------------------------------------------------------------

api = FastAPI(
    title="recsys recommendation API",
    version="1",
    description="Cross-platform recommendations and text search over the served model "
                "(the MLflow champion or a local export).",
)
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                               description="required when the server sets an API key")
ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
          503: {"model": ErrorBody}}


def require_api_key(request: Request,
                    key: Annotated[str | None, Depends(_api_key_header)] = None) -> None:
    """Every endpoint but the health checks; the expected key is set by the replica."""
    expected = getattr(request.app.state, "api_key", None)
    if expected and not (key and hmac.compare_digest(key.encode(), expected.encode())):
        raise HTTPException(401, "missing or wrong x-api-key")


class BodySizeLimit:
    """413 for a body over ``max_body_bytes``: checked on Content-Length, else on the bytes read.

    A plain ASGI middleware (Starlette's ``@app.middleware("http")`` wraps every request in
    extra tasks and streams, a few ms per request on 2 cores). Added with ``add_middleware``, it
    reads the limit from the app's state (set by the replica)."""

    def __init__(self, app) -> None:  # noqa: ANN001 (an ASGI app)
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = getattr(scope.get("app"), "state", None)
        limit = getattr(state, "max_body_bytes", None) or 64 * 1024
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > limit:
                return await _too_big(limit, scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # No length declared (chunked): read the body here, then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > limit:
                return await _too_big(limit, scope, receive, send)
        return await self.app(scope, _replay(chunks, receive), send)


def _replay(messages: list[dict], then=None):  # noqa: ANN001, ANN202 (ASGI receive)
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def _too_big(limit: int, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
    await JSONResponse({"detail": f"request body over {limit} bytes"},
                       status_code=413)(scope, receive, send)


api.add_middleware(BodySizeLimit)


@serve.deployment(name="Recommender", max_ongoing_requests=64)
class Recommender:
    """The model tier: one replica holds a Predictor (item matrices computed once at start) and
    swaps it in place when the registry alias moves. Called by the Gateway through a handle,
    never over HTTP; this is the deployment that autoscales with load."""

    def __init__(self, args: AppArgs) -> None:
        self._stop = threading.Event()
        self.args = args
        set_torch_threads(args.torch_threads)
        self.predictor: Predictor = load_predictor(args)
        self._recommend_batch.set_max_batch_size(args.max_batch_size)
        self._recommend_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.served = Counter("recsys_recommendations", description="answered recommendations",
                              tag_keys=("platform", "source"))
        self.latency = Histogram("recsys_predict_ms", description="model time per request",
                                 boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200],
                                 tag_keys=("endpoint",))
        self.swaps = 0
        if args.poll_interval_s > 0 and is_registry_uri(args.model_uri) \
                and parse_models_uri(args.model_uri).alias is not None:
            threading.Thread(target=self._watch_alias, name="alias-watch", daemon=True).start()

    # -- champion changes -------------------------------------------------------------------------

    def _watch_alias(self) -> None:
        """Poll the alias; on a new version load it beside the current predictor, then swap the
        reference: requests keep being answered by the old model until the new one is ready."""
        ref = parse_models_uri(self.args.model_uri)
        name, alias = ref.name, ref.alias
        tracking = tracking_uri(self.args)
        while not self._stop.wait(self.args.poll_interval_s):
            try:
                version = registry_version(ref, tracking)
                if version != self.predictor.source.version:
                    started = time.perf_counter()
                    new = load_predictor(self.args)
                    self.predictor, self.swaps = new, self.swaps + 1
                    log.info("models:/%s@%s -> version %s, swapped in %.1f s", name, alias,
                             new.source.version, time.perf_counter() - started)
            except Exception:  # keep serving the current model; the next poll retries
                log.exception("checking models:/%s@%s failed; still serving version %s", name,
                              alias, self.predictor.source.version)

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()

    # -- what the gateway calls -------------------------------------------------------------------

    def ready(self) -> Health:
        p = getattr(self, "predictor", None)
        if p is None or not p.catalogs:
            return Health(status="loading")
        return Health(status="ready", detail=f"{p.source.name} version {p.source.version}, "
                                             f"platforms {p.platforms}")

    def info(self) -> ModelInfo:
        return self.predictor.info()

    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """Raises UnknownPlatform (the gateway answers 404)."""
        started = time.perf_counter()
        predictor = self.predictor  # one model for the whole request, even across a swap
        prepared = predictor.prepare(body)
        if self.args.max_batch_size > 1:
            out = await self._recommend_batch((predictor, prepared))
        else:
            out = predictor.recommend_many([prepared])[0]
        self.served.inc(tags={"platform": out.platform, "source": out.source})
        self.latency.observe((time.perf_counter() - started) * 1000,
                             tags={"endpoint": "recommend"})
        return out

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

    def search(self, body: SearchRequest) -> SearchResponse:
        """Raises UnknownPlatform / SearchUnavailable (the gateway answers 404 / 503)."""
        started = time.perf_counter()
        out = self.predictor.search(body)
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"endpoint": "search"})
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
        api.state.api_key = os.environ.get(args.api_key_env) or None
        api.state.max_body_bytes = args.max_body_bytes
        self.retried = Counter("recsys_gateway_retries",
                               description="model calls repeated after a replica died",
                               tag_keys=("endpoint",))

    async def _call(self, method: str, *call_args: object) -> object:
        for attempt in range(self.args.retries + 1):
            try:
                return await getattr(self.model, method).remote(*call_args)
            except RayTaskError as e:  # the replica raised: its own errors become 404 / 503
                if isinstance(e.cause, UnknownPlatform):
                    raise HTTPException(404, str(e.cause)) from None
                if isinstance(e.cause, SearchUnavailable):
                    raise HTTPException(503, f"search unavailable: {e.cause}") from None
                raise
            except RayActorError as e:
                if attempt == self.args.retries:
                    raise HTTPException(503, f"model replicas unavailable after "
                                             f"{attempt + 1} attempts; retry later") from e
                self.retried.inc(tags={"endpoint": method})
                log.warning("%s: model replica failed (%s); attempt %d of %d", method,
                            type(e).__name__, attempt + 2, self.args.retries + 1)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- endpoints --------------------------------------------------------------------------------

    @api.get("/healthz", response_model=Health, tags=["health"])
    def healthz(self) -> Health:
        """Liveness: the HTTP tier answers."""
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health}})
    async def readyz(self) -> Health | JSONResponse:
        """Readiness: a model replica has the model and every platform's item matrix loaded."""
        try:
            health = await asyncio.wait_for(self._call("ready"), timeout=READY_TIMEOUT_S)
        except (TimeoutError, HTTPException):
            health = Health(status="loading", detail="no model replica answered")
        if health.status != "ready":
            return JSONResponse(health.model_dump(), status_code=503)
        return health

    @api.get("/model", response_model=ModelInfo, responses=ERRORS,
             dependencies=[Depends(require_api_key)])
    async def model_info(self) -> ModelInfo:
        return await self._call("info")

    @api.post("/recommend", response_model=RecommendResponse, responses=ERRORS,
              dependencies=[Depends(require_api_key)])
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """Top-k items for a user on a platform; falls back to popular items without history."""
        return await self._call("recommend", body)

    @api.post("/search", response_model=SearchResponse, responses=ERRORS,
              dependencies=[Depends(require_api_key)])
    async def search(self, body: SearchRequest) -> SearchResponse:
        """Items of a platform closest to a text query, in the same space as recommendations."""
        return await self._call("search", body)


def compose(args: AppArgs, model_options: dict | None = None,
            gateway_options: dict | None = None):  # noqa: ANN201 (serve.Application)
    """Gateway -> Recommender, with deployment options (``.options(...)``) for either tier."""
    model = Recommender.options(**(model_options or {})).bind(args)
    return Gateway.options(**(gateway_options or {})).bind(args, model)


def build_app(args: AppArgs):  # noqa: ANN201  (serve.Application; the annotation must stay a class)
    """Typed application builder: ``import_path: serve.app:build_app`` in serve/config.yaml
    (whose ``deployments`` section sets each tier's options by name)."""
    return compose(args)
