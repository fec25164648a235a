#!/usr/bin/env python
"""Benchmark: the recommendation endpoint on Ray Serve under HTTP load (CPU, loopback).

What it measures, on the demo's transfer model (``runs/demo/train/transfer-freeze_encoder-shop_c/
export``, which serves shop_c and its pretrain shops, + ``runs/demo/lake``; run ``make demo``
first, or name another ``--export``/``--lake``) or, with ``--toy`` (also when that export is
missing), on the untrained toy world of ``recsys.serving.toy``:

1. **In-process Predictor** time for the same requests (one thread, as a replica): the floor.
2. **HTTP latency and throughput**, one replica, closed-loop clients (asyncio + aiohttp) at
   concurrency 1, 8, 32, 64 for a fixed duration each: p50/p95/p99, requests/s, errors; with
   ``@serve.batch`` (max 16 per user-tower call) and without (max_batch_size 1). Serve overhead =
   HTTP percentile - in-process percentile; above concurrency 1 the latency is mostly queueing
   (Little's law: concurrency / throughput), reported beside it.
3. **Autoscaling**: the autoscaling_config of serve/config.yaml, a load step (idle -> 32 clients
   -> 1 client); replicas over time show the upscale and the later downscale.
   The same load against a **no-op FastAPI deployment** with the same options (answers a
   constant, no model) is Serve's own floor on this machine: the proxy, the replica's ASGI path
   and the load generator, with nothing of ours in it; and against a no-op of the shipped
   two-tier layout (gateway -> handle -> model deployment), the floor with the extra hop.
4. **A model replica killed mid-load** (``ray.kill`` of a model replica actor, 2 replicas,
   16 clients): failed requests counted, with the gateway's retries off and on.

The load generator runs on the same 2 cores as Serve, so every figure includes its cost. Writes
``bench/results/serve.json`` and ``serve.md``. Usage::

    flock /tmp/recsys-ray.lock .venv/bin/python bench/serve.py            # ~8 minutes
    flock /tmp/recsys-ray.lock .venv/bin/python bench/serve.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform as pyplatform
import random
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
APP = "recsys-bench"
DEMO_EXPORT = REPO / "runs/demo/train/transfer-freeze_encoder-shop_c/export"
DEMO_LAKE = REPO / "runs/demo/lake"
log = logging.getLogger("bench.serve")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(lat_ms: list[float], errors: int, seconds: float) -> dict[str, float]:
    return {"requests": len(lat_ms), "errors": errors, "seconds": round(seconds, 2),
            "rps": round(len(lat_ms) / seconds, 1), "p50_ms": round(pct(lat_ms, 50), 2),
            "p95_ms": round(pct(lat_ms, 95), 2), "p99_ms": round(pct(lat_ms, 99), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- requests -------------------------------------------------------------------------------------


def make_requests(predictor: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
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


def in_process(predictor: Any, bodies: list[dict[str, Any]]) -> dict[str, Any]:
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
    lat, errors, took, codes = asyncio.run(
        _closed_loop(url, bodies, concurrency, seconds, headers or {}))
    return {"concurrency": concurrency, **summary(lat, errors, took), "error_codes": codes}


# -- Serve ----------------------------------------------------------------------------------------


def shown_path(path: Path) -> str:
    """A path as the report shows it: from its ``runs/`` folder on (no machine's directories)."""
    parts = path.parts
    return str(Path(*parts[parts.index("runs"):])) if "runs" in parts else path.name


def redacted(options: dict[str, Any]) -> dict[str, Any]:
    """Deployment options for the report: environment variable names only (the pseudonym key
    or its file's path must not land in a results file)."""
    actor = dict(options["ray_actor_options"])
    env = actor.get("runtime_env", {}).get("env_vars", {})
    actor["runtime_env"] = {**actor.get("runtime_env", {}), "env_vars": dict.fromkeys(env, "<set>")}
    return {**options, "ray_actor_options": actor}


def noop_app(deployment_opts: dict[str, Any]) -> Any:
    """A FastAPI ingress that answers /recommend with a constant: Serve's floor here."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Noop")
    @serve.ingress(api)
    class Noop:
        @api.post("/recommend")
        async def recommend(self, body: dict) -> dict:
            return {"items": [], "source": "noop"}

        @api.get("/readyz")
        def readyz(self) -> dict:
            return {"status": "ready"}

    opts = {k: v for k, v in deployment_opts.items() if k != "ray_actor_options"}
    return Noop.options(**opts, ray_actor_options={
        k: v for k, v in deployment_opts["ray_actor_options"].items() if k != "runtime_env"}).bind()


def noop_two_tier_app(model_opts: dict[str, Any], gateway_opts: dict[str, Any]) -> Any:
    """The no-op floor of the shipped layout: a FastAPI gateway that awaits a handle call to a
    model deployment answering a constant (what the extra hop costs, with nothing of ours)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="NoopModel")
    class NoopModel:
        async def recommend(self, body: dict) -> dict:
            return {"items": [], "source": "noop"}

    @serve.deployment(name="NoopGateway")
    @serve.ingress(api)
    class NoopGateway:
        def __init__(self, model: Any) -> None:
            self.model = model

        @api.post("/recommend")
        async def recommend(self, body: dict) -> dict:
            return await self.model.recommend.remote(body)

        @api.get("/readyz")
        def readyz(self) -> dict:
            return {"status": "ready"}

    def plain(opts: dict[str, Any]) -> dict[str, Any]:
        return {**opts, "ray_actor_options": {k: v for k, v in opts["ray_actor_options"].items()
                                              if k != "runtime_env"}}

    return NoopGateway.options(**plain(gateway_opts)).bind(
        NoopModel.options(**plain(model_opts)).bind())


