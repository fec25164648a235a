"""Issue 23: the canary over real HTTP. A real Serve app serves ``@champion`` of a real MLflow
registry and sends half of the users to ``@canary``; simulated users click what they like
(POST /feedback); the judge (``recsys.production.canary.run_canary``) reads the gateway's
feedback log and the replica's fallback counts, and promotes or rolls back by itself, with no
failed request throughout.

The simulated users like exactly what the first champion ranks top-k (``recsys.serving.toy``:
untrained but complete exports), so: a challenger that is the same model is promoted; one with
other weights (the shape of a challenger whose item vectors went wrong) shows other items, gets
fewer clicks and is rolled back; one whose weights are truncated never loads, the champion
answers its share, and the fallbacks roll it back."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from recsys.data.pseudonym import Pseudonymizer
from recsys.serving.predictor import Predictor
from recsys.serving.schemas import RecommendRequest
from recsys.serving.toy import PLATFORMS, ToyWorld, build_toy_world

KEY_HEX = "00112233445566778899aabbccddeeff"
API_KEY = "canary-test-key-every-platform"
PREFIX = "/canary"
APP = "recsys-canary"
PLATFORM = "shop_a"
K = 4


@dataclass
class Canaried:
    base: str
    name: str
    uri: str
    root: Path
    feedback_dir: Path
    world: ToyWorld
    liked: Predictor  # what the simulated users like: the first champion's ranking
    statuses: list[int] = field(default_factory=list)

    def post(self, s: requests.Session, path: str, body: object) -> requests.Response:
        r = s.post(self.base + path, json=body, headers={"x-api-key": API_KEY}, timeout=60)
        self.statuses.append(r.status_code)
        return r


def _register(uri: str, name: str, export: Path) -> str:
    from recsys.tracking import runs

    run_id = runs.start_run(uri, "canary-tests", name)
    version = runs.register_model(uri, runs.log_recommender(uri, run_id, export,
                                                            pip_requirements=["recsys"]), name)
    runs.end_run(uri, run_id)
    return version


@pytest.fixture(scope="module")
def canaried(ray_cluster, mlflow_server, tiny_encoder: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canaried]:
    from ray import serve

    from recsys.serving.app import AppArgs, compose
    from recsys.serving.args import FeedbackArgs
    from recsys.serving.canary import CanaryArgs
    from recsys.serving.deploy import secret_file
    from recsys.tracking import registry
    from tests.integration.test_serve import _free_port

    root = tmp_path_factory.mktemp("canary")
    key_file, _ = secret_file(root / "secrets" / "api_keys", f"ops {API_KEY}\n")
    pseudonym_file, _ = secret_file(root / "secrets" / "pseudonym.key", KEY_HEX)
    world = build_toy_world(root / "v1", tiny_encoder, Pseudonymizer(bytes.fromhex(KEY_HEX)))
    name = f"recsys-canary-{uuid.uuid4().hex[:6]}"
    registry.set_alias(mlflow_server.uri, name, "champion",
                       _register(mlflow_server.uri, name, world.export))
    feedback_dir = root / "feedback"
    args = AppArgs(model_uri=f"models:/{name}@champion", lake=str(world.lake),
                   tracking_uri=mlflow_server.uri, poll_interval_s=0.5,
                   reload_backoff_max_s=2.0, download_dir=str(root / "downloads"),
                   api_key_file=str(key_file), rate_limit_per_s=0, search=False,
                   canary=CanaryArgs(share=0.5),
                   feedback=FeedbackArgs(dir=str(feedback_dir), flush_interval_s=0.3))
    env = {"RECSYS_PSEUDONYM_KEY_FILE": str(pseudonym_file)}
    tier = {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}},
            "num_replicas": 1}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(args, model_options=tier, gateway_options=tier), name=APP,
              route_prefix=PREFIX)
    liked = Predictor.from_export(world.export, world.lake, pseudonymizer=world.pseudonymizer,
                                  search=False)
    try:
        yield Canaried(f"http://127.0.0.1:{port}{PREFIX}", name, mlflow_server.uri, root,
                       feedback_dir, world, liked)
    finally:
        serve.shutdown()


def _session(rng: random.Random) -> list[str]:
    n = PLATFORMS[PLATFORM]
    return [ToyWorld.item_id(PLATFORM, rng.randint(1, n)) for _ in range(rng.randint(1, 3))]


def _users(c: Canaried, stop: threading.Event, served_by: list[str], seed: int) -> None:
    """A user asks with a session, clicks the answer's items it likes (the first champion's
    top-k for that session), until ``stop``."""
    rng = random.Random(seed)
    with requests.Session() as s:
        while not stop.is_set():
            session = _session(rng)
            r = c.post(s, "/recommend", {"platform": PLATFORM, "recent_items": session, "k": K})
            if not r.ok:
                continue
            out = r.json()
            served_by.append(out["served_by"])
            liked = {i.item_id for i in c.liked.recommend(RecommendRequest(
                platform=PLATFORM, recent_items=session, k=K)).items}
            for item in out["items"]:
                if item["item_id"] in liked:
                    c.post(s, "/feedback", {"platform": PLATFORM, "request_id": out["request_id"],
                                            "item_id": item["item_id"], "event_type": "click"})


def _canary(c: Canaried, challenger: Path | None, broken: bool = False):  # noqa: ANN202
    """Register ``challenger`` as ``@canary`` (its weights truncated when ``broken``), run
    the users and the judge until it decides; returns (result, versions, arms served)."""
    from recsys.production.canary import (
        CanaryConfig,
        combined,
        feedback_stats,
        run_canary,
        serve_errors,
    )
    from recsys.tracking import registry

    assert challenger is not None
    if broken:
        weights = challenger / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    champion = registry.alias_version(c.uri, c.name, "champion")
    version = _register(c.uri, c.name, challenger)
    since = time.time()
    registry.set_alias(c.uri, c.name, "canary", version)
    stats = combined(lambda: feedback_stats(c.feedback_dir, PLATFORM, champion, version,
                                            since=since), serve_errors(APP, PLATFORM))
    cfg = CanaryConfig(min_impressions=60, margin=0.1, max_error_rate=0.05, poll_s=0.5,
                       timeout_s=240)
    stop, served_by = threading.Event(), []
    users = [threading.Thread(target=_users, args=(c, stop, served_by, seed))
             for seed in range(2)]
    for t in users:
        t.start()
    try:
        result = run_canary(c.uri, c.name, stats, cfg, version=version)
        time.sleep(1.5)  # the replicas follow the aliases under load
    finally:
        stop.set()
        for t in users:
            t.join()
    return result, champion, version, served_by


def test_a_good_challenger_is_canaried_and_promoted(canaried: Canaried,
                                                    tiny_encoder: str) -> None:
    from recsys.tracking import registry

    result, champion, version, served_by = _canary(canaried, canaried.world.export)
    assert result.verdict == "promote", result
    assert result.challenger.impressions >= 60 and result.champion.impressions >= 60
    # every shown item is liked; a click still on its way when the judge read is not counted
    assert result.challenger.ctr > 0.9 and result.challenger.errors == 0
    assert registry.alias_version(canaried.uri, canaried.name, "champion") == version
    assert registry.alias_version(canaried.uri, canaried.name, "canary") is None
    assert {"champion", "challenger"} <= set(served_by)
    assert canaried.statuses and set(canaried.statuses) <= {200, 202}, set(canaried.statuses)
    # After the promotion the replica answers everyone from the new champion.
    r = requests.post(canaried.base + "/recommend", json={"platform": PLATFORM,
                      "recent_items": ["shop_a-001"], "k": K}, headers={"x-api-key": API_KEY},
                      timeout=60).json()
    assert r["model_version"] == version and r["served_by"] == "champion"
    assert champion != version


def test_a_worse_challenger_is_rolled_back(canaried: Canaried, tiny_encoder: str) -> None:
    from recsys.tracking import registry

    other = build_toy_world(canaried.root / "other", tiny_encoder,
                            canaried.world.pseudonymizer, seed=2)
    before = registry.alias_version(canaried.uri, canaried.name, "champion")
    result, _, version, served_by = _canary(canaried, other.export)
    assert result.verdict == "rollback" and "worse by more than 0.1" in result.reason, result
    assert result.challenger.ctr < result.champion.ctr - 0.1
    assert registry.alias_version(canaried.uri, canaried.name, "champion") == before
    assert registry.alias_version(canaried.uri, canaried.name, "canary") is None
    tags = {v.version: v.tags for v in registry.list_versions(canaried.uri, canaried.name)}
    assert tags[version]["role"] == "rejected" and "canary" in tags[version]["decision"]
    assert "challenger" in served_by
    assert set(canaried.statuses) <= {200, 202}, set(canaried.statuses)


def test_a_challenger_that_does_not_load_is_rolled_back_with_no_failed_request(
        canaried: Canaried, tiny_encoder: str) -> None:
    from recsys.tracking import registry

    broken = build_toy_world(canaried.root / "broken", tiny_encoder,
                             canaried.world.pseudonymizer, seed=3)
    before = registry.alias_version(canaried.uri, canaried.name, "champion")
    result, _, version, served_by = _canary(canaried, broken.export, broken=True)
    assert result.verdict == "rollback" and "failed" in result.reason, result
    assert result.challenger.errors > 0 and result.challenger.requests == 0
    assert set(served_by) == {"champion"}  # the champion answered the challenger's share
    assert registry.alias_version(canaried.uri, canaried.name, "champion") == before
    assert registry.alias_version(canaried.uri, canaried.name, "canary") is None
    assert set(canaried.statuses) <= {200, 202}, set(canaried.statuses)
