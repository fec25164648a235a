"""Serving stages: ``deploy`` the Serve app with every target's champion (one model per
platform, ``models:/<name>-{platform}@champion``), then ``smoke`` it with one real request per
target. Replicas follow later promotions by themselves (they poll each alias), so a new
champion does not need a redeploy, nor does a platform added later."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recsys.data.pseudonym import KEY_ENV, KEY_FILE_ENV
from recsys.pipeline.context import Context, tracking_uri
from recsys.pipeline.outputs import DeployOutput, SmokeOutput
from recsys.pipeline.state import hash_tree

API_KEY_FILE = Path(".recsys") / "api_keys"
"""The demo's API key file (made on the first deploy with ``auth: api_key``)."""
SERVE_PSEUDONYM_KEY = Path(".recsys") / "serve-pseudonym.key"
"""Where a pseudonym key given as ``$RECSYS_PSEUDONYM_KEY`` is written for the replicas."""


def stage_deploy(ctx: Context) -> None:
    """Deploy the Serve app (serve/config.yaml) serving every target's champion."""
    import os

    from ray import serve

    from recsys.cluster import LOOPBACK, init_ray
    from recsys.logs import route_library_loggers
    from recsys.serving.app import AppArgs, compose
    from recsys.serving.deploy import (
        deployment_options,
        load_serve_config,
        secret_file,
        with_env_vars,
    )
    from recsys.tracking import registry

    t, d = ctx.cfg.transfer, ctx.cfg.deploy
    assert t is not None  # PipelineConfig refuses the stage without its section
    uri = tracking_uri()
    champions = {target: registry.alias_version(uri, ctx.cfg.model_name(target),
                                                 registry.CHAMPION) for target in t.targets}
    missing = [ctx.cfg.model_name(p) for p, v in champions.items() if v is None]
    if missing:
        raise RuntimeError(f"{missing} have no @champion yet: run the register stage first")
    # One model per platform, each its own champion (recsys/serving/slots.py).
    model_uri = f"models:/{ctx.cfg.model_name('{platform}')}@champion"
    tiers = ("Recommender", "Gateway")
    serve_cfg = load_serve_config(d.config, deployments=tiers)  # Ray's schema, no unknown keys
    app_cfg = serve_cfg.applications[0]
    port = d.port or serve_cfg.http_options.port
    lake = Path(ctx.cfg.data.lake).resolve()
    # The impression/feedback log goes beside this pipeline's lake (runs/demo/feedback for the
    # demo), unless deploy.args names its own directory; null in serve/config.yaml keeps it off.
    feedback = {**app_cfg.args.get("feedback", {}), **d.args.get("feedback", {})}
    if feedback.get("dir") and "dir" not in d.args.get("feedback", {}):
        feedback["dir"] = str(lake.parent / "feedback")
    args = AppArgs.model_validate({**app_cfg.args, **d.args, "model_uri": model_uri,
                                   "platforms": list(t.targets), "lake": str(lake),
                                   "tracking_uri": uri, "feedback": feedback})
    # Secrets reach the replicas as 0600 files whose paths (never the secrets: the dashboard
    # shows a runtime_env) go into their environment. Without a key the demo makes one.
    if args.auth == "api_key":
        key_file, made = secret_file(Path(args.api_key_file or API_KEY_FILE).resolve())
        args = args.model_copy(update={"api_key_file": str(key_file)})
        if made:
            print(f"API key created in {key_file} (send it as the x-api-key header)")
    env = {}
    if os.environ.get(KEY_ENV):  # the key that pseudonymised the lake, given in this process
        path, _ = secret_file(SERVE_PSEUDONYM_KEY.resolve(), os.environ[KEY_ENV])
        env[KEY_FILE_ENV] = str(path)
    elif os.environ.get(KEY_FILE_ENV):
        env[KEY_FILE_ENV] = str(Path(os.environ[KEY_FILE_ENV]).resolve())
    configured = {tier: deployment_options(app_cfg, tier) for tier in tiers}
    options = {tier: with_env_vars(opts, env) for tier, opts in configured.items()}
    started = time.perf_counter()
    init_ray(num_cpus=ctx.cfg.ray.num_cpus)
    route_prefix = app_cfg.route_prefix or "/"
    prefix = route_prefix.rstrip("/")
    url = f"http://{LOOPBACK}:{port}{prefix}"
    key = "deploy"
    inputs = {"args": args.model_dump(mode="json"), "options": configured, "port": port,
              "env": env,
              "champions": champions, "serve_config": hash_tree(d.config)}
    gone = None if _app_running(app_cfg.name) else f"app {app_cfg.name!r} not running"
    if ctx.needed(key, "deploy", inputs, [], DeployOutput, also=gone):
        serve.start(http_options={"host": LOOPBACK, "port": port})
        serve.run(compose(args, options["Recommender"], options["Gateway"]),
                  name=app_cfg.name, route_prefix=route_prefix)
        route_library_loggers()  # Serve's driver-side logger, to the job's log file
        ctx.finish(key, DeployOutput(url=url, model=model_uri,
                                     versions={p: str(v) for p, v in champions.items()},
                                     app=app_cfg.name, api_key_file=args.api_key_file),
                   time.perf_counter() - started)
        served = ", ".join(f"{p} v{v}" for p, v in champions.items())
        print(f"deployed {app_cfg.name} serving {model_uri} ({served}) at {url}")
    ctx.result.deploy = ctx.recorded(key, DeployOutput).output


