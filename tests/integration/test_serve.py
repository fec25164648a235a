"""The recommendation endpoint over real HTTP: a real local Serve app (one per module) serving the
MLflow champion of a real registry, with user histories from a real lake (``recsys.serving.toy``:
an untrained but complete export, so these tests check the serving rules, not model quality)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from recsys.data.pseudonym import Pseudonymizer
from recsys.serving.predictor import Predictor
from recsys.serving.schemas import RecommendRequest
from recsys.serving.toy import ToyWorld, build_toy_world, item_title

KEY_HEX = "00112233445566778899aabbccddeeff"  # the suite's pseudonym key (tests/conftest.py)
API_KEY = "test-api-key-for-every-platform"
SHOP_A_KEY = "test-api-key-for-shop-a-only"
SLOW_KEY = "test-api-key-two-per-second"
KEYS = f"ops {API_KEY}\nshop_a-backend {SHOP_A_KEY} shop_a\nslow {SLOW_KEY} * 2\n"
PREFIX = "/recsys"


@dataclass
class Served:
    base: str                 # http://127.0.0.1:<port>/recsys
    worlds: dict[str, ToyWorld]  # registry version -> its files
    name: str                 # registered model name
    tracking_uri: str

    def post(self, path: str, body: object, key: str | None = API_KEY,
             **kw: object) -> requests.Response:
        headers = {"x-api-key": key} if key else {}
        return requests.post(self.base + path, json=body, headers=headers, timeout=30, **kw)

    def get(self, path: str, key: str | None = API_KEY) -> requests.Response:
        return requests.get(self.base + path, headers={"x-api-key": key} if key else {},
                            timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(uri: str, name: str, world: ToyWorld) -> str:
    from recsys.tracking import runs

    run_id = runs.start_run(uri, "serve-tests", f"{name}-{world.export.parent.name}")
    model_uri = runs.log_recommender(uri, run_id, world.export,
                                      pip_requirements=["recsys"])
    runs.end_run(uri, run_id)
    return runs.register_model(uri, model_uri, name)


@pytest.fixture(scope="module")
def served(ray_cluster, mlflow_server, tiny_encoder: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from ray import serve

    from recsys.serving.app import AppArgs, compose
    from recsys.serving.deploy import secret_file
    from recsys.tracking import registry

    root = tmp_path_factory.mktemp("serve")
    key_file, _ = secret_file(root / "secrets" / "api_keys", KEYS)  # 0600, as deploy writes
    pseudonym_file, _ = secret_file(root / "secrets" / "pseudonym.key", KEY_HEX)
    pseudo = Pseudonymizer(bytes.fromhex(KEY_HEX))
    worlds = {"1": build_toy_world(root / "v1", tiny_encoder, pseudo, seed=0)}
    name = f"recsys-toy-{uuid.uuid4().hex[:8]}"
    assert _register(mlflow_server.uri, name, worlds["1"]) == "1"
    registry.set_alias(mlflow_server.uri, name, "champion", "1")
    args = AppArgs(model_uri=f"models:/{name}@champion", lake=str(worlds["1"].lake),
                   tracking_uri=mlflow_server.uri, poll_interval_s=1.0, max_batch_size=8,
                   download_dir=str(root / "downloads"), api_key_file=str(key_file),
                   rate_limit_per_s=0, reload_backoff_max_s=2.0)
    # Only file paths in the runtime_env (the dashboard shows it), never a key.
    env = {"RECSYS_PSEUDONYM_KEY_FILE": str(pseudonym_file)}
    tier = {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}},
            "num_replicas": 1}
    app = compose(args, model_options=tier, gateway_options=tier)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="recsys-test", route_prefix=PREFIX)
    try:
        yield Served(f"http://127.0.0.1:{port}{PREFIX}", worlds, name, mlflow_server.uri)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(served: Served) -> Predictor:
    """The same model in process: what the endpoint must answer."""
    w = served.worlds["1"]
    return Predictor.from_export(w.export, w.lake, pseudonymizer=w.pseudonymizer, search=False)


# -- health, model, auth --------------------------------------------------------------------------


def test_health_model_and_api_key(served: Served) -> None:
    assert served.get("/healthz", key=None).json() == {"status": "ok", "detail": None}
    ready = served.get("/readyz", key=None)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert served.get("/model", key=None).status_code == 401
    assert served.get("/model", key="wrong").status_code == 401
    assert served.post("/recommend", {"platform": "shop_a"}, key=None).status_code == 401
    info = served.get("/model").json()
    assert info["name"] == served.name and info["alias"] == "champion"
    assert info["version"] == "1" and info["platforms"] == ["shop_a", "shop_b"]
    assert Path(info["export_path"], "export.json").is_file() and info["search"] is True
    assert served.get("/openapi.json", key=None).status_code == 401
    schema = served.get("/openapi.json").json()
    assert {"/recommend", "/search", "/model", "/healthz", "/readyz"} <= set(schema["paths"])


def test_anonymous_callers_learn_no_platform_and_no_version(served: Served) -> None:
    """Issue 20: /readyz, /docs, /model and 404s tell an anonymous caller nothing about what is
    served; a key scoped to one platform cannot use or list the others."""
    anonymous = served.get("/readyz", key=None)
    assert anonymous.json() == {"status": "ready", "detail": None}
    with_key = served.get("/readyz").json()
    assert "version 1" in with_key["detail"] and "shop_a" in with_key["detail"]
    for path in ("/docs", "/openapi.json", "/model"):
        r = served.get(path, key=None)
        assert r.status_code == 401 and "shop_" not in r.text, path
    assert served.get("/docs", key=None).headers["www-authenticate"].startswith("Basic")
    assert served.post("/recommend", {"platform": "shop_a"}, key=SHOP_A_KEY).status_code == 200
    other = served.post("/recommend", {"platform": "shop_b"}, key=SHOP_A_KEY)
    assert other.status_code == 403 and "shop_b" in other.json()["detail"]
    unknown = served.post("/recommend", {"platform": "shop_q"}, key=SHOP_A_KEY)
    assert unknown.status_code == 403 and "shop_b" not in unknown.text
    full = served.post("/recommend", {"platform": "shop_q"})  # a key for every platform
    assert full.status_code == 404 and "shop_b" in full.text
    assert served.get("/nowhere", key=None).json() == {"detail": "Not Found"}


def test_docs_are_served_offline_behind_the_key(served: Served) -> None:
    """The Swagger page loads its assets from the endpoint itself (no CDN), and a browser opens
    it with the key as the Basic password."""
    page = requests.get(served.base + "/docs", auth=("any", API_KEY), timeout=10)
    assert page.status_code == 200 and "cdn" not in page.text
    assets = [a for a in ("swagger-ui-bundle.js", "swagger-ui.css") if a in page.text]
    assert len(assets) == 2
    for asset in assets:
        r = requests.get(f"{served.base}/docs/assets/{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000
    schema = requests.get(served.base + "/openapi.json", auth=("any", API_KEY), timeout=10)
    assert schema.status_code == 200


def test_the_api_is_no_privacy_oracle(served: Served) -> None:
    """No response field says where a user's history came from or how long it is; no request
    field switches off the purchase rule (comparing both answers would reveal purchases)."""
    body = served.post("/recommend", {"platform": "shop_a", "user_id": "bob", "k": 5}).json()
    assert set(body) == {"platform", "source", "items", "model_version", "request_id",
                         "served_by"}
    toggled = served.post("/recommend", {"platform": "shop_a", "user_id": "alice", "k": 12,
                                         "exclude_seen": False})
    assert toggled.status_code == 422 and "exclude_seen" in toggled.text
    for body in ({"platform": "shop_a", "recent_items": ["x" * 257]},
                 {"platform": "shop_a", "user_id": "u" * 257},
                 {"platform": "shop_b", "query": "q" * 513}):
        path = "/search" if "query" in body else "/recommend"
        assert served.post(path, body).status_code == 422, body


def test_each_key_has_its_own_rate_limit(served: Served) -> None:
    statuses = [served.post("/recommend", {"platform": "shop_a", "k": 1}, key=SLOW_KEY)
                for _ in range(8)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and statuses[0].status_code == 200
    assert int(limited[0].headers["retry-after"]) >= 1
    assert "slow" in limited[0].json()["detail"]
    assert all(served.post("/recommend", {"platform": "shop_a", "k": 1}).status_code == 200
               for _ in range(8))  # another key is not slowed down


# -- recommend ------------------------------------------------------------------------------------


def test_known_user_gets_the_model_ranking_without_purchases(served: Served,
                                                             reference: Predictor) -> None:
    r = served.post("/recommend", {"platform": "shop_a", "user_id": "alice", "k": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [i["item_id"] for i in body["items"]]
    assert body["source"] == "model"
    assert len(ids) == len(set(ids)) == 8
    assert all(i.startswith("shop_a-") for i in ids)
    assert not {"shop_a-001", "shop_a-007"} & set(ids)  # alice bought them
    expected = reference.recommend(RecommendRequest(platform="shop_a", user_id="alice", k=8))
    assert ids == [i.item_id for i in expected.items]
    assert [i["score"] for i in body["items"]] == pytest.approx(
        [i.score for i in expected.items], abs=1e-5)
    assert body["items"][0]["title"] == expected.items[0].title


def test_user_known_only_elsewhere_is_served_from_the_other_platform(served: Served,
                                                                     reference: Predictor
                                                                     ) -> None:
    body = served.post("/recommend", {"platform": "shop_a", "user_id": "bob", "k": 5}).json()
    assert body["source"] == "model"
    assert reference.prepare(RecommendRequest(platform="shop_a", user_id="bob")
                             ).history_platforms == ["shop_b"]
    assert all(i["item_id"].startswith("shop_a-") for i in body["items"])
    popular = served.post("/recommend", {"platform": "shop_a", "k": 5}).json()
    assert [i["item_id"] for i in body["items"]] != [i["item_id"] for i in popular["items"]]
    expected = reference.recommend(RecommendRequest(platform="shop_a", user_id="bob", k=5))
    assert [i["item_id"] for i in body["items"]] == [i.item_id for i in expected.items]


def test_users_without_history_get_popular_items_marked_as_such(served: Served) -> None:
    for body in ({"platform": "shop_a", "k": 3},
                 {"platform": "shop_a", "user_id": "never-seen", "k": 3},
                 {"platform": "shop_a", "user_id": "erin", "k": 3}):  # only on shop_z
        out = served.post("/recommend", body).json()
        assert out["source"] == "popular"
        assert [i["item_id"] for i in out["items"]] == ["shop_a-003", "shop_a-006",
                                                        "shop_a-001"]
    session = served.post("/recommend", {"platform": "shop_b", "recent_items": [
        "shop_b-002", "not-an-item"], "k": 3}).json()
    assert session["source"] == "model"


def test_filters_restrict_the_candidates(served: Served) -> None:
    brand = served.post("/recommend", {"platform": "shop_a", "user_id": "alice", "k": 10,
                                       "filters": {"brand": "ACME"}}).json()
    assert brand["items"] and {i["brand"] for i in brand["items"]} == {"acme"}
    cat = served.post("/recommend", {"platform": "shop_a", "k": 10,
                                     "filters": {"category": "home > kitchen"}}).json()
    assert cat["items"] and all(i["category"] == ["home", "kitchen"] for i in cat["items"])
    none = served.post("/recommend", {"platform": "shop_a", "user_id": "alice",
                                      "filters": {"brand": "no-such-brand"}}).json()
    assert none["items"] == []


# -- search ---------------------------------------------------------------------------------------


def test_search_finds_an_item_by_its_text(served: Served) -> None:
    r = served.post("/search", {"platform": "shop_b", "query": item_title("shop_b", 4), "k": 3})
    assert r.status_code == 200, r.text
    top = r.json()["items"][0]
    assert top["item_id"] == "shop_b-004" and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert served.post("/search", {"platform": "nope", "query": "x"}).status_code == 404


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_a_4xx_naming_the_problem(served: Served) -> None:
    r = served.post("/recommend", {"platform": "shop_q", "k": 3})
    assert r.status_code == 404 and "shop_q" in r.json()["detail"]
    for body in ({"platform": "shop_a", "k": 0}, {"platform": "shop_a", "k": 101},
                 {"platform": "shop_a", "colour": "red"}, {"k": 3},
                 {"platform": "Shop A!"}, {"platform": "shop_a", "recent_items": "x"}):
        r = served.post("/recommend", body)
        assert r.status_code == 422, (body, r.status_code, r.text)
    raw = requests.post(served.base + "/recommend", data=b"{not json",
                        headers={"x-api-key": API_KEY, "content-type": "application/json"},
                        timeout=10)
    assert raw.status_code == 422
    big = {"platform": "shop_a", "recent_items": ["x" * 100] * 199, "user_id": "u" * 256}
    assert len(json.dumps(big)) < 64 * 1024
    assert served.post("/recommend", big).status_code == 200
    huge = requests.post(served.base + "/recommend", data=b"{" + b" " * 70_000 + b"}",
                         headers={"x-api-key": API_KEY, "content-type": "application/json"},
                         timeout=10)
    assert huge.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body itself is measured
        for _ in range(70):
            yield b" " * 1024
    chunked = requests.post(served.base + "/recommend", data=chunks(),
                            headers={"x-api-key": API_KEY, "content-type": "application/json"},
                            timeout=10)
    assert chunked.status_code == 413


def test_schemathesis_finds_no_server_errors(served: Served) -> None:
    """Property-based requests generated from the OpenAPI schema (valid and invalid bodies,
    with the API key): none may be answered with a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(served.base + "/openapi.json",
                                           headers={"x-api-key": API_KEY})
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: object) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=served.base, headers={"x-api-key": API_KEY})
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code} for "
                                f"{case.body!r}: {response.text[:200]}")
        check()
    assert calls >= 100
    assert failures == []


