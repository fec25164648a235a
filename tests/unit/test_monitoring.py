"""infra/monitoring/: the alert rules and the Grafana dashboard query only metrics the serving
app defines (``recsys/serving/metrics.py``, as Ray exports them) and only their labels; promtool
(the Debian package ``prometheus``) parses every expression and runs the rules' unit tests."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from recsys.serving import metrics
from recsys.serving.metrics import METRICS, Coverage, PlatformLabels, prometheus_names

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "infra" / "monitoring"
DASHBOARD = MONITORING / "grafana_dashboard.json"
ALERTS = MONITORING / "alerts.yml"
# the labels our metrics carry, those Serve adds, Prometheus' own, and the histogram bucket's
LABELS = {"platform", "outcome", "endpoint", "model", "deployment", "replica", "application",
          "le", "job", "instance", "SessionName", "NodeAddress", "Version", "Component"}
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "by",
                "without", "on", "ignoring", "unless", "and", "or", "histogram_quantile",
                "label_values", "offset", "bool", "group_left", "group_right", "abs", "clamp_min"}
RECORDED = {"recsys:requests:rate5m"}  # recording rules of alerts.yml
OTHER_SERIES = {"up"}  # Prometheus' own, per target


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def series_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The series names and the label names an expression uses (Grafana's variables and the
    quoted values removed first)."""
    if m := re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr.strip()):  # a Grafana variable
        return {m[1]}, {m[2]}
    bare = re.sub(r'"[^"]*"', '""', expr.replace("$__rate_interval", "1m"))
    labels = set()
    for group in re.findall(r"\{([^}]*)\}", bare) + re.findall(
            r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", bare):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=|,|$)", group.strip()))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|on|without|ignoring)\s*\([^)]*\)", " ", bare)
    words = set(re.findall(r"[A-Za-z_:][\w:]*", bare))
    return {w for w in words - PROMQL_WORDS if not w.startswith("$")}, labels


def test_the_exported_names_follow_rays_rules() -> None:
    names = prometheus_names()
    assert "ray_recsys_requests_total" in names and "ray_recsys_requests" not in names
    assert {"ray_recsys_request_ms_bucket", "ray_recsys_request_ms_sum",
            "ray_recsys_request_ms_count", "ray_recsys_model_version"} <= names


def test_metrics_module_defines_exactly_its_table() -> None:
    """Every ``Counter("x")`` / ``Gauge`` / ``Histogram`` in metrics.py is in ``METRICS`` with
    its kind, and app.py records nothing of its own (so the table is complete)."""
    source = Path(metrics.__file__).read_text()
    defined = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("Counter", "Gauge", "Histogram"):
            defined[node.args[0].value] = node.func.id.lower()
    assert defined == METRICS
    app = (REPO / "recsys" / "serving" / "app.py").read_text()
    assert "ray.serve.metrics" not in app and "ray.util.metrics" not in app


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_names_only_metrics_and_labels_the_app_defines(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    known = prometheus_names() | RECORDED | OTHER_SERIES
    assert exprs
    for expr in exprs:
        series, labels = series_and_labels(expr)
        assert series, expr
        assert series <= known, f"unknown series {series - known} in {expr}"
        assert labels <= LABELS, f"unknown labels {labels - LABELS} in {expr}"


def test_the_dashboard_has_a_panel_per_question() -> None:
    d = json.loads(DASHBOARD.read_text())
    by_title = {p["title"].lower(): " ".join(t["expr"] for t in p["targets"]) for p in d["panels"]}
    needed = {"requests": "ray_recsys_requests_total", "latency": "ray_recsys_request_ms_bucket",
              "fallback": 'outcome="popular"', "empty": "ray_recsys_empty_answers_total",
              "score distribution": "ray_recsys_scores_bucket",
              "coverage": "ray_recsys_catalog_coverage",
              "model version": "ray_recsys_model_version"}
    for topic, metric in needed.items():
        panel = [exprs for title, exprs in by_title.items() if topic in title]
        assert panel and metric in panel[0], topic
    latency = next(e for t, e in by_title.items() if "latency" in t)
    assert all(f"histogram_quantile({q}" in latency for q in ("0.5", "0.95", "0.99"))
    per_platform = [e for e in by_title.values() if "recsys_model_load" not in e
                    and "predict_ms" not in e]
    assert all('platform=~"$platform"' in e for e in per_platform)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_cover_the_failure_modes() -> None:
    names = {r.get("alert") for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    assert {"RecsysHighErrorRate", "RecsysHighLatencyP95", "RecsysHighFallbackRate",
            "RecsysEmptyAnswers", "RecsysModelLoadFailures", "RecsysNoTraffic"} <= names


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool absent (Debian package "
                                    "prometheus: apt-get install -y prometheus)")


@needs_promtool
def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=MONITORING,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """The dashboard's queries as recording rules (Grafana's variables filled in): promtool
    parses each one."""
    rules = [{"record": f"dashboard:q{i}",
              "expr": e.replace("$__rate_interval", "1m").replace("$platform", ".*")}
             for i, e in enumerate(dashboard_exprs()) if not e.startswith("label_values")]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


# -- the bounded state behind the metrics ---------------------------------------------------------


def test_coverage_counts_distinct_items_in_the_window_with_bounded_memory() -> None:
    cov = Coverage(window_s=10, max_items=3)
    assert cov.add("shop_a", ["a", "b"], now=0) == 2
    assert cov.add("shop_a", ["b", "c"], now=5) == 3
    assert cov.add("shop_b", ["a"], now=5) == 1  # per platform
    assert cov.add("shop_a", ["d"], now=6) == 3  # the cap: "a", the oldest, goes
    assert cov.add("shop_a", [], now=14) == 3     # b, c (t=5), d (t=6) still in the window
    assert cov.add("shop_a", [], now=15.5) == 1   # b, c expired; d stays
    assert cov.add("shop_a", [], now=17) == 0


def test_platform_labels_are_bounded() -> None:
    label = PlatformLabels(limit=2)
    assert label("shop_a") == "other"  # never answered: a caller's name, not a platform
    assert label("shop_a", answered=True) == "shop_a" and label("shop_a") == "shop_a"
    assert label("shop_b", answered=True) == "shop_b"
    assert label("shop_c", answered=True) == "other"  # over the limit


def test_version_number() -> None:
    assert metrics.version_number("12") == 12.0
    assert metrics.version_number(None) == metrics.version_number("abc") == 0.0
