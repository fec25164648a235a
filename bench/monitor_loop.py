"""``bench/monitor.py --parts loop``: retrain-to-serve time of the production loop, the flow of
``tests/integration/test_trigger.py`` as a timed run.

Set-up (not timed as the loop): a private 2-CPU Ray, a throwaway MLflow server on 127.0.0.1,
three synthetic shops (scale 0.2, shop_c's newest 30% held back), the pipeline's first run
(ingest, examples, pretrain, transfer, register: shop_c's v1 champion) with a tiny model (dim
16, one layer, 2 epochs, a random 2-layer 32-wide BERT as the text encoder), and a Serve app
answering shop_c from ``@champion`` with a canary share of 0.5 and the impression log on. Two
simulated users POST /recommend (session items) and click 30% of what they are shown.

The loop: shop_c's held-back events arrive with their items moved to the less popular half of
its catalog and are ingested; ``watch`` (one check, window.min_events 100) flags shop_c and
calls the trigger, here ``recsys.production.trigger.refit`` in its two steps (``run_pipeline``
of ``refit_config``: re-fine-tune from the champion, gate, register; then ``canary``) so that
each step is timed. Times are from the end of the check that flagged the shift to (a) the new
version registered, (b) the canary's verdict (promote: ``@champion`` moves to it), (c) the first
/recommend answer from the champion arm with the new version. A tiny model on 2 shared CPU
cores: the times are those of a toy scale, dominated by Ray's and the pipeline's fixed costs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common import fmt, stderr_log

log = stderr_log("monitor")

KEY_HEX = "00112233445566778899aabbccddeeff"
API_KEY = "bench-monitor-loop-key"
APP, PREFIX = "recsys-monitor-loop", "/loop"
TARGET = "shop_c"
TINY_TRAIN = {"model.dim": 16, "model.num_layers": 1, "model.num_heads": 2,
              "model.num_experts": 2, "optim.epochs": 2, "optim.micro_batch_size": 128,
              "optim.lr": 0.003, "data.sequences.max_seq_len": 20}
"""tests/integration/test_pipeline.py's TINY_TRAIN (the loop test's model)."""
JUDGE = {"min_impressions": 60, "margin": 0.25, "poll_s": 1.0, "timeout_s": 300}
SERVED_WAIT_S = 120


def tiny_encoder(out: Path) -> str:
    """The test suite's tiny random BERT with MiniLM's tokenizer (tests/conftest.py)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.data.catalog import BUNDLED_ENCODER, resolve_encoder_path

    tok = AutoTokenizer.from_pretrained(resolve_encoder_path(BUNDLED_ENCODER))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def inject_shift(logs: Path) -> Path:
    """Release shop_c's held-back events with their items moved to the less popular half of
    its catalog (as tests/integration/test_trigger.py does)."""
    import numpy as np
    import pandas as pd

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


