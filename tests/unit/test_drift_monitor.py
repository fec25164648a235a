"""The drift and quality monitor (``recsys.monitoring``): each statistic on hand-made
distributions, the synthetic shops with a popularity shift injected into shop_c's new logs, the
report files, the champion's NDCG@10 on new logs, feedback signals, watch and its callback, the
job, the shipped YAML and the MLflow run.

Detection figure (synthetic shops, scale 0.2, seed 11; shop_c's last 30% of events held back as
its new logs, their items remapped to the reference's less popular half): the shifted logs read
a popularity Jensen-Shannon distance of 0.84 or more from the first 100 new interactions on,
the unshifted ones 0.41 at 100 and at most 0.29 from 300 on (threshold 0.5). So with
``window.min_events: 100`` the shift is flagged once 100 shifted interactions have arrived, and
with the shipped default (300) at the first check after 300; shop_a and shop_b are never
flagged. ``DETECTED_WITHIN`` below is that number.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recsys.config import load_config
from recsys.data.pseudonym import Pseudonymizer
from recsys.monitoring import drift
from recsys.monitoring.config import MonitorConfig
from recsys.monitoring.monitor import check, check_platform, data_signals, watch
from recsys.monitoring.windows import Windows, interactions, split_windows

REPO = Path(__file__).resolve().parents[2]
PSEUDO = Pseudonymizer(bytes(range(32)))
DETECTED_WITHIN = 100
"""New (shifted) interactions of shop_c after which the monitor flags it (min_events 100)."""


# --- the statistics ---------------------------------------------------------------------------


def test_identical_distributions_read_zero_and_shifted_ones_do_not() -> None:
    same = np.array([50.0, 30, 20])
    assert drift.psi(same, same * 3) == pytest.approx(0, abs=1e-12)
    assert drift.js_distance(same, same * 3) == pytest.approx(0, abs=1e-7)
    shifted = np.array([20.0, 30, 50])
    assert drift.psi(same, shifted) > 0.25  # the usual "shifted" line
    assert 0.1 < drift.js_distance(same, shifted) < 1
    assert drift.js_distance(np.array([1.0, 0]), np.array([0.0, 1])) == pytest.approx(1)
    assert np.isfinite(drift.psi(np.array([1.0, 0]), np.array([0.0, 1])))  # smoothed
    with pytest.raises(ValueError, match="no counts"):
        drift.psi(np.zeros(2), same[:2])


def test_popularity_bins_follow_the_reference_mass_and_count_new_items() -> None:
    reference = ["a"] * 50 + ["b"] * 25 + ["c"] * 15 + ["d"] * 10
    labels, ref, cur = drift.popularity_buckets(reference, ["d", "d", "c", "z"], bins=4)
    assert labels == ["0-25%", "25-50%", "50-75%", "75-100%", "new"]
    # an item's bin: the share of the reference its heavier items hold (a 0, b 50%, c 75%,
    # d 90%); a head item bigger than a bin leaves the next one empty
    assert ref.tolist() == [50, 0, 25, 25, 0]
    assert cur.tolist() == [0, 0, 0, 3, 1]
    _, ref2, cur2 = drift.popularity_buckets(reference, reference, bins=4)
    assert drift.js_distance(ref2, cur2) == 0


def test_new_item_rate_ks_and_prior_interactions() -> None:
    assert drift.new_item_rate(["a", "b"], ["a", "c", "c", "b"]) == 0.5
    assert np.isnan(drift.new_item_rate(["a"], []))
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    assert drift.ks_statistic(x, rng.normal(size=2000)) < 0.06
    assert drift.ks_statistic(x, rng.normal(1.0, size=2000)) > 0.3
    users = np.array(["u", "v", "u", "u", "v"], dtype=object)
    assert drift.prior_interactions(users, np.array([1, 2, 3, 4, 5]), cap=1).tolist() == [
        0, 0, 1, 1, 1]


def test_ctr_joins_clicks_to_impressions_by_request_with_a_wilson_interval() -> None:
    shown = (np.array(["r1", "r1", "r2", "r2"]), np.array(["a", "b", "a", "c"]))
    clicks = (np.array(["r1", "r2", "r3"]), np.array(["b", "b", "a"]))  # r2/b was not shown
    assert drift.online_ctr(shown, clicks) == (1, 4)
    low, high = drift.wilson_interval(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.19, abs=0.01)
    assert drift.wilson_interval(0, 100)[0] == 0.0
    assert all(np.isnan(drift.wilson_interval(0, 0)))


# --- synthetic shops with a shift injected into shop_c's new logs ------------------------------


@pytest.fixture(scope="module")
def shops(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three synthetic shops in a lake; shop_c's newest 30% held back, then released once as
    they are (``natural``) and once with their items remapped to the tail (``shifted``)."""
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.ingest.synthetic import release_holdback, write_logs

    root = tmp_path_factory.mktemp("shops")
    logs = write_logs(root / "logs", num_platforms=3, scale=0.2, seed=11,
                      holdback={"shop_c": 0.3})

    def ingest_into(lake: Path, platform: str, path: Path) -> None:
        ingest(IngestOptions(source="generic", platform=platform, path=path,
                             items_path=logs[platform]["items_path"], out=lake), PSEUDO)

    for name in logs:
        ingest_into(root / "lake", name, logs[name]["path"])
    cutoff = interactions(root / "lake", "shop_c")["timestamp"].to_pylist()[-1]
    held = pd.read_parquet(root / "logs" / ".holdback" / "shop_c.parquet")
    first = pd.read_parquet(root / "logs" / "shop_c" / "events-0001.parquet")
    ranked = first["item_id"].value_counts().index.tolist()
    tail = ranked[len(ranked) // 2:]
    rng = np.random.default_rng(0)
    to_tail = dict(zip(ranked, rng.choice(tail, len(ranked)), strict=True))
    shutil.copytree(root / "logs", root / "logs_shifted")
    held.assign(item_id=held["item_id"].map(lambda i: to_tail.get(i, i))).to_parquet(
        root / "logs_shifted" / "shop_c" / "events-0002.parquet", index=False)
    release_holdback(root / "logs", "shop_c")
    lakes = {"natural": root / "lake_natural", "shifted": root / "lake_shifted"}
    for label, lake in lakes.items():
        shutil.copytree(root / "lake", lake)
        ingest_into(lake, "shop_c", root / ("logs" if label == "natural" else "logs_shifted")
                    / "shop_c")
    return {"root": root, "cutoff": cutoff, **lakes}


def _cfg(lake: Path, out: Path, **values) -> MonitorConfig:
    return load_config(MonitorConfig, None, values={
        "lake": str(lake), "out_dir": str(out), "tracking.enabled": False, **values})


def test_the_shift_is_detected_within_the_stated_number_of_events(shops: dict) -> None:
    """The first N new interactions of shop_c, as they arrive: the shifted logs cross the
    threshold from N = DETECTED_WITHIN on, the unshifted ones never from min_events on."""
    cfg = _cfg(shops["natural"], shops["root"] / "unused")
    threshold = cfg.thresholds.popularity_js
    js: dict[str, dict[int, float]] = {}
    for label in ("natural", "shifted"):
        events = interactions(shops[label], "shop_c")
        w = split_windows(events, shops["cutoff"], "config", 10**9)
        assert w.new_events > 1000
        js[label] = {}
        for n in (DETECTED_WITHIN, 200, 300, 500, 1000):
            arrived = events.slice(0, w.reference.num_rows + n)
            window = Windows(w.reference, arrived.slice(w.reference.num_rows), w.cutoff,
                             "config", n)
            signals, _ = data_signals(cfg, arrived, window, judged=True)
            js[label][n] = next(s.value for s in signals if s.name == "popularity_js")
    assert min(js["shifted"].values()) > 0.8 > threshold
    assert max(js["natural"].values()) < threshold
    assert max(v for n, v in js["natural"].items() if n >= cfg.window.min_events) < 0.3


def test_check_flags_shop_c_only_and_writes_the_report(shops: dict, tmp_path: Path) -> None:
    cfg = _cfg(shops["shifted"], tmp_path, **{"window.reference_until": shops["cutoff"],
                                              "window.min_events": DETECTED_WITHIN})
    reports = {r.platform: r for r in check(cfg)}
    assert sorted(reports) == ["shop_a", "shop_b", "shop_c"]
    c = reports["shop_c"]
    assert c.drifted and c.judged and c.cutoff_source == "config"
    assert c.reasons[0].startswith("popularity_js ")
    assert not reports["shop_a"].drifted and not reports["shop_b"].drifted
    assert reports["shop_a"].judged  # their logs go on after shop_c's cutoff: judged, fine
    out = Path(c.report_dir)
    page = (out / "report.html").read_text()
    assert "shop_c: DRIFTED" in page and "data:image/png;base64," in page
    assert {p.name for p in out.glob("*.png")} == {"shop_a.png", "shop_b.png", "shop_c.png"}
    saved = {r["platform"]: r for r in json.loads((out / "report.json").read_text())}
    assert saved["shop_c"]["drifted"] and saved["shop_c"]["signals"][0]["breached"]
    # the same logs without the shift: nothing drifted
    natural = check(cfg.model_copy(update={"lake": str(shops["natural"])}))
    assert not any(r.drifted for r in natural)


def test_without_a_champion_the_newest_events_are_judged_against_the_rest(
        shops: dict, tmp_path: Path) -> None:
    cfg = _cfg(shops["shifted"], tmp_path, platforms=["shop_a", "shop_c"])
    reports = {r.platform: r for r in check(cfg)}
    a = reports["shop_a"]
    assert a.cutoff_source == "newest_events" and a.champion is None
    assert a.current_events <= a.reference_events and not a.drifted
    assert any("no champion" in n for n in a.notes)
    assert reports["shop_c"].drifted  # its newest events are the shifted ones
    few = check(cfg.model_copy(update={"window": cfg.window.model_copy(
        update={"current_events": 50})}))
    assert not any(r.judged or r.drifted for r in few)  # < min_events: reported, not judged


def test_watch_calls_back_on_drift_and_stops_after_max_checks(shops: dict,
                                                              tmp_path: Path) -> None:
    cfg = _cfg(shops["shifted"], tmp_path, platforms=["shop_b", "shop_c"], interval_s=7,
               **{"window.reference_until": shops["cutoff"]})
    called: list[str] = []
    slept: list[float] = []
    checks: list[int] = []
    last = watch(cfg, on_drift=lambda c, r: called.append(r.platform), max_checks=2,
                 on_check=lambda reports: checks.append(len(reports)), sleep=slept.append)
    # the second check finds the drift again, within the trigger's cooldown: no second retrain
    assert called == ["shop_c"] and slept == [7] and checks == [2, 2]
    assert [r.platform for r in last] == ["shop_b", "shop_c"]
    called.clear()
    watch(cfg.model_copy(update={"trigger": cfg.trigger.model_copy(update={"cooldown_s": 0})}),
          on_drift=lambda c, r: called.append(r.platform), max_checks=2, sleep=slept.append)
    assert called == ["shop_c", "shop_c"]


def test_watch_goes_on_after_a_failed_check_or_trigger(shops: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.monitoring.monitor as monitor

    cfg = _cfg(shops["shifted"], tmp_path, platforms=["shop_c"], interval_s=1,
               **{"window.reference_until": shops["cutoff"], "trigger.cooldown_s": 0})
    real_check, calls = monitor.check, []

    def flaky_check(c: object) -> list:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("MLflow is down")
        return real_check(c)

    def failing_trigger(c: object, r: object) -> None:
        raise RuntimeError("retrain failed")

    monkeypatch.setattr(monitor, "check", flaky_check)
    last = watch(cfg, on_drift=failing_trigger, max_checks=3, sleep=lambda s: None)
    assert len(calls) == 3 and [r.platform for r in last] == ["shop_c"] and last[0].drifted


# --- feedback, the champion's NDCG, the job, the YAML, MLflow ----------------------------------


def _feedback(root: Path, platform: str, n: int, before_ctr: float, after_ctr: float,
              shift: float) -> Path:
    """``n`` impressions before and ``n`` after (scores shifted by ``shift``), each clicked
    with the given rate, as the serving feedback log writes them (a directory per platform)."""
    rng = np.random.default_rng(1)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for half, (ctr, delta) in enumerate(((before_ctr, 0.0), (after_ctr, shift))):
        for i in range(n):
            req, item = f"r{half}-{i}", f"i{i % 40}"
            ts = t0 + timedelta(seconds=half * n + i)
            rows.append({"platform": platform, "item_id": item, "event_type": "impression",
                         "timestamp": ts, "score": float(rng.normal(0.5 + delta, 0.1)),
                         "request_id": req, "position": 1})
            if rng.random() < ctr:
                rows.append({"platform": platform, "item_id": item, "event_type": "click",
                             "timestamp": ts + timedelta(milliseconds=5), "score": None,
                             "request_id": req, "position": None})
    (root / platform).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / platform / "part-0001.parquet", index=False)
    return root


def test_online_ctr_drop_and_score_shift_from_the_feedback_log(shops: dict,
                                                               tmp_path: Path) -> None:
    fb = _feedback(tmp_path / "feedback", "shop_b", 800, before_ctr=0.2, after_ctr=0.05,
                   shift=0.3)
    cfg = _cfg(shops["natural"], tmp_path / "out", platforms=["shop_a", "shop_b"], **{
        "feedback.dir": str(fb), "feedback.current_impressions": 800,
        "window.reference_until": shops["cutoff"]})
    reports = {r.platform: r for r in check(cfg)}
    b = reports["shop_b"]
    assert b.drifted and b.signal("online_ctr").breached and b.signal("score_ks").breached
    assert b.signal("online_ctr").value == pytest.approx(0.05, abs=0.02)
    assert b.signal("score_ks").value > 0.7
    a = reports["shop_a"]  # no feedback for it: not judged, never breached
    assert a.signal("online_ctr").value is None and not a.drifted


TOY_CUTOFF = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
"""The toy lake's first event: everything after it is new (two users with a history)."""


@pytest.fixture(scope="module")
def toy(tiny_encoder: str, tmp_path_factory: pytest.TempPathFactory):
    """The serving tests' toy world; its export says its training data ended at TOY_CUTOFF."""
    from recsys.model.export import META_FILE, read_meta
    from recsys.serving.toy import build_toy_world

    world = build_toy_world(tmp_path_factory.mktemp("toy"), tiny_encoder, PSEUDO)
    meta = read_meta(world.export).model_copy(update={"data_until": {"shop_a": TOY_CUTOFF}})
    (world.export / META_FILE).write_text(meta.to_json())
    return world


def test_the_champions_ndcg_on_new_logs_against_its_recorded_one(toy, tmp_path: Path) -> None:
    from recsys.monitoring.champion import Champion

    cfg = _cfg(toy.lake, tmp_path / "out", **{"window.min_events": 1,
                                              "thresholds.ndcg_drop": 0.5})
    champion = Champion("local", toy.export, TOY_CUTOFF, test_ndcg10=2.0)  # unreachable
    r = check_platform(cfg, "shop_a", champion=champion)
    assert r.cutoff_source == "champion" and r.reference_events == 1
    ndcg = r.signal("ndcg_at_10")
    assert 0 <= ndcg.value <= 1 and ndcg.threshold == 1.0 and ndcg.breached
    assert ndcg.detail.startswith("2 users")  # the two toy users with a history to rank from
    modest = check_platform(cfg, "shop_a", champion=Champion("local", toy.export, TOY_CUTOFF,
                                                             0.0))
    assert not modest.signal("ndcg_at_10").breached
    unknown = check_platform(cfg, "shop_a", champion=Champion("local", toy.export, TOY_CUTOFF,
                                                              None))
    assert unknown.signal("ndcg_at_10").threshold is None  # no recorded NDCG: reported only


def test_the_registered_champion_gives_cutoff_and_recorded_ndcg(toy, tmp_path: Path,
                                                                mlflow_server) -> None:
    from recsys.tracking import registry, runs

    uri, name = mlflow_server.uri, f"recsys-drift-{tmp_path.name}-shop_a"
    run_id = runs.start_run(uri, "monitor-test", "champion")
    model_uri = runs.log_recommender(uri, run_id, toy.export,
                                     pip_requirements=["torch", "mlflow"])
    version = runs.register_model(uri, model_uri, name)
    runs.end_run(uri, run_id)
    registry.promote(uri, name, version)
    runs.client(uri).set_model_version_tag(name, version, "test_ndcg_at_10/shop_a", "0.8")
    cfg = _cfg(toy.lake, tmp_path / "out", platforms=["shop_a"], **{
        "model_name": f"recsys-drift-{tmp_path.name}-{{platform}}", "window.min_events": 1,
        "tracking.enabled": True, "tracking.experiment": "monitor-test"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_MLFLOW_TRACKING_URI", uri)
        (r,) = check(cfg)
    assert r.champion == version and r.cutoff == TOY_CUTOFF and r.cutoff_source == "champion"
    assert r.signal("ndcg_at_10").threshold == pytest.approx(0.8 * 0.7)


def test_the_export_records_where_its_training_data_ends(tmp_path: Path) -> None:
    from recsys.data.examples import PlatformCounts, last_event
    from recsys.model.export import ExportInfo

    when = datetime(2025, 5, 5, tzinfo=UTC)
    info = ExportInfo(platforms=["a"], platforms_with_items=["a"], data_until={"a": when})
    assert ExportInfo.model_validate_json(info.model_dump_json()).data_until["a"] == when
    assert PlatformCounts(catalog_items=1, lake_users=1, users_too_short=0).last_event is None
    from recsys.data.lake import write_platform
    from recsys.data.schema import EVENTS_SCHEMA, ITEMS_SCHEMA
    events = pa.Table.from_pylist([
        {"platform": "a", "user_id": "0a1b2c3d4e"[d:d + 8], "item_id": "i", "event_type": "view",
         "timestamp": when - timedelta(days=d), "quantity": None, "price": None,
         "session_id": None, "event_index": d} for d in range(3)], schema=EVENTS_SCHEMA)
    items = pa.Table.from_pylist([], schema=ITEMS_SCHEMA)
    empty = pa.table({"_reason": pa.array([], pa.string())})
    write_platform(tmp_path, "a", events, items, empty, empty, {}, num_buckets=2)
    assert last_event(tmp_path, "a") == when


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "monitor").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_monitor_configs_validate(path: Path) -> None:
    cfg = load_config(MonitorConfig, path)
    assert cfg.trigger.enabled is False  # re-training on drift is opted into, never shipped on


def test_the_pipeline_stage_is_opt_in() -> None:
    from recsys.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, REPO / "configs" / "pipeline" / "demo.yaml")
    assert "monitor" not in cfg.active
    listed = load_config(PipelineConfig, REPO / "configs" / "pipeline" / "demo.yaml",
                         ["stages=[deploy,monitor]"])
    assert listed.active == ["deploy", "monitor"]


def test_the_pipeline_stage_checks_the_targets_and_only_reports(
        shops: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.pipeline import PipelineConfig
    from recsys.pipeline.context import Context
    from recsys.pipeline.stages.monitor import stage_monitor
    from recsys.pipeline.state import PipelineState

    cfg = load_config(PipelineConfig, None, values={
        "stages": ["monitor"], "work_dir": str(tmp_path), "tracking": False,
        "data.lake": str(shops["shifted"]), "transfer.targets": ["shop_c"],
        "monitor.overrides": {"window.reference_until": shops["cutoff"],
                              "trigger.enabled": True}})
    ctx = Context(cfg, PipelineState(cfg.root / "pipeline"))
    stage_monitor(ctx)
    (r,) = ctx.result.monitor
    assert r.platform == "shop_c" and r.drifted
    assert Path(r.report_dir).is_relative_to(tmp_path / "monitor")
    assert "shop_c: DRIFTED" in capsys.readouterr().out


def test_the_job_runs_one_check_and_prints_it(shops: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.monitor import main

    monkeypatch.setenv("RECSYS_WORK_DIR", str(tmp_path / "work"))
    code = main(["--config", str(REPO / "configs/monitor/monitor.yaml"),
                 f"lake={shops['shifted']}", f"out_dir={tmp_path}", "tracking.enabled=false",
                 "feedback.dir=null", f"window.reference_until={shops['cutoff'].isoformat()}",
                 f"window.min_events={DETECTED_WITHIN}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "shop_c: DRIFTED" in out and "shop_a: no drift" in out and "report.html" in out


def test_a_check_is_an_mlflow_run_with_metrics_and_the_report(shops: dict, tmp_path: Path,
                                                              mlflow_server) -> None:
    from mlflow import MlflowClient

    from recsys.tracking import metric_names

    cfg = _cfg(shops["shifted"], tmp_path, platforms=["shop_c"], **{
        "window.reference_until": shops["cutoff"], "tracking.enabled": True,
        "tracking.experiment": "monitor-test"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_MLFLOW_TRACKING_URI", mlflow_server.uri)
        (report,) = check(cfg)
    c = MlflowClient(mlflow_server.uri)
    run = c.get_run(report.mlflow_run_id)
    metrics = run.data.metrics
    assert metrics["monitor_drifted/shop_c"] == 1.0
    assert metrics["monitor_popularity_js/shop_c"] > 0.8
    assert metric_names.unknown(metrics) == []
    assert run.data.tags["drifted"] == "shop_c"
    files = {f.path for f in c.list_artifacts(run.info.run_id, "monitor")}
    assert {"monitor/report.html", "monitor/shop_c.png", "monitor/report.json"} <= files
