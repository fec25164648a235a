"""``bench/serve.py``'s requests and load: the request mix, the in-process floor, and closed-loop
HTTP clients (asyncio + aiohttp) that report latency percentiles, throughput and errors.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from recsys.serving.predictor import Predictor


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile; NaN for a phase with no successful request."""
    return float(np.percentile(values, q)) if values else float("nan")


def summary(lat_ms: list[float], errors: int, seconds: float) -> dict[str, float]:
    """Requests, errors, throughput and latency percentiles (ms) of one phase."""
    return {"requests": len(lat_ms), "errors": errors, "seconds": round(seconds, 2),
            "rps": round(len(lat_ms) / seconds, 1), "p50_ms": round(pct(lat_ms, 50), 2),
            "p95_ms": round(pct(lat_ms, 95), 2), "p99_ms": round(pct(lat_ms, 99), 2)}


# -- requests -------------------------------------------------------------------------------------


def make_requests(predictor: Predictor, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A fixed mix: 60% known users by raw id (stored history, some only on another platform),
    30% session-only (recent_items), 10% anonymous (popular fallback)."""
    from recsys.data.pseudonym import Pseudonymizer

    rng = random.Random(seed)
    platforms = predictor.platforms
    known = []
    if isinstance(predictor.pseudonymizer, Pseudonymizer):
        for u in range(5000):  # the synthetic source's raw ids are u000000, u000001, ...
            raw = f"u{u:06d}"
            if predictor.history.lookup(predictor.pseudonymizer.one(raw)):
                known.append(raw)
    out = []
    for _ in range(n):
        platform = rng.choice(platforms)
        r = rng.random()
        if r < 0.6 and known:
            out.append({"platform": platform, "user_id": rng.choice(known), "k": 10})
        elif r < 0.9:
            ids = predictor.catalogs[platform].item_ids
            out.append({"platform": platform, "k": 10,
                        "recent_items": rng.sample(ids, rng.randint(3, min(30, len(ids))))})
        else:
            out.append({"platform": platform, "k": 10})
    return out


def in_process(predictor: Predictor, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The same requests straight into the Predictor on one thread (as a replica): the floor
    under every HTTP figure; and per request in a batch of 16."""
    import torch

    from recsys.serving.schemas import RecommendRequest

    torch.set_num_threads(1)
    reqs = [RecommendRequest(**b) for b in bodies]
    for r in reqs[:50]:
        predictor.recommend(r)
    lat = []
    sources: dict[str, int] = {}
    for r in reqs:
        t = time.perf_counter()
        out = predictor.recommend(r)
        lat.append((time.perf_counter() - t) * 1000)
        sources[out.source] = sources.get(out.source, 0) + 1
    batch = [predictor.prepare(r) for r in reqs[:16]]
    t = time.perf_counter()
    for _ in range(20):
        predictor.recommend_many(batch)
    per_req_batched = (time.perf_counter() - t) * 1000 / (20 * 16)
    return {"single": summary(lat, 0, sum(lat) / 1000), "sources": sources,
            "batched16_ms_per_request": round(per_req_batched, 3)}


# -- load generation ------------------------------------------------------------------------------


async def _closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float,
                       headers: dict[str, str]) -> tuple[list[float], int, float, dict[str, int]]:
    import aiohttp

    lat: list[float] = []
    errors = 0
    codes: dict[str, int] = {}
    stop_at = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        j = i
        while time.perf_counter() < stop_at:
            body = bodies[j % len(bodies)]
            j += concurrency
            t = time.perf_counter()
            try:
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    key = str(resp.status)
            except (TimeoutError, aiohttp.ClientError) as e:
                ok, key = False, type(e).__name__
            if ok:
                lat.append((time.perf_counter() - t) * 1000)
            else:
                errors += 1
                codes[key] = codes.get(key, 0) + 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    return lat, errors, time.perf_counter() - started, codes


def load(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``concurrency`` closed-loop clients POST ``bodies`` in turn to ``url`` for ``seconds``."""
    lat, errors, took, codes = asyncio.run(
        _closed_loop(url, bodies, concurrency, seconds, headers or {}))
    return {"concurrency": concurrency, **summary(lat, errors, took), "error_codes": codes}
