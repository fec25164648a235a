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
5. **Three platforms, one app** (issue 21; ``--no-platforms`` skips it, ``--platforms-only``
   runs only it and keeps the rest of the recorded ``serve.json``): a throwaway MLflow server
   with a ``@champion`` per platform, the app deployed with
   ``models:/recsys-bench-{platform}@champion`` (Serve's model multiplexing), all champions
   resident and then an LRU of 2 models per replica (reloads counted), against the single
   model in the same run (``serve_platforms.py``).

The load generator runs on the same 2 cores as Serve, so every figure includes its cost. Writes
``bench/results/serve.json`` and ``serve.md``. Usage::

    flock /tmp/recsys-ray.lock .venv/bin/python bench/serve.py            # ~10 minutes
    flock /tmp/recsys-ray.lock .venv/bin/python bench/serve.py --quick    # smoke run, ~5 min

The request mix and the load generator are in ``serve_load.py``, the multi-platform part in
``serve_platforms.py``, the Markdown in ``serve_report.py``; this script deploys, measures and
writes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import platform as pyplatform
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import serve_platforms
from common import REPO, RESULTS, wait_ready
from serve_load import in_process, load, make_requests
from serve_report import render

sys.path.insert(0, str(REPO))
from recsys.cluster import free_port  # noqa: E402  (the repo on the path first)
from recsys.serving.deploy import (  # noqa: E402
    deployment_options,
    load_serve_config,
    with_env_vars,
)

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema

APP = "recsys-bench"
DEMO_EXPORT = REPO / "runs/demo/train/transfer-freeze_encoder-shop_c/export"
DEMO_LAKE = REPO / "runs/demo/lake"
TOY_KEY = "00112233445566778899aabbccddeeff"
TOY_ENCODER = "bundled:all-MiniLM-L6-v2"


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


def unusable(export: Path) -> str | None:
    """Why ``export`` cannot be served by this code (missing, or an older export format, e.g.
    a demo run before the format changed: re-run ``make demo``); None when it can."""
    from recsys.model.export import read_meta

    try:
        read_meta(export)
    except (OSError, ValueError) as e:
        return str(e).replace(str(export.resolve()), "").lstrip("/: ") or type(e).__name__
    return None


def model_under_test(opts: argparse.Namespace) -> tuple[Path, Path, str]:
    """The export and lake to serve, and the model's name for the report: ``--export`` and
    ``--lake`` (the demo's by default), or the untrained toy world under a temporary folder."""
    stale = unusable(opts.export)
    if opts.toy or stale:
        from recsys.data.pseudonym import Pseudonymizer
        from recsys.serving.deploy import secret_file
        from recsys.serving.toy import build_toy_world

        tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        atexit.register(shutil.rmtree, tmp, True)
        # The replicas read the key from a 0600 file: a runtime_env carries its path only.
        os.environ["RECSYS_PSEUDONYM_KEY_FILE"] = str(secret_file(tmp / "pseudonym.key",
                                                                  TOY_KEY)[0])
        # Three shops, so that the multi-platform part has a single model for all three.
        world = build_toy_world(tmp / "toy", TOY_ENCODER, Pseudonymizer(bytes.fromhex(TOY_KEY)),
                                third_platform=True)
        why = "" if opts.toy else f"; {shown_path(opts.export.resolve())} not usable: {stale}"
        return world.export, world.lake, f"toy (untrained{why})"
    export = opts.export.resolve()
    return export, opts.lake.resolve(), f"{export.parent.name} ({shown_path(export)})"


def shipped_options(app: ServeApplicationSchema) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and gateway deployments' options as serve/config.yaml ships them, read with
    Ray's schema (``recsys.serving.deploy``); the model's without its autoscaling (each phase sets
    replicas itself) and with the path of the pseudonym key file, which the lake needs."""
    model = deployment_options(app, "Recommender")
    model.pop("autoscaling_config", None)
    model = with_env_vars(model, {"RECSYS_PSEUDONYM_KEY_FILE":
                                  os.environ["RECSYS_PSEUDONYM_KEY_FILE"]})
    return model, deployment_options(app, "Gateway")


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    ap.add_argument("--toy", action="store_true", help="toy world instead of the demo model")
    ap.add_argument("--export", type=Path, default=DEMO_EXPORT, help="model export to serve")
    ap.add_argument("--lake", type=Path, default=DEMO_LAKE, help="lake with the users' events")
    ap.add_argument("--out", type=Path, default=RESULTS)
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--no-platforms", action="store_true",
                      help="skip part 5 (three platforms, one app)")
    part.add_argument("--platforms-only", action="store_true",
                      help="only part 5; the other parts stay as recorded in serve.json")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY_FILE", str(REPO / ".recsys" / "pseudonym.key"))
    dur = 3.0 if opts.quick else 8.0
    if opts.platforms_only and not (opts.out / "serve.json").is_file():
        ap.error(f"--platforms-only: {opts.out / 'serve.json'} has no recorded run to keep")

    from recsys.serving.predictor import Predictor

    export, lake, model_name = model_under_test(opts)
    t = time.perf_counter()
    predictor = Predictor.from_export(export, lake, search=False)
    load_s = time.perf_counter() - t
    bodies = make_requests(predictor, 300 if opts.quick else 1000)
    inproc = in_process(predictor, bodies)
    print("in-process:", json.dumps(inproc))

    import ray
    from ray import serve

    from recsys.cluster import init_ray

    init_ray(num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Loopback only, so no keys: the benchmark measures the serving path, not key checks.
        base_args = {"model_uri": str(export), "lake": str(lake), "search": False,
                     "poll_interval_s": 0, "torch_threads": 1, "auth": "none",
                     "rate_limit_per_s": 0}
        cfg = load_serve_config(REPO / "serve/config.yaml").applications[0]
        shipped, gateway = shipped_options(cfg)
        if opts.platforms_only:
            results = json.loads((opts.out / "serve.json").read_text())
        else:
            results = {"latency": {}, "in_process": inproc,
                       "predictor_load_s": round(load_s, 2),
                       "deployment": redacted(shipped), "gateway": gateway}
            single_model_parts(results, opts, bodies, base_args, shipped, gateway, cfg, port,
                               dur)
        if not opts.no_platforms:
            toy = None
            if model_name.startswith("toy"):
                from recsys.data.pseudonym import Pseudonymizer

                toy = (Pseudonymizer(bytes.fromhex(TOY_KEY)), TOY_ENCODER)
            results["platforms"] = {**serve_platforms.part(
                APP, port, export, toy, bodies, base_args, dur, opts.quick,
                lambda args: deploy(args, with_env_vars({"num_replicas": 1, **shipped}, {
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}), gateway, port)),
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "quick": opts.quick, "loadavg_end": os.getloadavg()}
    finally:
        serve.shutdown()
        ray.shutdown()
    if opts.platforms_only:
        write(results, opts.out)
        return
    results["meta"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": opts.quick,
        "model": model_name, "catalog_items": {n: c.num_items
                                               for n, c in predictor.catalogs.items()},
        "users_in_store": predictor.history.num_users, "requests_in_mix": len(bodies),
        "cpus": os.cpu_count(), "python": pyplatform.python_version(),
        "loadavg_end": os.getloadavg(), "phase_seconds": dur,
    }
    write(results, opts.out)


def single_model_parts(results: dict[str, Any], opts: argparse.Namespace, bodies: list[dict],
                       base_args: dict[str, Any], shipped: dict[str, Any],
                       gateway: dict[str, Any], cfg: ServeApplicationSchema, port: int,
                       dur: float) -> None:
    """Parts 2-4 on the single model: floors, latency per batching mode, autoscaling, kill."""
    from ray import serve

    url = f"http://127.0.0.1:{port}/recommend"
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
        results["latency"][mode] = [load(url, bodies, c, dur) for c in [1, 8, 32, 64]]
        print(mode, json.dumps(results["latency"][mode]))
        serve.delete(APP)

    autoscaling = dict(deployment_options(cfg, "Recommender")["autoscaling_config"])
    deploy({**base_args, **{k: v for k, v in cfg.args.items()
                            if k in ("max_batch_size", "batch_wait_timeout_s")}},
           {"autoscaling_config": autoscaling, **shipped}, gateway, port)
    results["autoscaling"] = {"config": autoscaling, **autoscale_step(
        url, bodies, 32, 12.0 if opts.quick else 30.0, 15.0 if opts.quick else 45.0)}
    print("autoscaling:", {k: v for k, v in results["autoscaling"].items() if k != "timeline"})
    serve.delete(APP)

    # The same kill with the gateway's retries off (what Serve's proxy alone gives) and on.
    for key, retries in (("replica_kill_no_retry", 0), ("replica_kill", cfg.args["retries"])):
        deploy({**base_args, "max_batch_size": 16, "retries": retries},
               {"num_replicas": 2, **shipped}, gateway, port)
        results[key] = {"retries": retries, **kill_test(
            url, bodies, 16, 8.0 if opts.quick else 20.0, 3.0 if opts.quick else 6.0)}
        print(key, json.dumps(results[key]))
        serve.delete(APP)


def write(r: dict[str, Any], out: Path) -> None:
    """``serve.json`` and ``serve.md`` under ``out``; the report also goes to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(r, indent=2) + "\n")
    report = render(r)
    (out / "serve.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
