"""Issue 23: served recommendations are logged as impressions and POST /feedback takes clicks,
over real HTTP to a real local Serve app; the log's files go into a lake through ingest."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from recsys.data import lake
from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.feedback import read_feedback
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer
from recsys.serving.toy import ToyWorld, build_toy_world

KEY_HEX = "00112233445566778899aabbccddeeff"  # the suite's pseudonym key (tests/conftest.py)
API_KEY = "feedback-test-key-every-platform"
SHOP_A_KEY = "feedback-test-key-shop-a-only"
PREFIX = "/fb"


@dataclass
class Served:
    base: str
    world: ToyWorld
    feedback_dir: Path

    def post(self, path: str, body: object, key: str = API_KEY) -> requests.Response:
        return requests.post(self.base + path, json=body, headers={"x-api-key": key},
                             timeout=30)


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_encoder: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from ray import serve

    from recsys.serving.app import AppArgs, compose
    from recsys.serving.args import FeedbackArgs
    from recsys.serving.deploy import secret_file
    from tests.integration.test_serve import _free_port

    root = tmp_path_factory.mktemp("serve-feedback")
    keys = f"ops {API_KEY}\nshop_a-backend {SHOP_A_KEY} shop_a\n"
    key_file, _ = secret_file(root / "secrets" / "api_keys", keys)
    pseudonym_file, _ = secret_file(root / "secrets" / "pseudonym.key", KEY_HEX)
    world = build_toy_world(root / "world", tiny_encoder, Pseudonymizer(bytes.fromhex(KEY_HEX)))
    feedback_dir = root / "feedback"
    args = AppArgs(model_uri=str(world.export), lake=str(world.lake), poll_interval_s=0,
                   search=False, api_key_file=str(key_file), rate_limit_per_s=0,
                   feedback=FeedbackArgs(dir=str(feedback_dir), flush_interval_s=0.3))
    env = {"RECSYS_PSEUDONYM_KEY_FILE": str(pseudonym_file)}
    tier = {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}},
            "num_replicas": 1}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(args, model_options=tier, gateway_options=tier), name="recsys-feedback",
              route_prefix=PREFIX)
    try:
        yield Served(f"http://127.0.0.1:{port}{PREFIX}", world, feedback_dir)
    finally:
        serve.shutdown()


def test_impressions_and_feedback_reach_the_lake(served: Served, tmp_path: Path) -> None:
    answers = []
    for _ in range(3):
        r = served.post("/recommend", {"platform": "shop_a", "user_id": "alice", "k": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["x-recsys-request-id"] == body["request_id"]
        assert body["served_by"] == "champion"
        answers.append(body)
    assert len({a["request_id"] for a in answers}) == 3
    anonymous = served.post("/recommend", {"platform": "shop_a", "recent_items": ["shop_a-003"],
                                           "k": 2}).json()
    first = answers[0]
    click = {"platform": "shop_a", "request_id": first["request_id"], "user_id": "alice",
             "item_id": first["items"][0]["item_id"], "event_type": "click"}
    accepted = served.post("/feedback", click, key=SHOP_A_KEY)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"request_id": first["request_id"], "status": "accepted"}
    assert served.post("/feedback", {**click, "event_type": "like"}).status_code == 422
    assert served.post("/feedback", {**click, "request_id": "x"}).status_code == 422
    assert served.post("/feedback", {**click, "platform": "shop_b"},
                       key=SHOP_A_KEY).status_code == 403
    assert requests.post(served.base + "/feedback", json=click, timeout=10).status_code == 401

    pseudo = served.world.pseudonymizer
    expected = 3 * 4 + len(anonymous["items"]) + 1
    deadline, rows = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        rows = read_feedback(served.feedback_dir, "shop_a", pseudo.fingerprint).to_pylist()
        if len(rows) >= expected:
            break
        time.sleep(0.2)
    assert len(rows) == expected
    shown = [r for r in rows if r["request_id"] == first["request_id"]
             and r["event_type"] == "impression"]
    assert [r["item_id"] for r in sorted(shown, key=lambda r: r["position"])] == [
        i["item_id"] for i in first["items"]]
    assert {r["user_id"] for r in rows} == {pseudo.one("alice"), None}
    assert {r["served_by"] for r in rows if r["event_type"] == "impression"} == {"champion"}
    for f in (served.feedback_dir / "shop_a").iterdir():
        assert b"alice" not in f.read_bytes(), f

    lake_dir = tmp_path / "lake"
    shutil.copytree(served.world.lake, lake_dir)
    before = lake.read_events(lake_dir, "shop_a").num_rows
    (written,) = ingest(IngestOptions(source="feedback", out=lake_dir,
                                      path=served.feedback_dir, platform="shop_a"), pseudo)
    report = written.report["events"]
    assert report["invariant_holds"] and report["rows_quarantined"] == 0
    assert report["filtered_by_rule"] == {"anonymous": len(anonymous["items"])}
    events = lake.read_events(lake_dir, "shop_a").to_pylist()
    assert len(events) == before + 3 * 4 + 1
    mine = [e for e in events if e["user_id"] == pseudo.one("alice")]
    assert sum(e["event_type"] == "impression" for e in mine) == 12
    assert any(e["event_type"] == "click" and e["item_id"] == click["item_id"] for e in mine)
