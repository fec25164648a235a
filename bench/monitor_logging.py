"""``bench/monitor.py --parts logging``: what the impression log costs /recommend.

One local Serve cluster runs the same app twice, side by side (``/a`` and ``/b``; in one
``feedback.dir`` is null, in the other the shipped ``FeedbackArgs`` with a directory under a
temporary folder, swapped halfway: ``PLACEMENTS``), each with one gateway and one model
replica on the shipped deployment options (``serve/config.yaml``, autoscaling off), serving the
untrained toy world of ``recsys.serving.toy`` (two shops, from a clean clone). The same
requests (known users, unknown users, session-only and anonymous, k=5) go to both through
closed-loop HTTP clients (``serve_load.load``) at 1 and 8 concurrency, in rounds off/on then
on/off (ABBA), so a change of machine load during the run hits both arms alike. Reported:
p50/p95 and req/s per arm, the on/off p50 ratio per round (median, min, max; target <= 1.05),
and the log's rows: expected (answers x items per answer), written (rows in its Parquet files
once flushed) and dropped (the difference). Beside them, without Ray or HTTP, the microseconds
``FeedbackLog.served`` adds to a request and its writer thread spends per row.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, stderr_log, wait_ready
from serve_load import load

log = stderr_log("monitor")

TOY_KEY = "00112233445566778899aabbccddeeff"  # bench/serve.py's public toy key
TOY_ENCODER = "bundled:all-MiniLM-L6-v2"
K = 5
LEVELS = (1, 8)
TARGET_RATIO = 1.05
PLACEMENTS = ({"a": "off", "b": "on"}, {"a": "on", "b": "off"})
"""Which of the two apps logs: swapped halfway, so that a difference between the two apps'
replicas (placement, start order) is not read as the log's cost."""