def deploy(args_dict: dict[str, Any], model_opts: dict[str, Any],
           gateway_opts: dict[str, Any], port: int) -> None:
    from ray import serve

    from recsys.serving.app import AppArgs, compose

    serve.run(compose(AppArgs(**args_dict), model_opts, gateway_opts), name=APP,
              route_prefix="/")
    wait_ready(f"http://127.0.0.1:{port}/readyz")


def wait_ready(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready in {timeout} s")
        time.sleep(0.5)


def running_replicas() -> int:
    from ray import serve

    st = serve.status().applications[APP].deployments["Recommender"]
    return int(st.replica_states.get("RUNNING", 0))


def replica_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#Recommender#")]


def autoscale_step(url: str, bodies: list[dict[str, Any]], high: int, high_s: float,
                   low_s: float) -> dict[str, Any]:
    timeline: list[dict[str, float]] = []
    stop = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            timeline.append({"t": round(time.perf_counter() - started, 1),
                             "replicas": running_replicas()})
            stop.wait(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    time.sleep(3)
    phase_high = load(url, bodies, high, high_s)
    phase_low = load(url, bodies, 1, low_s)
    stop.set()
    th.join()
    peak = max(p["replicas"] for p in timeline)
    up_at = next((p["t"] for p in timeline if p["replicas"] > 1), None)
    end_high = 3 + phase_high["seconds"]
    down_at = next((p["t"] for p in timeline if p["t"] > end_high and p["replicas"] < peak),
                   None)
    return {"timeline": timeline, "high": phase_high, "low": phase_low, "peak_replicas": peak,
            "first_upscale_s": up_at, "load_drop_s": round(end_high, 1),
            "first_downscale_s": down_at, "final_replicas": timeline[-1]["replicas"]}


def kill_test(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float,
              kill_after: float) -> dict[str, Any]:
    import ray

    names = replica_actors()
    killed: dict[str, Any] = {}

    def killer() -> None:
        time.sleep(kill_after)
        victim = names[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed.update({"actor": victim, "at_s": kill_after})

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res = load(url, bodies, concurrency, seconds)
    th.join()
    total = res["requests"] + res["errors"]
    return {**res, "replicas_before": len(names), "killed": killed,
            "failed_fraction": res["errors"] / max(total, 1),
            "replicas_after": running_replicas()}


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    ap.add_argument("--toy", action="store_true", help="toy world instead of the demo model")
    ap.add_argument("--export", type=Path, default=DEMO_EXPORT, help="model export to serve")
    ap.add_argument("--lake", type=Path, default=DEMO_LAKE, help="lake with the users' events")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY_FILE", str(REPO / ".recsys" / "pseudonym.key"))
    dur = 3.0 if opts.quick else 8.0
    conc = [1, 8, 32, 64]

    from recsys.serving.predictor import Predictor

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if opts.toy or not (opts.export / "export.json").is_file():
        from recsys.data.pseudonym import Pseudonymizer
        from recsys.serving.toy import build_toy_world

        os.environ["RECSYS_PSEUDONYM_KEY"] = "00112233445566778899aabbccddeeff"
        world = build_toy_world(tmp / "toy", "bundled:all-MiniLM-L6-v2",
                                Pseudonymizer(bytes.fromhex(os.environ["RECSYS_PSEUDONYM_KEY"])))
        export, lake, model_name = world.export, world.lake, "toy (untrained)"
    else:
        export, lake = opts.export.resolve(), opts.lake.resolve()
        model_name = f"{export.parent.name} ({shown_path(export)})"
    t = time.perf_counter()
    predictor = Predictor.from_export(export, lake, search=False)
    load_s = time.perf_counter() - t
    bodies = make_requests(predictor, 300 if opts.quick else 1000)
    inproc = in_process(predictor, bodies)
    print("in-process:", json.dumps(inproc))

    from ray import serve

    from recsys.cluster import init_ray

    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/recommend"
    base_args = {"model_uri": str(export), "lake": str(lake), "search": False,
                 "poll_interval_s": 0, "torch_threads": 1}
    # The shipped deployment options (serve/config.yaml), plus the pseudonym key for the lake.
    cfg = yaml.safe_load((REPO / "serve/config.yaml").read_text())["applications"][0]
    deps = {d["name"]: d for d in cfg["deployments"]}
    dep = deps["Recommender"]
    actor = dict(dep["ray_actor_options"])
    runtime_env = dict(actor.get("runtime_env", {}))
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **{
        k: v for k, v in os.environ.items() if k.startswith("RECSYS_PSEUDONYM")}}
    actor["runtime_env"] = runtime_env
    shipped = {"ray_actor_options": actor, "max_ongoing_requests": dep["max_ongoing_requests"]}
    gw = deps["Gateway"]
    gateway = {k: gw[k] for k in ("ray_actor_options", "max_ongoing_requests", "num_replicas")
               if k in gw}
    results: dict[str, Any] = {"latency": {}, "in_process": inproc,
                               "predictor_load_s": round(load_s, 2),
                               "deployment": redacted(shipped), "gateway": gateway}
    floors = (("floor", noop_app({"num_replicas": 1, **shipped})),
              ("floor_two_tier", noop_two_tier_app({"num_replicas": 1, **shipped}, gateway)))
    for key, app in floors:
        serve.run(app, name=APP, route_prefix="/")
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        load(url, bodies, 8, 2.0)  # warm-up
        results[key] = [load(url, bodies, c, dur) for c in (1, 32)]
        print(key, json.dumps(results[key]))
        serve.delete(APP)
    for mode, mbs in (("batched", 16), ("unbatched", 1)):
        deploy({**base_args, "max_batch_size": mbs}, {"num_replicas": 1, **shipped}, gateway,
               port)
        load(url, bodies, 8, 2.0)  # warm-up
        results["latency"][mode] = [load(url, bodies, c, dur) for c in conc]
        print(mode, json.dumps(results["latency"][mode]))
        serve.delete(APP)

    autoscaling = dict(dep["autoscaling_config"])
    deploy({**base_args, **{k: v for k, v in cfg["args"].items()
                            if k in ("max_batch_size", "batch_wait_timeout_s")}},
           {"autoscaling_config": autoscaling, **shipped}, gateway, port)
    results["autoscaling"] = {"config": autoscaling, **autoscale_step(
        url, bodies, 32, 12.0 if opts.quick else 30.0, 15.0 if opts.quick else 45.0)}
    print("autoscaling:", {k: v for k, v in results["autoscaling"].items() if k != "timeline"})
    serve.delete(APP)

    # The same kill with the gateway's retries off (what Serve's proxy alone gives) and on.
    for key, retries in (("replica_kill_no_retry", 0), ("replica_kill", cfg["args"]["retries"])):
        deploy({**base_args, "max_batch_size": 16, "retries": retries},
               {"num_replicas": 2, **shipped}, gateway, port)
        results[key] = {"retries": retries, **kill_test(
            url, bodies, 16, 8.0 if opts.quick else 20.0, 3.0 if opts.quick else 6.0)}
        print(key, json.dumps(results[key]))
        serve.delete(APP)
    serve.shutdown()

    results["meta"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": opts.quick,
        "model": model_name, "catalog_items": {n: c.num_items
                                               for n, c in predictor.catalogs.items()},
        "users_in_store": predictor.history.num_users, "requests_in_mix": len(bodies),
        "cpus": os.cpu_count(), "python": pyplatform.python_version(),
        "loadavg_end": os.getloadavg(), "phase_seconds": dur,
    }
    write(results, opts.out)


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(r, indent=2) + "\n")
    ip = r["in_process"]["single"]
    m = r["meta"]
    lines = [
        "# Serving benchmark (bench/serve.py)", "",
        f"**One run on a shared {m['cpus']}-core CPU machine, loopback HTTP; the load generator "
        f"shares the cores with Serve.** Model: {m['model']}, catalogs {m['catalog_items']}, "
        f"{m['users_in_store']} users in the history store; {m['requests_in_mix']} requests "
        "(60% known users, 30% session items, 10% anonymous), k=10. "
        f"{m['phase_seconds']:.0f} s per load level; 1 replica with serve/config.yaml's options "
        f"({r['deployment']['ray_actor_options'].get('num_cpus')} CPU, max_ongoing_requests "
        f"{r['deployment']['max_ongoing_requests']}), 1 torch thread. "
        f"Date {m['date']}; 1-min load at the end {m['loadavg_end'][0]:.1f}.", "",
        "## In-process Predictor (the floor)", "",
        f"p50 {ip['p50_ms']} ms, p95 {ip['p95_ms']} ms, p99 {ip['p99_ms']} ms per request "
        f"({ip['rps']} req/s on one thread); in a batch of 16: "
        f"{r['in_process']['batched16_ms_per_request']} ms per request. "
        f"Paths: {r['in_process']['sources']}.", "",
        "## HTTP through Serve, one replica", "",
        "| batching | clients | req/s | p50 ms | p95 ms | p99 ms | errors | p50 overhead ms "
        "| p99 overhead ms | Little's law ms |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in r["latency"].items():
        for row in rows:
            little = row["concurrency"] / row["rps"] * 1000 if row["rps"] else float("nan")
            lines.append(
                f"| {mode} | {row['concurrency']} | {row['rps']} | {row['p50_ms']} | "
                f"{row['p95_ms']} | {row['p99_ms']} | {row['errors']} | "
                f"{row['p50_ms'] - ip['p50_ms']:.2f} | {row['p99_ms'] - ip['p99_ms']:.2f} | "
                f"{little:.1f} |")
    b = {row["concurrency"]: row for row in r["latency"]["batched"]}
    u = {row["concurrency"]: row for row in r["latency"]["unbatched"]}
    ratios = ", ".join(f"{c} clients {b[c]['rps'] / u[c]['rps']:.2f}x" for c in b if u[c]["rps"])
    o1 = b[1]["p50_ms"] - ip["p50_ms"]
    o1_99 = b[1]["p99_ms"] - ip["p99_ms"]
    o32 = b[32]["p50_ms"] - ip["p50_ms"]
    o32_99 = b[32]["p99_ms"] - ip["p99_ms"]
    lines += [
        "", f"Batching gain (req/s batched / unbatched): {ratios}.", "",
        "Overhead = HTTP percentile - in-process percentile. At 1 client it is the cost of "
        f"the HTTP proxy, routing and the replica's asyncio path: p50 **{o1:.2f} ms**, p99 "
        f"**{o1_99:.2f} ms**. At 32 clients: p50 **{o32:.2f} ms** (target <= 2 ms: "
        f"{'met' if o32 <= 2 else 'NOT met'}), p99 **{o32_99:.2f} ms** (target <= 10 ms: "
        f"{'met' if o32_99 <= 10 else 'NOT met'}); at that concurrency the latency is mostly "
        "queueing behind one replica on a shared core (compare the Little's-law column, "
        "clients / throughput).", ""]
    if "floor" in r:
        f1, f32 = r["floor"]
        lines += [
            "**Serve's floor on this machine**: the same load against a no-op FastAPI deployment "
            f"(same options, answers a constant): 1 client p50 **{f1['p50_ms']} ms** / p99 "
            f"{f1['p99_ms']} ms ({f1['rps']} req/s); 32 clients {f32['rps']} req/s, p50 "
            f"**{f32['p50_ms']} ms** / p99 {f32['p99_ms']} ms. The recommender's latency above "
            f"that floor: p50 +{b[1]['p50_ms'] - f1['p50_ms']:.2f} ms at 1 client, "
            f"+{b[32]['p50_ms'] - f32['p50_ms']:.2f} ms at 32 (its own {ip['p50_ms']} ms of "
            "model time plus FastAPI validation, history lookup and serialisation)."
            + (" The 2 ms / 10 ms overhead targets at 32 clients are below what an empty "
               "endpoint reaches on these shared cores." if f32["p50_ms"] > 2 else ""), ""]
    if "floor_two_tier" in r:
        t1, t32 = r["floor_two_tier"]
        lines += [
            "The shipped layout is two tiers (a FastAPI gateway awaiting a handle call to the "
            "model deployment, so that a request whose model replica dies is sent again). Its "
            f"no-op floor: 1 client p50 **{t1['p50_ms']} ms** / p99 {t1['p99_ms']} ms "
            f"({t1['rps']} req/s); 32 clients {t32['rps']} req/s, p50 **{t32['p50_ms']} ms** / "
            f"p99 {t32['p99_ms']} ms: the extra hop costs p50 "
            f"+{t1['p50_ms'] - r['floor'][0]['p50_ms']:.2f} ms at 1 client.", ""]
    a = r["autoscaling"]
    tl = " ".join(f"{p['t']:.0f}s:{p['replicas']}" for p in a["timeline"][::3])
    lines += [
        "## Autoscaling (serve/config.yaml's autoscaling_config)", "",
        f"Config {a['config']}. Load step: idle 3 s, 32 clients for {a['high']['seconds']} s "
        f"({a['high']['rps']} req/s, p99 {a['high']['p99_ms']} ms, {a['high']['errors']} "
        f"errors), then 1 client for {a['low']['seconds']} s. Peak replicas "
        f"**{a['peak_replicas']}**, first upscale at {a['first_upscale_s']} s, load dropped at "
        f"{a['load_drop_s']} s, first downscale at {a['first_downscale_s']} s, replicas at the "
        f"end {a['final_replicas']}.", "", f"Replicas over time (every 3 s): {tl}", ""]
    lines += ["## A model replica killed mid-load", "",
              "2 model replicas behind the gateway, 16 clients, `ray.kill` of one model replica "
              "mid-load; the same run with the gateway's own retries off (only Serve's router "
              "re-routing the gateway's handle calls) and on. The previous single-tier layout "
              "(the proxy streaming HTTP straight into the model replica) failed 7 of 1807 "
              "requests (0.387%) in this test: the proxy answers 500 for what was in flight on "
              "the killed replica.", "",
              "| gateway retries | seconds | killed at s | failed / requests | failed % | target "
              "< 0.1% | errors by kind | req/s | p99 ms | replicas after |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("replica_kill_no_retry", "replica_kill"):
        k = r.get(key)
        if not k:
            continue
        lines.append(
            f"| {k.get('retries', 0)} | {k['seconds']} | {k['killed'].get('at_s')} | "
            f"{k['errors']} / {k['requests'] + k['errors']} | "
            f"{100 * k['failed_fraction']:.3f}% | "
            f"{'met' if k['failed_fraction'] < 0.001 else 'NOT met'} | {k['error_codes']} | "
            f"{k['rps']} | {k['p99_ms']} | {k['replicas_after']} |")
    lines.append("")
    (out / "serve.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
