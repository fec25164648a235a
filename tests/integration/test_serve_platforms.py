"""One Serve app for every platform, over real HTTP (issue 21): each platform has its own
registered champion (``models:/<name>-{platform}@champion``), routed by Serve's model
multiplexing; one platform's champion swapped under load fails no request and moves no other
platform; a platform registered after the deployment is served without a redeploy; replicas
hold at most ``max_models_per_replica`` models (LRU) and unloading one removes its files."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from recsys.data.pseudonym import Pseudonymizer
from recsys.serving.toy import ToyWorld, build_toy_world

KEY_HEX = "00112233445566778899aabbccddeeff"
API_KEY = "test-api-key-for-every-platform"
PREFIX = "/shops"
PRELOADED = ("shop_a", "shop_b")


@dataclass
class Served:
    base: str
    name: str           # registered models are <name>-<platform>
    tracking_uri: str
    world: ToyWorld
    root: Path

    def post(self, path: str, body: object) -> requests.Response:
        return requests.post(self.base + path, json=body, headers={"x-api-key": API_KEY},
                             timeout=60)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.base + path, headers={"x-api-key": API_KEY}, timeout=60)


def _register(uri: str, name: str, export: Path, champion: bool = True) -> str:
    from recsys.tracking import registry, runs

    run_id = runs.start_run(uri, "serve-platforms", name)
    version = runs.register_model(uri, runs.log_recommender(uri, run_id, export,
                                                            pip_requirements=["recsys"]), name)
    runs.end_run(uri, run_id)
    if champion:
        registry.set_alias(uri, name, "champion", version)
    return version


@pytest.fixture(scope="module")
def served(ray_cluster, mlflow_server, tiny_encoder: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from ray import serve

    from recsys.serving.app import AppArgs, compose
    from recsys.serving.deploy import secret_file

    root = tmp_path_factory.mktemp("platforms")
    key_file, _ = secret_file(root / "secrets" / "api_keys", f"ops {API_KEY}\n")
    pseudonym_file, _ = secret_file(root / "secrets" / "pseudonym.key", KEY_HEX)
    world = build_toy_world(root / "v1", tiny_encoder, Pseudonymizer(bytes.fromhex(KEY_HEX)),
                            third_platform=True)
    name = f"recsys-shops-{uuid.uuid4().hex[:6]}"
    for platform in PRELOADED:  # shop_c is registered later, by a test
        _register(mlflow_server.uri, f"{name}-{platform}", world.export)
    args = AppArgs(model_uri=f"models:/{name}-{{platform}}@champion", platforms=list(PRELOADED),
                   max_models_per_replica=2, lake=str(world.lake),
                   tracking_uri=mlflow_server.uri, poll_interval_s=1.0, reload_backoff_max_s=2.0,
                   download_dir=str(root / "downloads"), api_key_file=str(key_file),
                   rate_limit_per_s=0, search=False)
    env = {"RECSYS_PSEUDONYM_KEY_FILE": str(pseudonym_file)}
    tier = {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}},
            "num_replicas": 1}
    from recsys.cluster import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(args, model_options=tier, gateway_options=tier), name="shops",
              route_prefix=PREFIX)
    try:
        yield Served(f"http://127.0.0.1:{port}{PREFIX}", name, mlflow_server.uri, world, root)
    finally:
        serve.shutdown()


def _answer(served: Served, platform: str) -> dict:
    r = served.post("/recommend", {"platform": platform, "k": 3})
    assert r.status_code == 200, (platform, r.status_code, r.text)
    return r.json()


def test_each_platform_is_served_by_its_own_champion(served: Served) -> None:
    for platform in PRELOADED:
        info = served.get(f"/model?platform={platform}").json()
        assert info["name"] == f"{served.name}-{platform}" and info["version"] == "1"
        body = _answer(served, platform)
        assert body["platform"] == platform and body["model_version"] == "1"
        assert all(i["item_id"].startswith(platform) for i in body["items"])
    assert served.get("/model").status_code == 422  # which platform's model?
    assert served.post("/recommend", {"platform": "shop_q"}).status_code == 404
    ready = served.get("/readyz").json()
    assert ready["status"] == "ready" and all(p in ready["detail"] for p in PRELOADED)


def test_a_platform_registered_later_is_served_without_a_redeploy(served: Served) -> None:
    assert served.post("/recommend", {"platform": "shop_c", "k": 3}).status_code == 404
    _register(served.tracking_uri, f"{served.name}-shop_c", served.world.export)
    deadline = time.monotonic() + 30  # "not a platform" is remembered for poll_interval_s
    while (r := served.post("/recommend", {"platform": "shop_c", "k": 3})).status_code != 200:
        assert r.status_code == 404 and time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert [i["item_id"] for i in r.json()["items"]][:2] == ["shop_c-003", "shop_c-006"]
    assert served.get("/model?platform=shop_c").json()["name"] == f"{served.name}-shop_c"


def test_one_champion_swapped_under_load_moves_only_its_platform(served: Served,
                                                                  tiny_encoder: str) -> None:
    """Three platforms streamed at once by a replica that holds two models (each request may
    unload another platform's model): shop_b's champion moves to v2; no request fails, shop_b
    answers with v2 from then on, shop_a and shop_c stay on v1."""
    from recsys.tracking import registry

    v2 = build_toy_world(served.root / "v2", tiny_encoder, served.world.pseudonymizer, seed=1,
                         third_platform=True)
    version = _register(served.tracking_uri, f"{served.name}-shop_b", v2.export, champion=False)
    seen: dict[str, list[tuple[int, str | None]]] = {p: [] for p in ("shop_a", "shop_b",
                                                                     "shop_c")}
    stop = threading.Event()

    def stream(platform: str) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(served.base + "/recommend", json={"platform": platform, "k": 3},
                               headers={"x-api-key": API_KEY}, timeout=60)
                    seen[platform].append(
                        (r.status_code, r.json().get("model_version") if r.ok else None))
                except requests.RequestException:
                    seen[platform].append((-1, None))

    threads = [threading.Thread(target=stream, args=(p,)) for p in seen]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        registry.set_alias(served.tracking_uri, f"{served.name}-shop_b", "champion", version)
        deadline = time.monotonic() + 60
        while not seen["shop_b"] or seen["shop_b"][-1][1] != version:
            assert time.monotonic() < deadline, "shop_b's new champion not served in 60 s"
            time.sleep(0.5)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    for platform, answers in seen.items():
        assert answers and all(code == 200 for code, _ in answers), (platform, answers[-5:])
    assert {v for _, v in seen["shop_a"]} == {"1"} and {v for _, v in seen["shop_c"]} == {"1"}
    b = [v for _, v in seen["shop_b"]]
    assert b[0] == "1" and b[-1] == version and set(b) == {"1", version}
    # Two models per replica, three platforms: downloads of unloaded models do not pile up.
    held = [p for p in (served.root / "downloads").iterdir() if p.is_dir()]
    assert len(held) <= 3, sorted(p.name for p in held)
