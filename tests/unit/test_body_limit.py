"""The endpoint's body-size guard (``recsys.serving.http.BodySizeLimit``, a plain ASGI middleware)
on a tiny echo app, without Ray: 413 on a declared or streamed body over the limit, the body intact
for the app otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def client():  # noqa: ANN201 - a starlette TestClient
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from recsys.serving.http import BodySizeLimit

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body), "head": body[:8].decode()})

    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])
    app.add_middleware(BodySizeLimit)  # as recsys/serving/app.py adds it to the endpoint's app
    app.state.max_body_bytes = 2048
    with TestClient(app) as c:
        yield c


def _chunks(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield bytes([65 + i % 26]) * 256


def test_declared_length_over_the_limit_is_413(client) -> None:  # noqa: ANN001
    r = client.post("/echo", content=b"x" * 2049)
    assert r.status_code == 413 and "2048" in r.json()["detail"]
    r = client.post("/echo", content=b"x" * 2048)
    assert r.status_code == 200 and r.json()["bytes"] == 2048


def test_streamed_body_is_measured_and_replayed(client) -> None:  # noqa: ANN001
    assert client.post("/echo", content=_chunks(9)).status_code == 413  # 2304 bytes
    r = client.post("/echo", content=_chunks(4))  # 1024 bytes, no Content-Length
    assert r.status_code == 200
    assert r.json() == {"bytes": 1024, "head": "AAAAAAAA"}


def test_a_bad_content_length_is_413_not_a_crash(client) -> None:  # noqa: ANN001
    r = client.post("/echo", content=b"{}", headers={"content-length": "abc"})
    assert r.status_code == 413
    assert client.get("/echo").status_code == 200