def test_session_items_are_never_returned_and_each_item_says_why(served: Served,
                                                                reference: Predictor) -> None:
    """Issue 21: a request's session items (recent_items) never come back, whoever asks; each
    item carries a reason naming only a history item of the request's platform (a user's items
    on other platforms are other shops' data); no request field switches a rule off."""
    session = ["shop_a-002", "shop_a-003", "shop_a-005"]
    stored = {"alice": {"shop_a-001", "shop_a-004", "shop_a-007", "shop_a-002"}}
    for key, user in ((API_KEY, "alice"), (SHOP_A_KEY, "alice"), (API_KEY, None),
                      (SHOP_A_KEY, "bob")):
        body = {"platform": "shop_a", "user_id": user, "recent_items": session, "k": 12}
        r = served.post("/recommend", body, key=key)
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        ids = [i["item_id"] for i in items]
        assert ids and not set(session) & set(ids), (user, ids)
        expected = reference.recommend(RecommendRequest(**body))
        assert ids == [i.item_id for i in expected.items]
        assert [i["reason"] for i in items] == [i.reason.model_dump() for i in expected.items]
        for item in items:
            reason = item["reason"]
            assert reason["platform"] == "shop_a", reason
            assert reason["item_id"] in set(session) | stored.get(user or "", set()), reason
            assert reason["text"].startswith("because you viewed ")
    cross = served.post("/recommend", {"platform": "shop_a", "user_id": "bob", "k": 5},
                        key=SHOP_A_KEY).json()
    assert cross["source"] == "model" and cross["items"]
    assert {json.dumps(i["reason"]) for i in cross["items"]} == {json.dumps(
        {"text": "based on your activity", "item_id": None, "platform": None})}
    assert "shop_b" not in json.dumps(cross)
    popular = served.post("/recommend", {"platform": "shop_a", "k": 3}).json()
    assert {i["reason"]["text"] for i in popular["items"]} == {"popular on shop_a"}
    for field in ("exclude_session_items", "repurchase", "reasons", "rules"):
        toggled = served.post("/recommend", {"platform": "shop_a", "user_id": "alice",
                                             "recent_items": session, field: False})
        assert toggled.status_code == 422 and field in toggled.text, field


