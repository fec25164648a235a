"""``bench/serve.py``'s multi-platform part (issue 21): one app serving three platforms, each
by its own registered champion, through Serve's model multiplexing.

A throwaway MLflow tracking server (``recsys.tracking.server.LocalMlflowServer``: 127.0.0.1,
SQLite, under a temporary folder; what the integration tests' ``mlflow_server`` fixture runs)
gets three registered models ``recsys-bench-<platform>``, each with a ``@champion``
(``recsys.tracking.runs``/``registry``, as ``tests/integration/test_serve_platforms.py``
registers them). The champions are three different demo exports when ``runs/demo`` has them
(``DEMO_CHAMPIONS``), else three toy worlds with seeds 0, 1, 2 (untrained, same catalogs).

Then the shipped app (``compose``, serve/config.yaml's options, 1 model replica, batching on)
is deployed three ways with the same requests, spread evenly over the three platforms:

* ``single``: the app's one model (``model_uri`` = the single-model export of the rest of the
  benchmark, which serves all three platforms): the reference;
* ``resident``: ``models:/recsys-bench-{platform}@champion``, ``max_models_per_replica`` 3
  (every champion preloaded and held);
* ``lru``: the same with ``max_models_per_replica`` 2 and nothing preloaded: Serve's LRU
  unloads a model to load the one a request names.

Model loads are counted two ways: each load downloads its champion into a fresh folder under
the app's ``download_dir`` and an unload removes it, so a driver thread that lists that folder
every 50 ms counts them per platform; and Serve's own counter
``serve_multiplexed_models_load_counter`` (summed over the app's replicas, the earlier
deployments' included, so only its change over a deployment's phases counts) from the Ray
node's Prometheus endpoint, when Ray exports it (every 10 s: it is read after a pause). The
replicas run with MLflow's download progress bars off (they would flood the driver's log).
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_load import load

PLATFORMS = ("shop_a", "shop_b", "shop_c")
NAME = "recsys-bench"  # registered models: recsys-bench-<platform>
# runs/demo/train/<run>/export per platform: each platform's champion is a different demo model
# that serves it (pretrain: pooled shop_a + shop_b; the two transfers to shop_c know all three).
DEMO_CHAMPIONS = {"shop_a": "pretrain", "shop_b": "transfer-adapter_only-shop_c",
                  "shop_c": "transfer-freeze_encoder-shop_c"}
LRU_MODELS = 2


def demo_champions(train_dir: Path) -> dict[str, Path] | None:
    """Each platform's demo export, or None when one is missing."""
    from recsys.model.export import read_meta

    out = {p: train_dir / run / "export" for p, run in DEMO_CHAMPIONS.items()}
    try:
        for export in out.values():
            read_meta(export)  # present, and in this code's export format
    except (OSError, ValueError):
        return None
    return out


def toy_champions(root: Path, pseudonymizer: Any, encoder: str) -> dict[str, Path]:
    """Three untrained toy models (seeds 0, 1, 2) over the same three catalogs."""
    from recsys.serving.toy import build_toy_world

    return {p: build_toy_world(root / f"seed{i}", encoder, pseudonymizer, seed=i,
                               third_platform=True).export for i, p in enumerate(PLATFORMS)}


def register(uri: str, exports: dict[str, Path]) -> dict[str, str]:
    """``recsys-bench-<platform>`` version 1 from each export, its ``@champion``."""
    from recsys.tracking import registry, runs

    versions = {}
    for platform, export in exports.items():
        name = f"{NAME}-{platform}"
        run_id = runs.start_run(uri, "bench-serve-platforms", name)
        version = runs.register_model(
            uri, runs.log_recommender(uri, run_id, export, pip_requirements=["recsys"]), name)
        runs.end_run(uri, run_id)
        registry.set_alias(uri, name, registry.CHAMPION, version)
        versions[platform] = version
    return versions


def even_mix(bodies: list[dict[str, Any]], seed: int = 1) -> list[dict[str, Any]]:
    """The same request mix with exactly as many requests for each platform, shuffled."""
    by = {p: [b for b in bodies if b["platform"] == p] for p in PLATFORMS}
    n = min(len(v) for v in by.values())
    out = [b for v in by.values() for b in v[:n]]
    random.Random(seed).shuffle(out)
    return out


