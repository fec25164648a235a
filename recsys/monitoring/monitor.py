"""The drift and quality monitor: newest logs and served traffic vs the champion's training data.

    reports = check(cfg)                         # one pass over the platforms; writes the report
    watch(cfg, on_drift=callback, max_checks=3)  # a check every cfg.interval_s seconds

Per platform (:class:`DriftReport`), each signal beside its threshold (``cfg.thresholds``):

========================  =========================================================  =======
signal                    what                                                       breaches
========================  =========================================================  =======
``popularity_js``         Jensen-Shannon distance of events over the reference's     above
                          popularity bins (+ new items), current window vs reference
``popularity_psi``        PSI of the same buckets                                    above
``new_item_rate``         share of new events on items the reference never saw       above
``history_length_ks``     KS distance of users' prior interactions per event         above
``score_ks``              KS distance of served scores, newest feedback vs before    above
``online_ctr``            clicked impressions / impressions (Wilson 95% interval)    below
``ndcg_at_10``            the champion's NDCG@10 on the newest window                below
========================  =========================================================  =======

The reference is what the champion was trained on: a platform's interactions up to the newest
event of the champion's example set (``export.json``'s ``data_until``), or up to
``window.reference_until``; with neither (no champion yet), the newest ``current_events``
interactions are judged against all before them (data drift only). A platform with fewer than
``window.min_events`` new interactions is reported, not judged.

On a drifted platform :func:`watch` calls ``on_drift(cfg, report)``; ``jobs.monitor`` passes
``recsys.production.trigger.on_drift`` when ``trigger.enabled`` (the incremental fine-tune).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.data.lake import list_platforms
from recsys.monitoring import drift
from recsys.monitoring.config import MonitorConfig
from recsys.monitoring.schema import DriftReport, Samples, Signal
from recsys.monitoring.windows import (
    FeedbackWindows,
    Windows,
    feedback_windows,
    interactions,
    read_feedback,
    split_windows,
)

log = logging.getLogger(__name__)

SIGNALS: tuple[str, ...] = ("popularity_js", "popularity_psi", "new_item_rate",
                            "history_length_ks", "score_ks", "online_ctr", "ndcg_at_10")


def _above(name: str, value: float | None, threshold: float | None, judged: bool,
           detail: str = "") -> Signal:
    ok = judged and threshold is not None and value is not None and np.isfinite(value)
    return Signal(name, value, threshold, bool(ok and value > threshold), "above", detail)


def data_signals(cfg: MonitorConfig, events: pa.Table, w: Windows,
                 judged: bool) -> tuple[list[Signal], Samples]:
    """Popularity, new-item rate and history-length signals of the two lake windows
    (``w``: slices of ``events``, the platform's interactions in time order)."""
    t = cfg.thresholds
    ref_items = w.reference["item_id"].to_numpy(zero_copy_only=False)
    cur_items = w.current["item_id"].to_numpy(zero_copy_only=False)
    if len(ref_items) == 0 or len(cur_items) == 0:
        return [_above(n, None, getattr(t, n), False, "empty window") for n in
                ("popularity_js", "popularity_psi", "new_item_rate", "history_length_ks")
                ], Samples()
    labels, ref_c, cur_c = drift.popularity_buckets(ref_items, cur_items,
                                                    cfg.window.popularity_bins)
    history = drift.prior_interactions(  # over all events: windows are slices of them
        events["user_id"].to_numpy(zero_copy_only=False),
        events["timestamp"].to_numpy(zero_copy_only=False), cfg.window.history_cap)
    ref_h = history[:w.reference.num_rows]
    cur_h = history[events.num_rows - w.current.num_rows:]
    samples = Samples(labels, ref_c, cur_c, ref_h, cur_h)
    tail = cur_c[len(cur_c) // 2:-1].sum() / max(cur_c.sum(), 1)
    signals = [
        _above("popularity_js", drift.js_distance(ref_c, cur_c), t.popularity_js, judged,
               f"{len(labels) - 1} popularity bins + new; the reference's less popular half "
               f"of events got {tail:.0%} of the new ones"),
        _above("popularity_psi", drift.psi(ref_c, cur_c), t.popularity_psi, judged),
        _above("new_item_rate", drift.new_item_rate(ref_items, cur_items), t.new_item_rate,
               judged),
        _above("history_length_ks", drift.ks_statistic(ref_h, cur_h), t.history_length_ks,
               judged, f"mean prior interactions {ref_h.mean():.1f} -> {cur_h.mean():.1f}"),
    ]
    return signals, samples


def feedback_signals(cfg: MonitorConfig, fw: FeedbackWindows | None,
                     samples: Samples) -> list[Signal]:
    """Served-score shift and online CTR (newest impressions vs the ones before)."""
    t, f = cfg.thresholds, cfg.feedback
    if fw is None:
        return [_above("score_ks", None, t.score_ks, False, "no feedback"),
                Signal("online_ctr", None, None, False, "below", "no feedback")]
    enough = min(fw.reference.num_rows, fw.current.num_rows) >= f.min_impressions
    why = "" if enough else (f"{fw.reference.num_rows} / {fw.current.num_rows} impressions "
                             f"(< {f.min_impressions}): not judged")

    def scores(table: pa.Table) -> np.ndarray:
        s = table["score"].to_numpy(zero_copy_only=False).astype(float)
        return s[np.isfinite(s)]

    samples.reference_scores, samples.current_scores = scores(fw.reference), scores(fw.current)
    ks = drift.ks_statistic(samples.reference_scores, samples.current_scores)
    clicks = (fw.clicks["request_id"].to_numpy(zero_copy_only=False),
              fw.clicks["item_id"].to_numpy(zero_copy_only=False))

    def ctr(table: pa.Table) -> tuple[int, int]:
        return drift.online_ctr((table["request_id"].to_numpy(zero_copy_only=False),
                                 table["item_id"].to_numpy(zero_copy_only=False)), clicks)

    (rc, rn), (cc, cn) = ctr(fw.reference), ctr(fw.current)
    ref_ctr = rc / rn if rn else float("nan")
    cur_ctr = cc / cn if cn else None
    low, high = drift.wilson_interval(cc, cn)
    floor = None if t.ctr_drop is None or not rn else (1 - t.ctr_drop) * ref_ctr
    breached = bool(enough and floor is not None and cn and high < floor)
    return [_above("score_ks", ks if np.isfinite(ks) else None, t.score_ks, enough, why),
            Signal("online_ctr", cur_ctr, floor, breached, "below",
                   f"{cc}/{cn} clicked (95% {low:.4f}-{high:.4f}); before {rc}/{rn}"
                   + (f"; {why}" if why else ""))]


def ndcg_signal(cfg: MonitorConfig, platform: str, champion: Any, events: pa.Table,
                w: Windows, judged: bool) -> Signal:
    """The champion's NDCG@10 on the newest window against its recorded test NDCG@10."""
    from recsys.monitoring.champion import window_ndcg

    if not cfg.ndcg.enabled:
        return Signal("ndcg_at_10", None, None, False, "below", "ndcg.enabled: false")
    if champion is None:
        return Signal("ndcg_at_10", None, None, False, "below", "no champion")
    n = cfg.ndcg
    got = window_ndcg(champion.export, platform, events, w.current, n.users, n.seed,
                      n.batch_size)
    if got is None:
        return Signal("ndcg_at_10", None, None, False, "below", "no user to rank")
    recorded = champion.test_ndcg10
    floor = None if recorded is None or cfg.thresholds.ndcg_drop is None \
        else (1 - cfg.thresholds.ndcg_drop) * recorded
    detail = (f"{got.users} users, {got.unknown_targets} targets new since training (misses); "
              f"recorded test NDCG@10 {'unknown' if recorded is None else f'{recorded:.4f}'}")
    return Signal("ndcg_at_10", got.ndcg10, floor,
                  bool(judged and floor is not None and got.ndcg10 < floor), "below", detail)


def check_platform(cfg: MonitorConfig, platform: str, *, champion: Any = None,
                   feedback: pa.Table | None = None) -> DriftReport:
    """One platform's report (``champion``: :class:`recsys.monitoring.champion.Champion`)."""
    notes: list[str] = []
    if cfg.window.reference_until is not None:
        cutoff, source = cfg.window.reference_until, "config"
    elif champion is not None and champion.data_until is not None:
        cutoff, source = champion.data_until, "champion"
    else:
        cutoff, source = None, "newest_events"
        notes.append("no champion cutoff: " + ("no champion" if champion is None else
                     f"champion v{champion.version} records no data_until")
                     + f"; the newest {cfg.window.current_events} interactions are judged "
                       "against the ones before")
    events = interactions(cfg.lake, platform)
    w = split_windows(events, cutoff, source, cfg.window.current_events)
    judged = w.new_events >= cfg.window.min_events and w.reference.num_rows > 0
    if not judged:
        notes.append(f"{w.new_events} new interactions (< window.min_events "
                     f"{cfg.window.min_events}) or no reference: reported, not judged")
    signals, samples = data_signals(cfg, events, w, judged)
    fw = None if feedback is None else feedback_windows(feedback, platform,
                                                        cfg.feedback.current_impressions)
    signals += feedback_signals(cfg, fw, samples)
    signals.append(ndcg_signal(cfg, platform, champion, events, w, judged))
    return DriftReport(platform, datetime.now(UTC), None if champion is None else
                       champion.version, w.cutoff, w.cutoff_source, w.reference.num_rows,
                       w.new_events, w.current.num_rows, judged, signals, notes=notes,
                       samples=samples)


def _tracking_uri(cfg: MonitorConfig) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from recsys.settings import get_settings
    from recsys.tracking.server import ensure_tracking

    return ensure_tracking(get_settings())


def check(cfg: MonitorConfig) -> list[DriftReport]:
    """Check every platform once, write the report (``<out_dir>/<name>/<time>/``) and, with
    tracking on, log it to MLflow; returns the reports."""
    from recsys.monitoring.champion import find_champion
    from recsys.monitoring.report import log_check, write_report

    platforms = cfg.platforms or list_platforms(cfg.lake)
    if not platforms:
        raise FileNotFoundError(f"lake {cfg.lake} has no platforms to monitor")
    uri = _tracking_uri(cfg)
    feedback = None
    if cfg.feedback.dir and Path(cfg.feedback.dir).is_dir():
        feedback = read_feedback(cfg.feedback.dir)
    elif cfg.feedback.dir:
        log.warning("feedback dir %s does not exist (yet): no online signals", cfg.feedback.dir)
    reports = []
    with tempfile.TemporaryDirectory(prefix="recsys-monitor-") as tmp:
        for platform in platforms:
            champion = find_champion(cfg, platform, uri, Path(tmp))
            reports.append(check_platform(cfg, platform, champion=champion,
                                          feedback=feedback))
    stamp = reports[0].checked_at.strftime("%Y%m%dT%H%M%SZ")
    out = Path(cfg.out_dir) / cfg.name / stamp
    for r in reports:
        r.report_dir = str(out)
    write_report(reports, out)
    if uri is not None:
        run_id = log_check(uri, cfg.tracking.experiment, f"{cfg.name}-{stamp}", reports, out)
        for r in reports:
            r.mlflow_run_id = run_id
    for r in reports:
        log.info("%s: %s", r.platform, "DRIFTED: " + "; ".join(r.reasons) if r.drifted
                 else "no drift" if r.judged else "not judged")
    return reports


OnDrift = Callable[[MonitorConfig, DriftReport], None]


def watch(cfg: MonitorConfig, on_drift: OnDrift | None = None, max_checks: int | None = None,
          *, on_check: Callable[[list[DriftReport]], None] | None = None,
          sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic) -> list[DriftReport]:
    """Check every ``cfg.interval_s`` seconds until Ctrl-C (or ``max_checks`` checks); calls
    ``on_check(reports)`` after each check, then ``on_drift(cfg, report)`` for each drifted
    platform not triggered within ``cfg.trigger.cooldown_s``. A check or a trigger that fails
    (MLflow down, a failed retrain) is logged and the watch goes on: a monitor that stops on
    the first error watches nothing. Returns the last successful check's reports."""
    checks = 0
    reports: list[DriftReport] = []
    last_trigger: dict[str, float] = {}
    while max_checks is None or checks < max_checks:
        if checks:
            sleep(cfg.interval_s)
        checks += 1
        try:
            reports = check(cfg)
        except Exception:  # noqa: BLE001 - logged; the next check may succeed
            log.exception("check %d failed; next in %.0f s", checks, cfg.interval_s)
            continue
        if on_check is not None:
            on_check(reports)
        for r in reports:
            if not r.drifted or on_drift is None:
                continue
            since = clock() - last_trigger.get(r.platform, -math.inf)
            if since < cfg.trigger.cooldown_s:
                log.info("%s drifted (%s); triggered %.0f s ago, cooldown %.0f s: not again yet",
                         r.platform, "; ".join(r.reasons), since, cfg.trigger.cooldown_s)
                continue
            log.info("%s drifted (%s): calling %s", r.platform, "; ".join(r.reasons),
                     getattr(on_drift, "__qualname__", on_drift))
            last_trigger[r.platform] = clock()
            try:
                on_drift(cfg, r)
            except Exception:  # noqa: BLE001 - the champion keeps serving; logged
                log.exception("trigger for %s failed", r.platform)
    return reports
