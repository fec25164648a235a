"""The serving metrics, defined once: what the Serve app records through ``ray.serve.metrics``
(exported by each node's Ray metrics agent, scraped by Prometheus: ``docs/monitoring.md``).

Labels are bounded: ``platform`` (a served platform; the gateway says ``other`` for a name it
has not seen answered), ``outcome`` / ``endpoint`` / ``source`` (a few fixed values), plus the
``deployment`` / ``replica`` / ``application`` labels Serve adds. Never a user or an item id.

Prometheus names: Ray prefixes ``ray_``; a counter gains ``_total``, a histogram
``_bucket`` / ``_sum`` / ``_count`` (``prometheus_names``). The alert rules and the Grafana
dashboard in ``infra/monitoring/`` use only these names (``tests/unit/test_monitoring.py``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from ray.serve.metrics import Counter, Gauge, Histogram

# outcome of a request that reached the model tier: the model ranked it, the popular fallback
# answered (no usable history), a search answered, or it failed (a 5xx; unknown platforms, 404,
# are not counted: a made-up name is no platform)
OUTCOMES = ("model", "popular", "search", "error")
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
# model scores are cosines (or the CTR head's probability): Ray's buckets must be positive, so a
# score <= 0.05 (negative ones included) lands in the first bucket
SCORE_BUCKETS = [round(0.05 * i, 2) for i in range(1, 21)]
COVERAGE_WINDOW_S = 3600.0
MAX_PLATFORM_LABELS = 64
OTHER = "other"

# name -> kind: every metric this module defines (the dashboard/alert test reads this)
METRICS = {
    "recsys_requests": "counter",
    "recsys_request_ms": "histogram",
    "recsys_predict_ms": "histogram",
    "recsys_empty_answers": "counter",
    "recsys_scores": "histogram",
    "recsys_catalog_coverage": "gauge",
    "recsys_recommended_items": "gauge",
    "recsys_catalog_items": "gauge",
    "recsys_model_version": "gauge",
    "recsys_model_load_failures": "counter",
    "recsys_gateway_retries": "counter",
    "recsys_canary_requests": "counter",
    "recsys_feedback_logged": "counter",
    "recsys_feedback_dropped": "counter",
    "recsys_feedback_written": "counter",
}


def prometheus_names(prefix: str = "ray_") -> set[str]:
    """The series names Prometheus holds for ``METRICS``, as Ray exports them."""
    suffixes = {"counter": ("_total",), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count")}
    return {f"{prefix}{name}{s}" for name, kind in METRICS.items() for s in suffixes[kind]}


def version_number(version: str | None) -> float:
    """A registry version as the gauge's value; 0 for a local export (no version)."""
    return float(version) if version is not None and version.isdigit() else 0.0


class Coverage:
    """Distinct items answered per platform over the last ``window_s`` seconds. Memory is
    bounded: at most ``max_items`` per platform (answers hold catalog items only, so the
    catalog bounds it too), oldest first out."""

    def __init__(self, window_s: float = COVERAGE_WINDOW_S, max_items: int = 100_000) -> None:
        self.window_s, self.max_items = window_s, max_items
        self._seen: dict[str, OrderedDict[str, float]] = {}

    def add(self, platform: str, items: Sequence[str], now: float | None = None) -> int:
        """Record ``items`` answered now; returns the platform's distinct items in the window."""
        now = time.monotonic() if now is None else now
        seen = self._seen.setdefault(platform, OrderedDict())
        for item in items:
            seen[item] = now
            seen.move_to_end(item)
        oldest = now - self.window_s
        while seen and (len(seen) > self.max_items or next(iter(seen.values())) < oldest):
            seen.popitem(last=False)
        return len(seen)


def requests_counter() -> Counter:
    """Both tiers count into it: the model tier every answer and its own errors, the gateway
    the requests no model replica answered."""
    return Counter("recsys_requests", description="requests by platform and outcome (model, "
                   "popular fallback, search, error)", tag_keys=("platform", "outcome"))


class PlatformLabels:
    """The ``platform`` label of a name a caller sent: itself once some answer named it (at
    most ``limit`` names), else ``other``: made-up names add no series."""

    def __init__(self, limit: int = MAX_PLATFORM_LABELS) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def __call__(self, name: str, answered: bool = False) -> str:
        if answered and len(self._known) < self.limit:
            self._known.add(name)
        return name if name in self._known else OTHER