class LoadWatcher:
    """Counts model loads per platform: new folders under the replicas' ``download_dir``."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self.root, self.interval = root, interval
        self.seen: set[str] = set()
        self.before: set[str] = set()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _scan(self) -> None:
        try:
            self.seen.update(p.name for p in self.root.iterdir())
        except FileNotFoundError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()

    def __enter__(self) -> LoadWatcher:
        self._scan()
        self.before = set(self.seen)
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join()
        self._scan()

    def counts(self) -> dict[str, int]:
        """Loads so far per platform (folder names start with ``recsys-bench-<platform>-v``)."""
        new = self.seen - self.before
        return {p: sum(n.startswith(f"{NAME}-{p}-v") for n in new) for p in PLATFORMS}


def serve_load_counter(app: str) -> float | None:
    """Serve's ``serve_multiplexed_models_load_counter`` summed over ``app``'s replicas, from
    the Ray node's Prometheus endpoint; None when Ray does not export it."""
    import ray

    try:
        port = ray.nodes()[0]["MetricsExportPort"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (OSError, KeyError, IndexError):
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("ray_serve_multiplexed_models_load_counter") \
                and f'application="{app}"' in line:
            found = True
            total += float(line.rsplit(" ", 1)[1])
    return total if found else None


def settled_counter(app: str, pause_s: float = 11.0, tries: int = 3) -> float | None:
    """The counter once two reads ``pause_s`` apart agree (Ray exports metrics every
    ``metrics_report_interval_ms``, 10 s by default)."""
    last = serve_load_counter(app)
    for _ in range(tries):
        time.sleep(pause_s)
        now = serve_load_counter(app)
        if now == last:
            return now
        last = now
    return last


def replica_rss_mb(app: str) -> float | None:
    """Resident memory of the model replica processes (Ray titles them
    ``ray::ServeReplica:<app>:Recommender``), MiB; None if none is found."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:{app}:Recommender" in cmd and proc.info["memory_info"]:
            total += proc.info["memory_info"].rss
    return round(total / 2**20, 1) if total else None


def run(app: str, url: str, deploy: Callable[[dict[str, Any]], None],
        base_args: dict[str, Any], single_export: Path, exports: dict[str, Path],
        mlflow_uri: str, bodies: list[dict[str, Any]], concurrencies: list[int],
        seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The three deployments (single, resident, lru) under the same load; ``deploy(args)``
    deploys the app with those args (1 model replica) and waits for /readyz."""
    from ray import serve

    mix = even_mix(bodies)
    downloads = Path(tempfile.mkdtemp(prefix="bench-serve-downloads-"))
    template = f"models:/{NAME}-{{platform}}@champion"
    configs = {
        "single": {"model_uri": str(single_export)},
        "resident": {"model_uri": template, "platforms": list(PLATFORMS),
                     "max_models_per_replica": len(PLATFORMS)},
        "lru": {"model_uri": template, "platforms": [],
                "max_models_per_replica": LRU_MODELS},
        "single_end": {"model_uri": str(single_export)},  # A-B-A: the reference again
    }
    out: dict[str, Any] = {"configs": {}, "requests_per_platform": len(mix) // len(PLATFORMS),
                           "champions": {p: e.parent.name for p, e in exports.items()},
                           "model_uri": template}
    try:
        for key, extra in configs.items():
            args = {**base_args, "max_batch_size": 16, "tracking_uri": mlflow_uri,
                    "download_dir": str(downloads), **extra}
            t = time.perf_counter()
            deploy(args)
            ready_s = time.perf_counter() - t
            load(url, mix, 8, 2.0)  # warm-up: every platform's model asked for
            multi = not key.startswith("single")
            before = settled_counter(app) if multi else None
            rows = []
            for c in concurrencies:
                with LoadWatcher(downloads) as w:
                    row = load(url, mix, c, seconds)
                row["model_loads"] = w.counts() if multi else None
                rows.append(row)
                log(f"platforms {key} {c} clients: {row['rps']} req/s, p50 {row['p50_ms']} ms, "
                    f"p99 {row['p99_ms']} ms, errors {row['errors']}, loads {row['model_loads']}")
            after = settled_counter(app) if multi else None
            out["configs"][key] = {
                "max_models_per_replica": extra.get("max_models_per_replica"),
                "preloaded": extra.get("platforms", []), "deploy_ready_s": round(ready_s, 1),
                "replica_rss_mb": replica_rss_mb(app), "rows": rows,
                "serve_load_counter": None if before is None or after is None
                else {"before": before, "after": after}}
            serve.delete(app)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return out


def part(app: str, port: int, single_export: Path, toy: tuple[Any, str] | None,
         bodies: list[dict[str, Any]], base_args: dict[str, Any], seconds: float, quick: bool,
         deploy: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The whole part: a throwaway MLflow server under a temporary folder, the champions
    registered (``toy``: (pseudonymizer, encoder) of toy worlds; else the demo's exports beside
    ``single_export``), ``run``, and the server stopped and its folder removed."""
    from recsys.tracking.server import LocalMlflowServer

    def log(msg: str) -> None:
        print(f"[serve] {msg}", file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench-serve-mlflow-"))
    try:
        if toy is not None:
            exports = toy_champions(root / "toy", *toy)
            source = "toy worlds of recsys.serving.toy, seeds 0, 1, 2 (untrained)"
        else:
            found = demo_champions(single_export.parents[1])
            if found is None:
                return {"skipped": f"no export for one of {DEMO_CHAMPIONS} beside "
                                   f"{single_export.parent.name} (run make demo, or --toy)"}
            exports, source = found, "the demo's exports (runs/demo/train/<run>/export)"
        server = LocalMlflowServer(root / "mlflow").start()
        try:
            t = time.perf_counter()
            versions = register(server.uri, exports)
            registered_s = time.perf_counter() - t
            log(f"registered {versions} in {registered_s:.1f} s")
            out = run(app, f"http://127.0.0.1:{port}/recommend", deploy, base_args,
                      single_export, exports, server.uri, bodies,
                      [1, 8] if quick else [1, 8, 32], seconds, log)
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**out, "champions_from": source, "register_s": round(registered_s, 1),
            "single_model": single_export.parent.name}


def ratio_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row against the single model at the same concurrency (ratios, not times): the
    mean of ``single`` and ``single_end`` (measured before and after the others)."""
    refs = [p["configs"][k]["rows"] for k in ("single", "single_end") if k in p["configs"]]
    base = {}
    for rows in zip(*refs):
        base[rows[0]["concurrency"]] = {m: sum(r[m] for r in rows) / len(rows)
                                        for m in ("rps", "p50_ms", "p99_ms")}
    out = []
    for key, cfg in p["configs"].items():
        for r in cfg["rows"]:
            b = base.get(r["concurrency"])
            loads = r.get("model_loads")
            total = sum(loads.values()) if loads else None
            done = r["requests"] + r["errors"]
            out.append({"config": key, "max_models": cfg["max_models_per_replica"], **r,
                        "loads_total": total,
                        "loads_per_100_requests": round(100 * total / done, 1)
                        if total is not None and done else None,
                        "rps_ratio": _ratio(r["rps"], b and b["rps"]),
                        "p50_ratio": _ratio(r["p50_ms"], b and b["p50_ms"]),
                        "p99_ratio": _ratio(r["p99_ms"], b and b["p99_ms"])})
    return out


def _ratio(x: float, y: float | None) -> float | None:
    return round(x / y, 2) if y and x == x else None  # x == x: not NaN


def render(p: dict[str, Any]) -> list[str]:
    """The Markdown section (a list of lines) for ``serve.md``."""
    lines = [
        "## Three platforms, one app (model multiplexing)", "",
        f"One app, `model_uri: {p['model_uri']}`: three registered models in a throwaway "
        "local MLflow server (SQLite, 127.0.0.1), each with its own `@champion` "
        f"({', '.join(f'{k}: {v}' for k, v in p['champions'].items())}); 1 model replica, "
        "batching on, requests spread evenly over the three platforms "
        f"({p['requests_per_platform']} each, the same mix as above). `single` is the same app "
        "serving the single model above for all three platforms (the reference, measured in "
        "the same run before the others and again after them, `single_end`; ratios are "
        "against the mean of the two); `resident`: every champion preloaded and held "
        f"(max_models_per_replica {p['configs']['resident']['max_models_per_replica']}); "
        f"`lru`: max_models_per_replica {p['configs']['lru']['max_models_per_replica']}, so "
        "Serve's LRU unloads a model to load the one a request names. Model loads: new "
        "download folders seen during the phase (one per load). Ratios are at the same "
        "concurrency (ratios, not times: a shared 2-core machine).", "",
        "| config | max models | clients | req/s | p50 ms | p95 ms | p99 ms | errors | model "
        "loads (a/b/c) | loads per 100 req | req/s vs single | p50 vs single | p99 vs single |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratio_rows(p):
        loads = "/".join(str(v) for v in r["model_loads"].values()) if r["model_loads"] else "-"
        lines.append(
            f"| {r['config']} | {r['max_models'] or 1} | {r['concurrency']} | {r['rps']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} | {loads} | "
            f"{_dash(r['loads_per_100_requests'])} | {_dash(r['rps_ratio'])}x | "
            f"{_dash(r['p50_ratio'])}x | {_dash(r['p99_ratio'])}x |")
    ends = [(a, b) for a, b in zip(p["configs"]["single"]["rows"],
                                   p["configs"].get("single_end", {}).get("rows", []))]
    if ends:
        drift = ", ".join(f"{a['concurrency']} clients {b['rps'] / a['rps']:.2f}x"
                          for a, b in ends if a["rps"])
        lines += ["", f"The reference's own drift over the part (`single_end` / `single` req/s: "
                  f"{drift}) is the noise of this shared machine: read smaller ratios as no "
                  "difference."]
    extra = []
    for key, cfg in p["configs"].items():
        c = cfg.get("serve_load_counter")
        folders = sum(sum(r["model_loads"].values()) for r in cfg["rows"] if r["model_loads"])
        counter = (f", Serve's load counter +{c['after'] - c['before']:.0f} over its phases "
                   f"(download folders: {folders})") if c else ""
        extra.append(f"{key}: ready in {cfg['deploy_ready_s']} s, model replica RSS "
                     f"{_dash(cfg['replica_rss_mb'])} MiB{counter}")
    lines += ["", "Deployments: " + "; ".join(extra) + ".", ""]
    return lines


def _dash(x: object) -> str:
    return "-" if x is None else str(x)