# -- champion swap (last: it moves the alias) -----------------------------------------------------


def _stream(served: Served, stop: threading.Event, statuses: list[int],
            versions: list[str | None] | None = None, clients: int = 4
            ) -> list[threading.Thread]:
    """``clients`` threads posting /recommend for alice until ``stop`` is set: each answer's
    status (-1: no answer) and, when given a list, the model version that answered."""

    def stream() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(served.base + "/recommend", json={"platform": "shop_a",
                               "user_id": "alice", "k": 5},
                               headers={"x-api-key": API_KEY}, timeout=60)
                    statuses.append(r.status_code)
                    if r.ok and versions is not None:
                        versions.append(r.json()["model_version"])
                except requests.RequestException:
                    statuses.append(-1)

    threads = [threading.Thread(target=stream) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


@contextmanager
def under_load(served: Served) -> Iterator[tuple[list[int], list[str | None]]]:
    """Four clients streaming /recommend for the block (after a second of warm-up): each
    answer's status and the model version that answered."""
    statuses: list[int] = []
    versions: list[str | None] = []
    stop = threading.Event()
    threads = _stream(served, stop, statuses, versions)
    try:
        time.sleep(1.0)
        yield statuses, versions
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_without_a_key_the_endpoint_refuses_to_start(served: Served) -> None:
    """Auth fails closed: ``auth: api_key`` (the default) and no key anywhere: the gateway
    refuses to start instead of serving everyone."""
    from ray import serve

    from recsys.serving.app import AppArgs, compose

    args = AppArgs(model_uri=str(served.worlds["1"].export), lake=None, search=False,
                   api_key_env="RECSYS_TEST_UNSET_KEY")
    tier = {"ray_actor_options": {"num_cpus": 0.1}, "num_replicas": 1}
    try:
        with pytest.raises(RuntimeError, match="Gateway"):
            serve.run(compose(args, tier, tier), name="no-key", route_prefix="/no-key")
        why = serve.status().applications["no-key"].deployments["Gateway"].message
        assert "no API key configured" in why, why
    finally:
        serve.delete("no-key")
    assert served.get("/readyz").json()["status"] == "ready"  # the other app is untouched


def test_a_broken_champion_is_refused_under_load(served: Served, tiny_encoder: str) -> None:
    """A champion whose weights are truncated (what a poisoned or half-written registry version
    looks like): the replica keeps serving version 1 with no failed request, counts and retries
    the failure with a backoff, says ``stale`` on /readyz, and leaves no downloaded files."""
    from recsys.tracking import registry

    root = served.worlds["1"].export.parents[1]
    broken = build_toy_world(root / "broken", tiny_encoder, served.worlds["1"].pseudonymizer,
                             seed=2)
    weights = broken.export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    version = _register(served.tracking_uri, served.name, broken)
    try:
        with under_load(served) as (statuses, versions):
            registry.set_alias(served.tracking_uri, served.name, "champion", version)
            deadline = time.monotonic() + 60
            while "failed to load 2 time(s)" not in str(served.get("/readyz").json()["detail"]):
                assert time.monotonic() < deadline, served.get("/readyz").json()
                time.sleep(0.5)
            health = served.get("/readyz").json()
            time.sleep(1.0)
    finally:
        registry.set_alias(served.tracking_uri, served.name, "champion", "1")
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    assert set(versions) == {"1"}
    assert health["status"] == "stale" and f"version {version} failed" in health["detail"]
    assert "ExportError" in health["detail"] and "model.safetensors" in health["detail"]
    assert served.get("/readyz", key=None).json() == {"status": "stale", "detail": None}
    leftovers = [p.name for p in (root / "downloads").iterdir()
                 if p.name.startswith(f"{served.name}-v{version}-")]
    assert leftovers == []
    deadline = time.monotonic() + 30
    while served.get("/readyz").json()["status"] != "ready":  # the alias moved back
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_champion_swap_under_load_has_no_failed_request(served: Served,
                                                         tiny_encoder: str) -> None:
    from recsys.tracking import registry

    root = served.worlds["1"].export.parents[1]
    served.worlds["2"] = build_toy_world(root / "v2", tiny_encoder,
                                         served.worlds["1"].pseudonymizer, seed=1)
    version = _register(served.tracking_uri, served.name, served.worlds["2"])
    with under_load(served) as (statuses, versions):
        registry.set_alias(served.tracking_uri, served.name, "champion", version)
        deadline = time.monotonic() + 60
        while served.get("/model").json()["version"] != version:
            assert time.monotonic() < deadline, "the new champion was not picked up in 60 s"
            time.sleep(0.5)
        time.sleep(1.0)
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    assert versions[0] == "1" and versions[-1] == version and set(versions) == {"1", version}
    after = served.post("/recommend", {"platform": "shop_a", "user_id": "alice", "k": 5}).json()
    v2 = Predictor.from_export(served.worlds["2"].export, served.worlds["2"].lake,
                               pseudonymizer=served.worlds["2"].pseudonymizer, search=False)
    expected = v2.recommend(RecommendRequest(platform="shop_a", user_id="alice", k=5))
    assert [i["item_id"] for i in after["items"]] == [i.item_id for i in expected.items]


def test_killed_model_replica_fails_no_request(served: Served) -> None:
    """A model replica killed under a stream of requests: the gateway sends what was in flight
    on it again, and waits for the replica Serve starts in its place; no request fails."""
    import ray
    from ray import serve

    def model_replicas() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::recsys-test#Recommender#")]

    (victim,) = model_replicas()
    statuses: list[int] = []
    stop = threading.Event()
    threads = _stream(served, stop, statuses)
    try:
        time.sleep(1.5)
        before = len(statuses)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 90
        while not (set(model_replicas()) - {victim}):
            assert time.monotonic() < deadline, "no replacement replica in 90 s"
            time.sleep(0.5)
        time.sleep(2.0)  # answered by the new replica for a while
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert before > 0 and len(statuses) > before
    assert all(s == 200 for s in statuses), sorted(set(statuses))
    status = serve.status().applications["recsys-test"].deployments["Recommender"]
    assert status.replica_states.get("RUNNING", 0) >= 1