def _app_running(name: str) -> bool:
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001  (no Serve instance on this cluster yet)
        return False
    return app is not None and str(app.status).endswith("RUNNING")


def stage_smoke(ctx: Context) -> None:
    """One real request per target to the endpoint: a user history from the test split."""

    import requests

    from recsys.data.examples import load_example_set
    from recsys.serving.schemas import RecommendResponse

    deployed = ctx.result.deploy
    if deployed is None:
        raise RuntimeError("smoke needs the deploy stage in the same run")
    t = ctx.cfg.transfer
    assert t is not None  # PipelineConfig refuses the stage without its section
    es = load_example_set(ctx.cfg.data.examples)
    url, deadline = deployed.url, time.monotonic() + ctx.cfg.smoke.timeout_s
    headers = {"x-api-key": key} if (key := _client_key(deployed.api_key_file)) else {}
    with requests.Session() as client:
        client.headers.update(headers)
        while True:
            try:
                if client.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except requests.ConnectionError:
                pass  # the proxy is still starting
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/readyz not ready after {ctx.cfg.smoke.timeout_s}s")
            time.sleep(1)
        answers = {}
        for target in t.targets:  # every platform answers, each from its own champion
            history = _test_history(es, target)
            r = client.post(f"{url}/recommend", json={"platform": target,
                                                       "recent_items": history,
                                                       "k": ctx.cfg.smoke.k}, timeout=60)
            r.raise_for_status()
            answers[target] = (history, RecommendResponse.model_validate(r.json()))
    target = t.targets[0]
    history, body = answers[target]
    ctx.result.smoke = SmokeOutput(platform=target, recent_items=history, response=body)
    for target, (history, body) in answers.items():
        print(f"smoke: POST {url}/recommend {{platform: {target}, recent_items: {history}}} -> "
              f"{body.source} v{body.model_version}: "
              + "; ".join(f"{it.title} ({it.score:.3f})" for it in body.items[:3]))


def _test_history(es: Any, target: str) -> list[str]:
    """The last five items (ids) of the first test user of ``target``, oldest first."""
    import pyarrow.parquet as pq

    table = pq.read_table(es.split_path("test"), filters=[("platform", "==", target)],
                          columns=["history"])
    catalog = pq.read_table(es.path / "catalog" / f"{target}.parquet",
                            columns=["item_idx", "item_id"]).to_pydict()
    ids = dict(zip(catalog["item_idx"], catalog["item_id"], strict=True))
    return [ids[i] for i in table.column("history")[0].as_py()][-5:]


def _client_key(key_file: str | None) -> str | None:
    """A key the smoke request can send: the endpoint's first key (None: ``auth: none``)."""
    from recsys.serving.access import load_keys

    keys = load_keys(key_file, "RECSYS_API_KEY") if key_file else []
    return keys[0].secret if keys else None
