"""``bench/monitor.py --parts detect``: how many new interactions the drift monitor needs to flag
a popularity shift, by shift strength, and whether unshifted logs ever false-alarm.

Three synthetic shops (``write_logs``, shop_c's newest ``HOLDBACK`` of events held back) are
ingested; the reference is shop_c's lake up to its newest event (``window.reference_until``,
what a champion trained on it records as ``data_until``). The held-back events are then released
with a share of them (``STRENGTHS``) remapped to the less popular half of the reference's items
(as ``tests/unit/test_drift_monitor.py`` and ``tests/integration/test_trigger.py`` inject it),
and arrive in time order: every ``STEP`` new interactions shop_c's lake holds the reference plus
the first ``n`` of them (``recsys.data.lake.write_platform``) and the library's
``check_platform`` judges it, with the shipped config's thresholds (``configs/monitor/``) at the
shipped ``window.min_events`` and at 100. At the end ``check`` runs over all three shops with
every held-back event arrived (shop_a and shop_b must never be flagged).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, SYNTHETIC_PSEUDONYM_KEY, fmt, stderr_log

log = stderr_log("monitor")

TARGET = "shop_c"
HOLDBACK = 0.3
SEED = 11
STRENGTHS = [1.0, 0.5, 0.25, 0.0]
STEP = 50
SHIPPED = REPO / "configs" / "monitor" / "monitor.yaml"
MIN_EVENTS = {"shipped": None, "min_events_100": 100}  # None: the shipped YAML's value


def _shifted(held: Any, first: Any, share: float, seed: int = 0) -> Any:
    """``held`` with ``share`` of its rows (chosen at random) moved to the less popular half of
    ``first``'s items (each item to a fixed random tail item, as the tests map them)."""
    import numpy as np

    ranked = first["item_id"].value_counts().index.tolist()
    tail = ranked[len(ranked) // 2:]
    rng = np.random.default_rng(seed)
    to_tail = dict(zip(ranked, rng.choice(tail, len(ranked)), strict=True))
    moved = np.zeros(len(held), bool)
    moved[rng.choice(len(held), round(share * len(held)), replace=False)] = True
    out = held.copy()
    out.loc[moved, "item_id"] = out.loc[moved, "item_id"].map(lambda i: to_tail.get(i, i))
    return out


def _configs(lake: Path, out: Path, cutoff: Any) -> dict[str, Any]:
    """The shipped monitor config on ``lake`` (tracking, feedback and NDCG off: data signals
    only), at the shipped min_events and at 100."""
    from recsys.config import load_config
    from recsys.monitoring.config import MonitorConfig

    cfgs = {}
    for key, min_events in MIN_EVENTS.items():
        values: dict[str, Any] = {"lake": str(lake), "out_dir": str(out),
                                  "tracking.enabled": False, "feedback.dir": None,
                                  "ndcg.enabled": False, "window.reference_until": cutoff}
        if min_events is not None:
            values["window.min_events"] = min_events
        cfgs[key] = load_config(MonitorConfig, SHIPPED, values=values)
    return cfgs


def arrival(lake: Path, events: Any, items: Any, reference_rows: int, new_rows: int,
            cfgs: dict[str, Any]) -> dict[str, Any]:
    """shop_c's lake = the reference and the first ``new_rows`` new interactions; each config's
    check of it (drifted, judged, popularity JS, new-item rate)."""
    import pyarrow as pa

    from recsys.data.lake import write_platform
    from recsys.monitoring.monitor import check_platform

    empty = pa.table({"_reason": pa.array([], pa.string())})
    write_platform(lake, TARGET, events.slice(0, reference_rows + new_rows), items, empty, empty,
                   {"source": "bench-monitor"}, num_buckets=1)
    row: dict[str, Any] = {"new": new_rows}
    for key, cfg in cfgs.items():
        r = check_platform(cfg, TARGET)
        row[key] = {"drifted": r.drifted, "judged": r.judged}
        row["popularity_js"] = r.signal("popularity_js").value
        row["new_item_rate"] = r.signal("new_item_rate").value
    return row


def run_detect(a: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.ingest.synthetic import write_logs
    from recsys.data.lake import read_items
    from recsys.data.pseudonym import Pseudonymizer
    from recsys.monitoring.monitor import check
    from recsys.monitoring.windows import interactions, split_windows

    pseudo = Pseudonymizer(SYNTHETIC_PSEUDONYM_KEY)
    root = Path(tempfile.mkdtemp(prefix="bench-monitor-detect-"))
    try:
        logs = write_logs(root / "logs", num_platforms=3, scale=a.scale, seed=SEED,
                          holdback={TARGET: HOLDBACK})

        def ingest_into(lake: Path, platform: str, path: Path) -> None:
            ingest(IngestOptions(source="generic", platform=platform, path=path,
                                 items_path=logs[platform]["items_path"], out=lake), pseudo)

        for name in logs:
            ingest_into(root / "lake", name, logs[name]["path"])
        cutoff = interactions(root / "lake", TARGET)["timestamp"].to_pylist()[-1]
        held = pd.read_parquet(root / "logs" / ".holdback" / f"{TARGET}.parquet")
        first = pd.read_parquet(root / "logs" / TARGET / "events-0001.parquet")
        cfgs = _configs(root / "arrived", root / "reports", cutoff)
        thresholds = cfgs["shipped"].thresholds.model_dump()
        runs = []
        for share in STRENGTHS:
            t0 = time.perf_counter()
            label = f"shift_{round(share * 100)}"
            src = root / f"logs_{label}"
            shutil.copytree(root / "logs", src, ignore=shutil.ignore_patterns(".holdback"))
            _shifted(held, first, share).to_parquet(src / TARGET / "events-0002.parquet",
                                                    index=False)
            full = root / f"lake_{label}"
            shutil.copytree(root / "lake", full)
            ingest_into(full, TARGET, src / TARGET)
            events = interactions(full, TARGET)
            w = split_windows(events, cutoff, "config", 10**9)
            ref, new = w.reference.num_rows, w.new_events
            shutil.rmtree(root / "arrived", ignore_errors=True)
            shutil.copytree(full, root / "arrived")
            items = read_items(full, TARGET)
            steps, first_flag = [], {k: None for k in cfgs}
            for n in [*range(STEP, new, STEP), new]:
                row = arrival(root / "arrived", events, items, ref, n, cfgs)
                steps.append(row)
                for k in cfgs:
                    if row[k]["drifted"] and first_flag[k] is None:
                        first_flag[k] = n
                if share > 0 and all(v is not None for v in first_flag.values()):
                    break  # detected at both min_events: no need to read the rest
            # Every shop, every held-back event arrived: shop_a and shop_b are judged against
            # the same cutoff (their logs go on after it) and must not be flagged.
            final = {r.platform: {"drifted": r.drifted, "judged": r.judged,
                                  "popularity_js": r.signal("popularity_js").value,
                                  "reasons": r.reasons}
                     for r in check(cfgs["shipped"].model_copy(update={"lake": str(full)}))}
            judged_js = [s["popularity_js"] for s in steps
                         if s["shipped"]["judged"] and s["popularity_js"] is not None]
            runs.append({
                "shift_share": share, "reference_interactions": ref,
                "new_interactions": new, "checks": len(steps),
                "first_flagged_after": first_flag,
                "flagged_checks": {k: sum(s[k]["drifted"] for s in steps) for k in cfgs},
                "false_alarm": (any(s[k]["drifted"] for s in steps for k in cfgs)
                                if share == 0 else None),
                "max_js_judged_shipped": max(judged_js) if judged_js else None,
                "all_arrived": final, "steps": steps,
                "seconds": round(time.perf_counter() - t0, 1)})
            log(f"detect {label}: flagged after {first_flag} of {new} new interactions; "
                f"others {[(p, v['drifted']) for p, v in final.items()]}")
            shutil.rmtree(full, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
        return {"scale": a.scale, "seed": SEED, "holdback": HOLDBACK, "step": STEP,
                "config": str(SHIPPED.relative_to(REPO)), "thresholds": thresholds,
                "min_events": {k: c.window.min_events for k, c in cfgs.items()},
                "popularity_bins": cfgs["shipped"].window.popularity_bins,
                "cutoff": str(cutoff), "runs": runs}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render_detect(block: dict[str, Any]) -> list[str]:
    me = block["min_events"]
    th = block["thresholds"]
    out = ["## Detection delay (`detect`)", "",
           f"Synthetic shops (scale {block['scale']}, seed {block['seed']}); shop_c's newest "
           f"{block['holdback']:.0%} of events held back and released in time order; the "
           "reference is shop_c's lake before them. A share of the new interactions is moved "
           "to the reference's less popular half of items. `check_platform` runs every "
           f"{block['step']} new interactions with `{block['config']}`'s thresholds "
           f"(popularity_js {th['popularity_js']}, new_item_rate {th['new_item_rate']}; "
           f"{block['popularity_bins']} popularity bins) at its `window.min_events` "
           f"({me['shipped']}) and at {me['min_events_100']}. Online signals and NDCG off "
           "(no served traffic, no champion): data drift only.", "",
           f"| shift | new interactions | flagged after (min_events {me['shipped']}) "
           f"| flagged after (min_events {me['min_events_100']}) | checks flagged "
           f"({me['shipped']} / {me['min_events_100']}) | max JS when judged "
           "| all arrived: shop_c / shop_a / shop_b flagged | checks | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in block["runs"]:
        ff = r["first_flagged_after"]
        others = r["all_arrived"]
        fa = r["flagged_checks"]
        flagged = " / ".join("yes" if others[p]["drifted"] else "no"
                             for p in ("shop_c", "shop_a", "shop_b"))
        alarms = f"{fa['shipped']} / {fa['min_events_100']}"
        out.append(
            f"| {r['shift_share']:.0%} | {r['new_interactions']} "
            f"| {ff['shipped'] if ff['shipped'] is not None else 'never'} "
            f"| {ff['min_events_100'] if ff['min_events_100'] is not None else 'never'} "
            f"| {alarms} "
            f"| {fmt(r['max_js_judged_shipped'], '.3f')} "
            f"| {flagged} "
            f"| {r['checks']} | {r['seconds']:.0f} |")
    out += ["", "Checks flagged: how many of the checks run flagged shop_c, at each min_events "
            "(a shifted run stops once both have flagged; the others run up to all held-back "
            "events, so for 0% this counts the false alarms). All arrived: one `check` "
            "over all shops (shipped config) once every held-back event arrived. Max JS: the "
            "highest popularity Jensen-Shannon distance among the checks that were judged "
            "(shipped min_events)."]
    return out
