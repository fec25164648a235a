"""Issue 23, end to end: a shift injected into one synthetic shop's new logs is detected by the
drift monitor, whose trigger (``recsys.production.trigger.on_drift``) re-fine-tunes that shop
from its champion (warm start), gates the challenger offline, and canaries it on a live Serve
app whose simulated users click (POST /feedback), until the judge promotes it. Real Ray, real
MLflow, real HTTP on 127.0.0.1; no request fails throughout.

The simulated users click each shown item with the same probability whichever arm answered,
so the canary's CTR comparison passes when the challenger serves without errors: the test checks
the loop (detect -> fine-tune -> gate -> canary -> promote), ``test_canary_serve.py`` that a
worse or broken challenger is rolled back."""

from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from tests.integration.test_pipeline import TINY_TRAIN

KEY_HEX = "00112233445566778899aabbccddeeff"
API_KEY = "trigger-test-key-every-platform"
APP, PREFIX = "recsys-trigger", "/trigger"
TARGET = "shop_c"


def _inject_shift(logs: Path) -> Path:
    """Release shop_c's held-back events with their items remapped to the less popular half
    of its catalog (the monitor's popularity signals flag it)."""
    first = pd.read_parquet(logs / TARGET / "events-0001.parquet")
    ranked = first["item_id"].value_counts().index.tolist()
    tail = ranked[len(ranked) // 2:]
    to_tail = dict(zip(ranked, np.random.default_rng(0).choice(tail, len(ranked)), strict=True))
    held = pd.read_parquet(logs / ".holdback" / f"{TARGET}.parquet")
    out = logs / TARGET / "events-0002.parquet"
    held.assign(item_id=held["item_id"].map(lambda i: to_tail.get(i, i))).to_parquet(
        out, index=False)
    (logs / ".holdback" / f"{TARGET}.parquet").unlink()
    return out


def _users(base: str, items: list[str], stop: threading.Event, statuses: list[int],
           served_by: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with requests.Session() as s:
        while not stop.is_set():
            body = {"platform": TARGET, "recent_items": rng.sample(items, 2), "k": 5}
            r = s.post(base + "/recommend", json=body, headers={"x-api-key": API_KEY},
                       timeout=60)
            statuses.append(r.status_code)
            if not r.ok:
                continue
            out = r.json()
            served_by.append(out["served_by"])
            for item in out["items"]:
                if rng.random() < 0.3:
                    c = s.post(base + "/feedback", json={
                        "platform": TARGET, "request_id": out["request_id"],
                        "item_id": item["item_id"], "event_type": "click"},
                        headers={"x-api-key": API_KEY}, timeout=60)
                    statuses.append(c.status_code)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_shift_is_detected_refitted_from_the_champion_canaried_and_promoted(
        ray_cluster, mlflow_server, tiny_encoder: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from recsys.data.ingest.synthetic import write_logs
    from recsys.monitoring.config import MonitorConfig
    from recsys.monitoring.monitor import watch
    from recsys.pipeline import run_pipeline
    from recsys.pipeline.runner import load_pipeline_config
    from recsys.production.trigger import on_drift
    from recsys.serving.app import AppArgs, compose
    from recsys.serving.args import FeedbackArgs
    from recsys.serving.canary import CanaryArgs
    from recsys.serving.deploy import secret_file
    from recsys.tracking import registry
    from tests.integration.test_serve import _free_port

    monkeypatch.setenv("RECSYS_MLFLOW_TRACKING_URI", mlflow_server.uri)
    logs = write_logs(tmp_path / "logs", num_platforms=3, scale=0.2, seed=11,
                      holdback={TARGET: 0.3})
    overrides = {**TINY_TRAIN, "encoder.cache_dir": str(tmp_path / "cache")}
    name = f"it-trigger-{uuid.uuid4().hex[:6]}"
    feedback_dir = tmp_path / "feedback"
    config = {
        "name": "it-trigger", "work_dir": str(tmp_path / "work"),
        "stages": ["ingest", "examples", "pretrain", "transfer", "register"],
        "ingest": [{"source": "generic", "platform": p, "path": str(f["path"]),
                    "items_path": str(f["items_path"])} for p, f in logs.items()],
        "data": {"lake": str(tmp_path / "lake"), "examples": str(tmp_path / "examples"),
                 "sequences": {"max_seq_len": 20, "collapse_repeats": True},
                 "text": {"encoder": tiny_encoder, "max_tokens": 32}},
        "pretrain": {"platforms": ["shop_a", "shop_b"], "overrides": overrides},
        "transfer": {"targets": [TARGET], "strategies": ["freeze_encoder"],
                     "scratch_config": None, "overrides": overrides},
        "ray": {"keep_alive": False},
        "registry": {"model_name": name + "-{platform}", "canary": {
            "app": APP, "feedback_dir": str(feedback_dir),
            "judge": {"min_impressions": 60, "margin": 0.25, "poll_s": 1.0,
                      "timeout_s": 300}}},
    }
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(yaml.safe_dump(config))
    first = run_pipeline(load_pipeline_config(pipeline_yaml)).register[TARGET]
    assert first.promoted and first.version == "1"  # the first champion: nothing to canary
    model = f"{name}-{TARGET}"

    # The endpoint: shop_c's champion, half of its users to @canary while there is one.
    key_file, _ = secret_file(tmp_path / "secrets" / "api_keys", f"ops {API_KEY}\n")
    pseudonym_file, _ = secret_file(tmp_path / "secrets" / "pseudonym.key", KEY_HEX)
    args = AppArgs(model_uri=f"models:/{name}-{{platform}}@champion", platforms=[TARGET],
                   lake=str(tmp_path / "lake"), tracking_uri=mlflow_server.uri,
                   poll_interval_s=1.0, reload_backoff_max_s=2.0, search=False,
                   download_dir=str(tmp_path / "downloads"), api_key_file=str(key_file),
                   rate_limit_per_s=0, canary=CanaryArgs(share=0.5),
                   feedback=FeedbackArgs(dir=str(feedback_dir), flush_interval_s=0.5))
    env = {"RECSYS_PSEUDONYM_KEY_FILE": str(pseudonym_file)}
    tier = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
            "num_replicas": 1}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(args, tier, tier), name=APP, route_prefix=PREFIX)
    base = f"http://127.0.0.1:{port}{PREFIX}"
    items = pd.read_parquet(logs[TARGET]["items_path"])["item_id"].astype(str).tolist()
    stop, statuses, served_by = threading.Event(), [], []
    users = [threading.Thread(target=_users, args=(base, items, stop, statuses, served_by, s))
             for s in range(2)]
    try:
        for t in users:
            t.start()
        # New logs for shop_c arrive, shifted; ingest puts them in the lake (the pipeline's
        # ingest stage: only shop_c's source changed).
        _inject_shift(tmp_path / "logs")
        ingest_only = load_pipeline_config(pipeline_yaml, ["stages=[ingest]"])
        assert any(TARGET in k for k in run_pipeline(ingest_only).ran)
        monitor = MonitorConfig.model_validate({
            "lake": str(tmp_path / "lake"), "platforms": [TARGET],
            "model_name": name + "-{platform}", "out_dir": str(tmp_path / "monitor"),
            "tracking": {"enabled": True, "experiment": "it-trigger-monitor"},
            "window": {"min_events": 100},
            "trigger": {"enabled": True, "pipeline_config": str(pipeline_yaml)}})
        reports = watch(monitor, on_drift=on_drift, max_checks=1)
    finally:
        stop.set()
        for t in users:
            t.join()
        serve.shutdown()
    assert reports[0].drifted, reports[0].reasons
    info = registry.describe(mlflow_server.uri, model)
    assert info["champion"] == "2" and info["champion_history"] == ["1"], info
    assert info["challenger"] is None and registry.alias_version(
        mlflow_server.uri, model, "canary") is None
    tags = {v["version"]: v["tags"] for v in info["versions"]}["2"]
    assert tags["canary_verdict"] == "promote", tags
    assert int(tags["canary_challenger_impressions"]) >= 60
    assert tags["promotion_reason"].startswith("canary: CTR")
    # Warm start: the re-fine-tune started from v1's export, downloaded from the registry.
    from recsys.model.export import read_meta
    from recsys.pipeline.outputs import TrainOutput
    from recsys.pipeline.state import PipelineState

    state = PipelineState(tmp_path / "work" / "pipeline")
    key = f"transfer/{TARGET}/freeze_encoder"
    run = state.read(key, TrainOutput)
    assert run is not None and "champion" in state.records[key].inputs  # not "pretrain"
    init_from = Path(read_meta(run.output.export).train_config["transfer"]["init_from"])
    assert init_from.is_relative_to(tmp_path / "work" / "champions" / f"{model}-v1"), init_from
    assert "challenger" in served_by and statuses and set(statuses) <= {200, 202}, \
        set(statuses)
