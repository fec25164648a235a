"""HTTP plumbing of the endpoint that is not about recommendations: the body-size guard and
where the Swagger UI assets come from."""

from pathlib import Path

from fastapi.responses import JSONResponse


def swagger_assets() -> Path:
    """Swagger UI's files from the installed ``swagger-ui-bundle`` (no CDN: /docs works
    offline)."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


class BodySizeLimit:
    """413 for a body over ``max_body_bytes``: at once for a declared Content-Length over it,
    and always on the bytes actually read (a client may send more than it declares).

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
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_big(limit, scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here, counting what arrives, then replay it to the app.
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
