"""The FastAPI side of the endpoint: the app object, API-key auth as a dependency, and the
schema and docs pages behind the key. The Serve deployments that add the routes are in
``recsys/serving/app.py``.

No ``from __future__ import annotations``: FastAPI reads the dependencies' annotations.
"""

import math
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

from recsys.serving.access import ANONYMOUS, Caller, identify
from recsys.serving.http import BodySizeLimit, swagger_assets
from recsys.serving.schemas import ErrorBody

API_KEY_HEADER = "x-api-key"


# -- HTTP plumbing ------------------------------------------------------------------------------

# The schema and the docs page are routes of their own, behind the key (below).
api = FastAPI(
    title="recsys recommendation API",
    version="1",
    description="Cross-platform recommendations and text search over the served model "
                "(the MLflow champion or a local export).",
    docs_url=None, redoc_url=None, openapi_url=None,
)
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                               description="required unless the server runs with auth: none")
ERRORS = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody},
          413: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}}


def caller_of(request: Request, key: str | None) -> Caller | None:
    """The caller of a request (anonymous with ``auth: none``); None: no key matched."""
    state = request.app.state
    if state.auth == "none":
        return Caller(ANONYMOUS)
    return identify(state.keys, key, request.headers.get("authorization"))


def authorize(request: Request,
              key: Annotated[str | None, Depends(api_key_header)] = None) -> Caller:
    """Every endpoint but the health checks: a known key (401 otherwise; the Basic challenge
    lets a browser open /docs with the key as password), within its rate (429)."""
    caller = caller_of(request, key)
    if caller is None:
        raise HTTPException(401, "missing or wrong x-api-key",
                            headers={"WWW-Authenticate": 'Basic realm="recsys"'})
    wait = request.app.state.limiter.wait_s(caller)
    if wait > 0:
        raise HTTPException(429, f"rate limit of key {caller.name!r} exceeded",
                            headers={"Retry-After": str(math.ceil(wait))})
    return caller


Authorized = Annotated[Caller, Depends(authorize)]


def check_platform(caller: Caller, platform: str) -> None:
    if not caller.may_use(platform):
        raise HTTPException(403, f"key {caller.name!r} may not use platform {platform!r}")


# Swagger UI from the installed swagger-ui-bundle, not a CDN: /docs works offline. The assets are
# the public Swagger UI code; the page and the schema need the key.
api.mount("/docs/assets", StaticFiles(directory=swagger_assets()), name="docs-assets")


@api.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
def openapi_schema(request: Request) -> JSONResponse:
    # The app that serves the request: Serve's ingress runs a copy of ``api`` (with the
    # Gateway's routes), not this module's object, whose schema has no paths in a replica.
    return JSONResponse(request.app.openapi())


@api.get("/docs", include_in_schema=False, dependencies=[Depends(authorize)])
def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json", title=f"{api.title} - docs",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png")


api.add_middleware(BodySizeLimit)