def toy_requests(predictor: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """40% the toy lake's users (a stored history), 20% unknown users, 30% session-only (1-3
    recent items), 10% anonymous; every answer has ``K`` items (checked by the caller)."""
    rng = random.Random(seed)
    users = {"shop_a": ["alice", "dave"], "shop_b": ["bob", "dave"]}
    out = []
    for i in range(n):
        platform = rng.choice(predictor.platforms)
        r = rng.random()
        body: dict[str, Any] = {"platform": platform, "k": K}
        if r < 0.4:
            body["user_id"] = rng.choice(users.get(platform, ["alice"]))
        elif r < 0.6:
            body["user_id"] = f"new-user-{i}"
        elif r < 0.9:
            body["recent_items"] = rng.sample(predictor.catalogs[platform].item_ids,
                                              rng.randint(1, 3))
        out.append(body)
    return out


def _rows(feedback_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in feedback_dir.rglob("*.parquet"))


def request_path_cost(predictor: Any, bodies: list[dict[str, Any]], root: Path,
                      n: int = 20_000) -> dict[str, float]:
    """In one process, no Ray: microseconds per ``FeedbackLog.served`` call (the only work the
    gateway's request path adds; its Serve counter increment is not in it) and the writer
    thread's microseconds per row (pseudonymise, Arrow table, Parquet file), for one answer."""
    from recsys.serving.feedback import FeedbackLog
    from recsys.serving.schemas import RecommendRequest

    out = predictor.recommend(RecommendRequest(**{**bodies[0], "user_id": "alice"}))
    fl = FeedbackLog(root, predictor.pseudonymizer, queue_size=n + 1, flush_every=5000,
                     flush_interval_s=3600)
    t = time.perf_counter()
    for _ in range(n):
        fl.served("alice", out, "shop_a")
    served_s = time.perf_counter() - t
    t = time.perf_counter()
    fl.close(timeout_s=120)
    drain_s = time.perf_counter() - t
    return {"calls": n, "rows": fl.written, "dropped": fl.dropped,
            "served_us": round(served_s / n * 1e6, 2),
            "writer_us_per_row": round((served_s + drain_s) / max(fl.written, 1) * 1e6, 2)}


def rows_logged(feedback_dir: Path, answers: int, per_answer: int | None,
                wait_s: float) -> dict[str, Any]:
    """Rows expected (answers x items), written (in the log's files, waited for up to
    ``wait_s`` while short) and dropped (the difference)."""
    expected = None if per_answer is None else answers * per_answer
    deadline = time.monotonic() + wait_s
    written = _rows(feedback_dir) if feedback_dir.exists() else 0
    while expected is not None and written < expected and time.monotonic() < deadline:
        time.sleep(1)
        written = _rows(feedback_dir) if feedback_dir.exists() else 0
    files = len(list(feedback_dir.rglob("*.parquet"))) if feedback_dir.exists() else 0
    return {"answers_logged": answers, "rows_expected": expected, "rows_written": written,
            "files": files, "rows_dropped": None if expected is None else expected - written}


def level_summary(c: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [x["p50_ratio"] for x in rounds]
    per_placement = {}
    for p in sorted({x["placement"] for x in rounds}):
        per_placement[str(p)] = round(statistics.median(
            x["p50_ratio"] for x in rounds if x["placement"] == p), 4)
    return {
        "concurrency": c, "rounds": rounds,
        "p50_ratio_median": round(statistics.median(ratios), 4),
        "p50_ratio_min": min(ratios), "p50_ratio_max": max(ratios),
        "p50_ratio_median_per_placement": per_placement,
        **{f"{arm}_{m}_median": round(statistics.median(x[arm][m] for x in rounds), 2)
           for arm in ("off", "on") for m in ("p50_ms", "p95_ms", "rps")},
        "errors": sum(x[arm]["errors"] for x in rounds for arm in ("off", "on"))}


def run_logging(a: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from recsys.cluster import free_port, init_ray
    from recsys.data.pseudonym import Pseudonymizer
    from recsys.serving.app import AppArgs, compose
    from recsys.serving.args import FeedbackArgs
    from recsys.serving.deploy import (
        deployment_options,
        load_serve_config,
        secret_file,
        with_env_vars,
    )
    from recsys.serving.predictor import Predictor
    from recsys.serving.schemas import RecommendRequest
    from recsys.serving.toy import build_toy_world

    tmp = Path(tempfile.mkdtemp(prefix="bench-monitor-logging-"))
    try:
        key_file = secret_file(tmp / "pseudonym.key", TOY_KEY)[0]
        os.environ["RECSYS_PSEUDONYM_KEY_FILE"] = str(key_file)
        world = build_toy_world(tmp / "toy", TOY_ENCODER, Pseudonymizer(bytes.fromhex(TOY_KEY)))
        predictor = Predictor.from_export(world.export, world.lake, search=False)
        bodies = toy_requests(predictor, 400)
        sizes = {len(predictor.recommend(RecommendRequest(**b)).items) for b in bodies}
        per_answer = sizes.pop() if len(sizes) == 1 else None  # None: rows not predictable
        request_path = request_path_cost(predictor, bodies, tmp / "inproc")
        log(f"logging: FeedbackLog.served {request_path['served_us']:.1f} us per answer in "
            f"process; writer {request_path['writer_us_per_row']:.1f} us per row")
        cfg = load_serve_config(REPO / "serve/config.yaml").applications[0]
        env = {"RECSYS_PSEUDONYM_KEY_FILE": str(key_file)}
        model = deployment_options(cfg, "Recommender")
        model.pop("autoscaling_config", None)
        model = with_env_vars({**model, "num_replicas": 1}, env)
        gateway = with_env_vars(deployment_options(cfg, "Gateway"), env)
        base = {"model_uri": str(world.export), "lake": str(world.lake), "search": False,
                "poll_interval_s": 0, "torch_threads": 1, "auth": "none",
                "rate_limit_per_s": 0}
        shipped_feedback = FeedbackArgs()
        init_ray(num_cpus=2)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        by_level: dict[int, list[dict[str, Any]]] = {c: [] for c in LEVELS}
        logs = []
        try:
            for p, placement in enumerate(PLACEMENTS):
                feedback_dir = tmp / f"feedback-{p}"
                urls = {}
                for app, arm in placement.items():
                    extra = {"feedback": shipped_feedback.model_copy(
                        update={"dir": str(feedback_dir)})} if arm == "on" else {}
                    serve.run(compose(AppArgs(**base, **extra), model, gateway),
                              name=f"recsys-monitor-{app}", route_prefix=f"/{app}")
                    wait_ready(f"http://127.0.0.1:{port}/{app}/readyz", 180)
                    urls[arm] = f"http://127.0.0.1:{port}/{app}/recommend"
                answered_on = 0
                for arm, url in urls.items():  # warm-up, not counted
                    w = load(url, bodies, 8, 3.0)
                    answered_on += w["requests"] if arm == "on" else 0
                for c in LEVELS:
                    for r in range(a.rounds):
                        order = ("off", "on") if r % 2 == 0 else ("on", "off")
                        got = {arm: load(urls[arm], bodies, c, a.seconds) for arm in order}
                        answered_on += got["on"]["requests"]
                        ratio = got["on"]["p50_ms"] / got["off"]["p50_ms"]
                        by_level[c].append({"placement": p, "order": list(order), **got,
                                            "p50_ratio": round(ratio, 4)})
                        log(f"logging placement {p} c={c} round {r + 1}: p50 off "
                            f"{got['off']['p50_ms']} ms, on {got['on']['p50_ms']} ms "
                            f"(x{ratio:.3f})")
                logs.append(rows_logged(feedback_dir, answered_on, per_answer,
                                        shipped_feedback.flush_interval_s + 20))
                log(f"logging placement {p}: {logs[-1]}")
        finally:
            serve.shutdown()
            ray.shutdown()
        levels = [level_summary(c, rounds) for c, rounds in by_level.items()]
        total = {k: sum(g[k] for g in logs) if all(g[k] is not None for g in logs) else None
                 for k in ("answers_logged", "rows_expected", "rows_written", "files",
                           "rows_dropped")}
        return {"model": "toy (untrained, recsys.serving.toy: shop_a 12 items, shop_b 9)",
                "requests_in_mix": len(bodies), "k": K, "items_per_answer": per_answer,
                "seconds_per_measurement": a.seconds, "rounds": a.rounds,
                "feedback_args": shipped_feedback.model_dump(exclude={"dir"}),
                "placements": [dict(p) for p in PLACEMENTS], "request_path": request_path,
                "deployment": {"model": {k: v for k, v in model.items()
                                         if k != "ray_actor_options"},
                               "model_num_cpus": model.get("ray_actor_options", {})
                               .get("num_cpus"),
                               "gateway_num_cpus": gateway.get("ray_actor_options", {})
                               .get("num_cpus")},
                "levels": levels, "target_ratio": TARGET_RATIO,
                "log": {**total, "per_placement": logs}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render_logging(block: dict[str, Any]) -> list[str]:
    fa = block["feedback_args"]
    rp = block["request_path"]
    out = ["## Cost of impression logging (`logging`)", "",
           f"The same app twice in one Serve cluster (`/a`, `/b`), the impression log off in "
           f"one and on in the other (shipped `FeedbackArgs`: queue {fa['queue_size']}, flush "
           f"every {fa['flush_every']} rows or {fa['flush_interval_s']:g} s), swapped halfway "
           "(placement 0: `/b` logs, 1: `/a` logs); 1 gateway + 1 model replica each (shipped "
           f"options), serving {block['model']}; {block['requests_in_mix']} requests "
           f"(k={block['k']}) over HTTP on 127.0.0.1, closed-loop clients, {block['rounds']} "
           f"rounds per placement of {block['seconds_per_measurement']:g} s per arm in ABBA "
           "order. Ratio: on/off p50 of the same round; target <= "
           f"{block['target_ratio']}.", "",
           "| clients | p50 off (ms) | p50 on (ms) | p95 off | p95 on | req/s off | req/s on "
           "| p50 ratio on/off, median [min, max] | median per placement (0 / 1) | errors |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for lv in block["levels"]:
        ok = "ok" if lv["p50_ratio_median"] <= block["target_ratio"] else "over target"
        pp = " / ".join(f"{v:.3f}" for v in lv["p50_ratio_median_per_placement"].values())
        out.append(
            f"| {lv['concurrency']} | {lv['off_p50_ms_median']:.1f} "
            f"| {lv['on_p50_ms_median']:.1f} "
            f"| {lv['off_p95_ms_median']:.1f} | {lv['on_p95_ms_median']:.1f} "
            f"| {lv['off_rps_median']:.0f} | {lv['on_rps_median']:.0f} "
            f"| **{lv['p50_ratio_median']:.3f}** [{lv['p50_ratio_min']:.3f}, "
            f"{lv['p50_ratio_max']:.3f}] ({ok}) | {pp} | {lv['errors']} |")
    g = block["log"]
    per = block["items_per_answer"]
    out += ["", "Latency and req/s: medians over all rounds of both placements. The log: "
            f"{g['answers_logged']} answers logged (warm-up included) x "
            f"{per if per else 'n/a'} items = "
            f"{g['rows_expected'] if g['rows_expected'] is not None else 'n/a'} rows expected, "
            f"{g['rows_written']} written in {g['files']} files, "
            f"{g['rows_dropped'] if g['rows_dropped'] is not None else 'n/a'} dropped. "
            f"In one process without Ray, `FeedbackLog.served` (all the request path adds "
            f"but a Serve counter increment) takes {rp['served_us']:.1f} us per answer of "
            f"{block['k']} items, and the writer thread {rp['writer_us_per_row']:.1f} us per "
            f"row ({rp['rows']} rows, {rp['dropped']} dropped)."]
    return out