class Users:
    """Simulated users: POST /recommend with two session items, click 30% of the items shown;
    every answer's time, arm and model version is kept, every failure counted."""

    def __init__(self, base: str, items: list[str], n: int = 2) -> None:
        self.base, self.items = base, items
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = {"recommend": 0, "feedback": 0}
        self.failed: dict[str, int] = {}
        self.answers: list[tuple[float, str, str | None]] = []  # (time, served_by, version)
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True)
                        for s in range(n)]

    def __enter__(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _post(self, s: Any, path: str, body: dict[str, Any]) -> Any:
        import requests

        kind = path.strip("/")
        try:
            r = s.post(self.base + path, json=body, headers={"x-api-key": API_KEY}, timeout=60)
        except requests.RequestException as e:
            r, why = None, type(e).__name__
        else:
            why = None if r.ok else str(r.status_code)
        with self.lock:
            self.sent[kind] += 1
            if why is not None:
                self.failed[f"{kind} {why}"] = self.failed.get(f"{kind} {why}", 0) + 1
        return r if why is None else None

    def _run(self, seed: int) -> None:
        import requests

        rng = random.Random(seed)
        with requests.Session() as s:
            while not self.stop.is_set():
                r = self._post(s, "/recommend", {"platform": TARGET, "k": 5,
                                                 "recent_items": rng.sample(self.items, 2)})
                if r is None:
                    continue
                out = r.json()
                with self.lock:
                    self.answers.append((time.time(), out["served_by"], out["model_version"]))
                for item in out["items"]:
                    if rng.random() < 0.3:
                        self._post(s, "/feedback", {
                            "platform": TARGET, "request_id": out["request_id"],
                            "item_id": item["item_id"], "event_type": "click"})

    def first_answer(self, served_by: str, version: str, after: float) -> float | None:
        with self.lock:
            return next((t for t, by, v in self.answers
                         if t >= after and by == served_by and v == version), None)


def run_loop(a: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import ray
    import yaml
    from ray import serve

    from recsys.cluster import free_port, init_ray
    from recsys.data.ingest.synthetic import write_logs
    from recsys.monitoring.config import MonitorConfig
    from recsys.monitoring.monitor import watch
    from recsys.pipeline import run_pipeline
    from recsys.pipeline.runner import load_pipeline_config
    from recsys.production.canary import CANARY
    from recsys.production.trigger import canary, refit_config
    from recsys.serving.app import AppArgs, compose
    from recsys.serving.args import FeedbackArgs
    from recsys.serving.canary import CanaryArgs
    from recsys.serving.deploy import secret_file
    from recsys.tracking import registry
    from recsys.tracking.server import LocalMlflowServer

    root = Path(tempfile.mkdtemp(prefix="bench-monitor-loop-"))
    server = None
    times: dict[str, float] = {}
    # The pipeline's ingest and the replicas must use one key (the suite's public test key; the
    # replicas get it as a 0600 file): this process's own environment only.
    os.environ["RECSYS_PSEUDONYM_KEY"] = KEY_HEX
    try:
        init_ray(num_cpus=2)
        server = LocalMlflowServer(root / "mlflow").start()
        os.environ["RECSYS_MLFLOW_TRACKING_URI"] = server.uri
        t0 = time.perf_counter()
        encoder = tiny_encoder(root / "encoder")
        logs = write_logs(root / "logs", num_platforms=3, scale=0.2, seed=11,
                          holdback={TARGET: 0.3})
        overrides = {**TINY_TRAIN, "encoder.cache_dir": str(root / "cache")}
        name = f"bench-loop-{uuid.uuid4().hex[:6]}"
        feedback_dir = root / "feedback"
        config = {
            "name": "bench-monitor-loop", "work_dir": str(root / "work"),
            "stages": ["ingest", "examples", "pretrain", "transfer", "register"],
            "ingest": [{"source": "generic", "platform": p, "path": str(f["path"]),
                        "items_path": str(f["items_path"])} for p, f in logs.items()],
            "data": {"lake": str(root / "lake"), "examples": str(root / "examples"),
                     "sequences": {"max_seq_len": 20, "collapse_repeats": True},
                     "text": {"encoder": encoder, "max_tokens": 32}},
            "pretrain": {"platforms": ["shop_a", "shop_b"], "overrides": overrides},
            "transfer": {"targets": [TARGET], "strategies": ["freeze_encoder"],
                         "scratch_config": None, "overrides": overrides},
            "ray": {"keep_alive": False},
            "registry": {"model_name": name + "-{platform}", "canary": {
                "app": APP, "feedback_dir": str(feedback_dir), "judge": JUDGE}},
        }
        pipeline_yaml = root / "pipeline.yaml"
        pipeline_yaml.write_text(yaml.safe_dump(config))
        first = run_pipeline(load_pipeline_config(pipeline_yaml)).register[TARGET]
        if not (first.promoted and first.version == "1"):
            raise RuntimeError(f"the first run did not make v1 champion: {first}")
        setup_pipeline_s = time.perf_counter() - t0
        log(f"loop: v1 champion after {setup_pipeline_s:.0f} s")
        model = f"{name}-{TARGET}"

        key_file, _ = secret_file(root / "secrets" / "api_keys", f"ops {API_KEY}\n")
        pseudonym_file, _ = secret_file(root / "secrets" / "pseudonym.key", KEY_HEX)
        args = AppArgs(model_uri=f"models:/{name}-{{platform}}@champion", platforms=[TARGET],
                       lake=str(root / "lake"), tracking_uri=server.uri, poll_interval_s=1.0,
                       reload_backoff_max_s=2.0, search=False,
                       download_dir=str(root / "downloads"), api_key_file=str(key_file),
                       rate_limit_per_s=0, canary=CanaryArgs(share=0.5),
                       feedback=FeedbackArgs(dir=str(feedback_dir), flush_interval_s=0.5))
        env = {"RECSYS_PSEUDONYM_KEY_FILE": str(pseudonym_file)}
        tier = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
                "num_replicas": 1}
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(compose(args, tier, tier), name=APP, route_prefix=PREFIX)
        base = f"http://127.0.0.1:{port}{PREFIX}"
        items = pd.read_parquet(logs[TARGET]["items_path"])["item_id"].astype(str).tolist()
        reports: list[Any] = []
        refits: list[dict[str, Any]] = []

        def on_check(checked: list[Any]) -> None:
            if any(r.drifted for r in checked):
                times.setdefault("flagged", time.time())

        def timed_trigger(cfg: MonitorConfig, report: Any) -> None:
            """``trigger.on_drift`` -> ``refit``, its two steps timed apart."""
            pc = refit_config(cfg.trigger.pipeline_config, report.platform,
                              cfg.trigger.overrides)
            reg = run_pipeline(pc).register[report.platform]
            times["registered"] = time.time()
            out: dict[str, Any] = {"version": reg.version, "promoted_by_gate": reg.promoted,
                                   "gate": reg.reason, "canary": None}
            if pc.registry.canary is not None and not reg.promoted and registry.alias_version(
                    server.uri, reg.name, CANARY) == reg.version:
                res = canary(pc, report.platform, reg.version)
                times["verdict"] = time.time()
                out["canary"] = {"verdict": res.verdict, "reason": res.reason,
                                 "judged_s": round(res.seconds, 1),
                                 "champion": vars(res.champion),
                                 "challenger": vars(res.challenger)}
            refits.append(out)

        with Users(base, items) as users:
            t_loop = time.perf_counter()
            times["loop_start"] = time.time()
            inject_shift(root / "logs")
            ingest_only = load_pipeline_config(pipeline_yaml, ["stages=[ingest]"])
            run_pipeline(ingest_only)
            times["ingested"] = time.time()
            monitor = MonitorConfig.model_validate({
                "lake": str(root / "lake"), "platforms": [TARGET],
                "model_name": name + "-{platform}", "out_dir": str(root / "monitor"),
                "tracking": {"enabled": True, "experiment": "bench-monitor-loop"},
                "window": {"min_events": 100},
                "trigger": {"enabled": True, "pipeline_config": str(pipeline_yaml)}})
            times["check_started"] = time.time()
            reports = watch(monitor, on_drift=timed_trigger, max_checks=1, on_check=on_check)
            new = refits[0]["version"] if refits else None
            promoted = bool(refits) and (refits[0]["promoted_by_gate"] or (
                refits[0]["canary"] or {}).get("verdict") == "promote")
            if promoted:
                after = times.get("verdict", times["registered"])
                deadline = time.monotonic() + SERVED_WAIT_S
                while time.monotonic() < deadline:
                    seen = users.first_answer("champion", new, after)
                    if seen is not None:
                        times["served"] = seen
                        break
                    time.sleep(0.2)
            loop_s = time.perf_counter() - t_loop
        info = registry.describe(server.uri, model)
        serve.shutdown()
        flagged = times.get("flagged")

        def since(key: str) -> float | None:
            return None if flagged is None or key not in times else round(times[key] - flagged, 1)

        r0 = reports[0] if reports else None
        return {
            "scale": 0.2, "model": "dim 16, 1 layer, 2 epochs; random 2-layer 32-wide BERT",
            "judge": JUDGE, "canary_share": 0.5, "setup_first_pipeline_s": round(
                setup_pipeline_s, 1),
            "check": None if r0 is None else {
                "drifted": r0.drifted, "reasons": r0.reasons, "new_events": r0.new_events,
                "seconds": round(times["flagged"] - times["check_started"], 1)
                if flagged else None},
            "refit": refits[0] if refits else None,
            "seconds_from_flag": {"registered": since("registered"),
                                  "verdict": since("verdict"), "served": since("served")},
            "shifted_logs_ingest_s": round(times["ingested"] - times["loop_start"], 1),
            "loop_s": round(loop_s, 1),
            "champion_after": info.get("champion"),
            "requests": {"sent": dict(users.sent), "failed": dict(users.failed),
                         "answers_by_arm": {arm: sum(by == arm for _, by, _ in users.answers)
                                            for arm in ("champion", "challenger")}},
        }
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - already down
            pass
        ray.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def render_loop(block: dict[str, Any]) -> list[str]:
    s = block["seconds_from_flag"]
    req = block["requests"]
    refit = block["refit"] or {}
    c = refit.get("canary") or {}
    failed = sum(req["failed"].values())
    out = ["## Retrain-to-serve time (`loop`)", "",
           f"`tests/integration/test_trigger.py`'s loop, timed: synthetic shops (scale "
           f"{block['scale']}), a tiny model ({block['model']}), 2 shared CPU cores; **toy "
           "scale: the times are Ray's, MLflow's and the pipeline's fixed costs more than "
           f"training**. Canary share {block['canary_share']}, judge {block['judge']}. Setting "
           f"up v1 (the first pipeline run) took {block['setup_first_pipeline_s']:.0f} s.", "",
           "| from the check that flagged shop_c to | seconds |", "|---|---|",
           f"| (a) re-fine-tuned version v{refit.get('version', '?')} registered "
           "(ingest, examples, transfer from the champion, gate) "
           f"| {fmt(s['registered'], '.1f')} |",
           f"| (b) the canary's verdict ({c.get('verdict', 'none')}) "
           f"| {fmt(s['verdict'], '.1f')} |",
           f"| (c) first /recommend answer of the new champion | {fmt(s['served'], '.1f')} |",
           "", f"The check itself: {fmt((block['check'] or {}).get('seconds'), '.1f')} s "
           f"({(block['check'] or {}).get('new_events')} new interactions; "
           f"{'; '.join((block['check'] or {}).get('reasons') or [])}). Canary: {c.get('reason')}."
           f" Champion after the loop: v{block['champion_after']}. Requests during the loop "
           f"({block['loop_s']:.0f} s, from the shifted logs' ingest on): "
           f"{req['sent']['recommend']} /recommend and {req['sent']['feedback']} /feedback sent, "
           f"**{failed} failed**{' ' + str(req['failed']) if failed else ''}; answers by arm "
           f"{req['answers_by_arm']}."]
    return out