class ModelMetrics:
    """What the model tier (``Recommender``) records: one instance per replica."""

    def __init__(self) -> None:
        self.requests = requests_counter()
        self.predict_ms = Histogram("recsys_predict_ms", description="model time per request",
                                    boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200],
                                    tag_keys=("endpoint",))
        self.empty = Counter("recsys_empty_answers", description="answers with no item",
                             tag_keys=("platform", "endpoint"))
        self.scores = Histogram("recsys_scores", description="score of each item of a model "
                                "answer (cosine, or the CTR probability when re-ranked)",
                                boundaries=SCORE_BUCKETS, tag_keys=("platform",))
        self.coverage = Gauge("recsys_catalog_coverage", description="share of the catalog "
                              f"answered in the last {COVERAGE_WINDOW_S:.0f} s (this replica)",
                              tag_keys=("platform",))
        self.distinct = Gauge("recsys_recommended_items", description="distinct items answered "
                              f"in the last {COVERAGE_WINDOW_S:.0f} s (this replica)",
                              tag_keys=("platform",))
        self.catalog = Gauge("recsys_catalog_items", description="items in the platform's "
                             "catalog", tag_keys=("platform",))
        self.version = Gauge("recsys_model_version", description="registry version of the model "
                             "serving the platform (0: a local export)", tag_keys=("platform",))
        self.load_failures = Counter("recsys_model_load_failures", description="champion "
                                     "versions that failed to load (the replica kept its own)",
                                     tag_keys=("model",))
        self._coverage = Coverage()

    def loaded(self, platforms: Sequence[str], version: str | None,
               catalog_sizes: dict[str, int]) -> None:
        """A model now serves ``platforms`` (first load or swap)."""
        for p in platforms:
            self.version.set(version_number(version), tags={"platform": p})
            if p in catalog_sizes:
                self.catalog.set(catalog_sizes[p], tags={"platform": p})

    def answered(self, platform: str, outcome: str, endpoint: str, item_ids: Sequence[str],
                 scores: Sequence[float], catalog_size: int, elapsed_ms: float) -> None:
        tags = {"platform": platform}
        self.requests.inc(tags={**tags, "outcome": outcome})
        self.predict_ms.observe(elapsed_ms, tags={"endpoint": endpoint})
        if not item_ids:
            self.empty.inc(tags={**tags, "endpoint": endpoint})
        if outcome == "model":
            for s in scores:
                self.scores.observe(s, tags=tags)
        if endpoint == "recommend":
            distinct = self._coverage.add(platform, item_ids)
            self.distinct.set(distinct, tags=tags)
            self.coverage.set(distinct / max(catalog_size, 1), tags=tags)

    def failed(self, platform: str) -> None:
        self.requests.inc(tags={"platform": platform, "outcome": "error"})


class GatewayMetrics:
    """What the HTTP tier (``Gateway``) records: latency as its handler sees it, the retries,
    and the errors of requests no model replica answered."""

    def __init__(self) -> None:
        self.latency = Histogram("recsys_request_ms", description="time from the gateway's "
                                 "handler to its answer, by platform and endpoint",
                                 boundaries=LATENCY_MS, tag_keys=("platform", "endpoint"))
        self.requests = requests_counter()
        self.retried = Counter("recsys_gateway_retries",
                               description="model calls repeated after a replica died",
                               tag_keys=("endpoint",))
        self.platform = PlatformLabels()

    def observe(self, platform: str, endpoint: str, started: float, answered: bool) -> None:
        self.latency.observe((time.perf_counter() - started) * 1000,
                             tags={"platform": self.platform(platform, answered),
                                   "endpoint": endpoint})

    def unavailable(self, platform: str) -> None:
        """No model replica answered (the gateway's 503): the model tier never counted it."""
        self.requests.inc(tags={"platform": self.platform(platform), "outcome": "error"})


class FeedbackMetrics:
    """What the gateway's impression and feedback log (``recsys.serving.feedback``) records, in
    rows (one per item shown, one per posted event): queued, dropped and written to disk."""

    def __init__(self) -> None:
        self.logged = Counter("recsys_feedback_logged", description="impression and feedback "
                              "rows queued for the log", tag_keys=("platform", "event_type"))
        self.dropped = Counter("recsys_feedback_dropped", description="rows lost: the queue "
                               "was full (queue_full) or a file failed to write (write_failed)",
                               tag_keys=("platform", "reason"))
        self.written = Counter("recsys_feedback_written", description="rows written to the "
                               "log's Parquet files", tag_keys=("platform",))


class CanaryMetrics:
    """What a model replica's canary (``recsys.serving.canary``) records: requests per arm,
    answered or fallen back to the champion (the challenger failed to load, or raised)."""

    def __init__(self) -> None:
        self.requests = Counter("recsys_canary_requests", description="requests routed to each "
                                "arm of a canary: answered by it, or answered by the champion "
                                "in its place (fallback)", tag_keys=("platform", "arm",
                                                                      "outcome"))

    def count(self, platform: str, arm: str, outcome: str) -> None:
        self.requests.inc(tags={"platform": platform, "arm": arm, "outcome": outcome})
