"""The canary judge: ``@canary`` answers a share of real traffic (``recsys.serving.canary``),
this module compares the two arms online and promotes the challenger or rolls it back.

``@canary`` is set by the offline gate (``recsys.production.gate``) on a version that beat the
champion on validation data; ``@challenger`` alone (a version still being scored offline) is
never served, so no user sees a version before the offline gate has passed it.

``judge`` is pure: two ``ArmStats`` and a ``CanaryConfig`` in, a ``Judgement`` out.

* **errors first**: requests routed to the challenger that it could not answer (it failed to
  load, or raised; the champion answered them, so no request failed) roll it back as soon as
  the Wilson lower bound of its error rate exceeds ``max_error_rate``: a broken challenger is
  judged on a handful of requests, not after ``min_impressions``;
* **wait** until both arms have ``min_impressions``;
* **CTR, non-inferiority**: the challenger minus champion CTR difference gets Newcombe's hybrid
  score interval (from each arm's Wilson interval; unlike the Wald interval it stays honest at
  CTRs near 0 or 1). Its upper bound below ``-margin``: the challenger is worse by more than the
  margin, rollback. Its lower bound above ``-margin``: not worse by more than the margin,
  promote. Otherwise wait for more traffic, and at ``max_impressions`` per arm, still
  undecided, roll back (a challenger must show it is not worse).

``run_canary`` polls a stats source until the judgement is not ``wait`` (or ``timeout_s``:
rollback), then acts in the registry: promotion moves ``@champion`` to the challenger under the
champion lock, only if ``@champion`` is still the version the canary compared against; rollback
tags the version ``role=rejected`` with the reason. Either way ``@canary`` and ``@challenger``
are cleared (if still on it). Serving replicas follow the aliases (they drop the challenger's
slot when ``@canary`` goes), so the switch has no downtime.

Stats sources: ``feedback_stats`` reads the served impressions and clicks that the gateway logs
(``<feedback_dir>/<platform>/*.parquet``); ``serve_errors`` asks a Serve app's Recommender for
the challenger's fallbacks (requests the champion answered in its place, which the feedback log
cannot tell from the champion's own); ``combined`` adds the errors of one to the other. Without
``serve_errors`` a challenger that never loads shows as no impressions, and times out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

from pydantic import Field

from recsys.config import StrictModel

log = logging.getLogger(__name__)

Verdict = Literal["promote", "rollback", "wait"]
ARMS = ("champion", "challenger")
CANARY = "canary"
"""The alias of the version in a canary (``recsys.serving.canary.CanaryArgs.alias``)."""


class CanaryConfig(StrictModel):
    """How the canary judges the challenger against the champion."""

    min_impressions: int = Field(200, ge=1)
    """Items shown per arm before CTRs are compared."""
    max_impressions: int | None = Field(20_000, ge=1)
    """Per arm: a comparison still undecided with this much traffic rolls back (None: wait
    until ``timeout_s``)."""
    margin: float = Field(0.02, ge=0, le=1)
    """Non-inferiority margin on the CTR (absolute): the challenger may be this much worse."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Two-sided confidence of the intervals."""
    max_error_rate: float = Field(0.01, ge=0, lt=1)
    """Share of the challenger's requests it may fail (answered by the champion instead)."""
    poll_s: float = Field(30.0, gt=0)
    """How often ``run_canary`` reads the stats."""
    timeout_s: float = Field(3600.0, gt=0)
    """Undecided after this long: rollback."""


@dataclass(frozen=True)
class ArmStats:
    """What one arm did since the canary started."""

    requests: int = 0
    """Requests it answered."""
    errors: int = 0
    """Requests routed to it that it did not answer (failed load, an exception)."""
    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(self.requests + other.requests, self.errors + other.errors,
                        self.impressions + other.impressions, self.clicks + other.clicks)


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str
    ctr_diff_interval: tuple[float, float] | None = None


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(0, 1)`` without observations)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_interval(champion: ArmStats, challenger: ArmStats, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``challenger.ctr - champion.ctr``."""
    p1, p2 = champion.ctr, challenger.ctr
    l1, u1 = wilson(champion.clicks, champion.impressions, z)
    l2, u2 = wilson(challenger.clicks, challenger.impressions, z)
    d = p2 - p1
    return (d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2),
            d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))


def judge(champion: ArmStats, challenger: ArmStats, cfg: CanaryConfig) -> Judgement:
    """The verdict on the challenger so far, with its reason (see the module docstring)."""
    z = _z(cfg.confidence)
    tried = challenger.requests + challenger.errors
    if challenger.errors:
        low, _ = wilson(challenger.errors, tried, z)
        if low > cfg.max_error_rate:
            return Judgement("rollback", f"challenger failed {challenger.errors} of {tried} "
                             f"requests routed to it (error rate >= {low:.3f} > "
                             f"{cfg.max_error_rate})")
    short = [f"{arm} {s.impressions}" for arm, s in zip(ARMS, (champion, challenger))
             if s.impressions < cfg.min_impressions]
    if short:
        return Judgement("wait", f"impressions below {cfg.min_impressions}: {', '.join(short)}")
    lo, hi = diff_interval(champion, challenger, z)
    ctrs = (f"CTR challenger {challenger.ctr:.4f} vs champion {champion.ctr:.4f}, difference "
            f"in [{lo:+.4f}, {hi:+.4f}] at {cfg.confidence:.0%}")
    if hi < -cfg.margin:
        return Judgement("rollback", f"{ctrs}: worse by more than {cfg.margin}", (lo, hi))
    if lo > -cfg.margin:
        return Judgement("promote", f"{ctrs}: not worse by more than {cfg.margin}", (lo, hi))
    if cfg.max_impressions is not None and min(champion.impressions, challenger.impressions) \
            >= cfg.max_impressions:
        return Judgement("rollback", f"{ctrs}: undecided after {cfg.max_impressions} "
                         "impressions per arm", (lo, hi))
    return Judgement("wait", f"{ctrs}: undecided", (lo, hi))


def decide(champion: ArmStats, challenger: ArmStats, cfg: CanaryConfig) -> Verdict:
    """``judge``'s verdict alone."""
    return judge(champion, challenger, cfg).verdict


# --- the loop and the registry -------------------------------------------------------------


Stats = Callable[[], tuple[ArmStats, ArmStats]]
"""A source of (champion, challenger) stats since the canary started."""


@dataclass
class CanaryResult:
    name: str
    version: str
    verdict: Literal["promote", "rollback", "abandoned"]
    reason: str
    champion: ArmStats
    challenger: ArmStats
    champion_version: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_canary(uri: str, name: str, stats: Stats, cfg: CanaryConfig, *,
               version: str | None = None, sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> CanaryResult:
    """Judge ``name@canary`` (or ``version``, which must be it) until decided, then promote it
    or roll it back in the registry. ``abandoned``: ``@canary`` moved to another version or
    went meanwhile (another canary or a person decided), or the champion moved before the
    promotion; the aliases are left as they are then."""
    from recsys.tracking.registry import CHAMPION, alias_version

    version = version or alias_version(uri, name, CANARY)
    if version is None:
        raise LookupError(f"{name}: no @{CANARY} to judge")
    champion_version = alias_version(uri, name, CHAMPION)
    started = clock()
    a = b = ArmStats()
    while True:
        try:
            a, b = stats()
            result = judge(a, b, cfg)
        except Exception as e:  # noqa: BLE001 (a source down for a while: the timeout decides)
            log.exception("%s canary of v%s: reading the stats failed", name, version)
            result = Judgement("wait", f"stats unavailable ({type(e).__name__}: {e})")
        if result.verdict == "wait" and clock() - started > cfg.timeout_s:
            result = Judgement("rollback", f"undecided after {cfg.timeout_s:.0f} s: "
                               f"{result.reason}")
        if alias_version(uri, name, CANARY) != version:
            return CanaryResult(name, version, "abandoned", f"@{CANARY} no longer points "
                                f"at v{version}", a, b, champion_version, clock() - started)
        if result.verdict != "wait":
            break
        log.info("%s canary of v%s: %s", name, version, result.reason)
        sleep(cfg.poll_s)
    out = CanaryResult(name, version, result.verdict, result.reason, a, b, champion_version,
                       clock() - started)
    _tag(uri, name, version, out)
    if result.verdict == "promote":
        _promote(uri, name, version, champion_version, out)
    else:
        reject(uri, name, version, f"canary: {result.reason}")
    log.info("%s canary of v%s: %s (%s)", name, version, out.verdict, out.reason)
    return out


def _promote(uri: str, name: str, version: str, champion_version: str | None,
             out: CanaryResult) -> None:
    from recsys.tracking.errors import RegistryError
    from recsys.tracking.registry import promote

    try:
        promote(uri, name, version, f"canary: {out.reason}"[:4000],
                if_champion=champion_version)  # clears @challenger if on it
    except RegistryError as e:  # the champion moved during the canary: compared with another
        out.verdict, out.reason = "abandoned", str(e)
        return
    clear_alias(uri, name, CANARY, version)


def clear_alias(uri: str, name: str, alias: str, version: str) -> bool:
    """Remove ``@alias`` if it still points at ``version`` (under the champion lock, as the
    registry's alias moves are); returns whether it did."""
    from recsys.tracking.champion_lock import champion_lock
    from recsys.tracking.errors import delete_alias
    from recsys.tracking.runs import client

    c = client(uri)
    with champion_lock(uri, name):
        if str((c.get_registered_model(name).aliases or {}).get(alias)) != version:
            return False
        delete_alias(c, name, alias)
        return True


def reject(uri: str, name: str, version: str, reason: str) -> None:
    """Roll a challenger back: ``@canary`` and ``@challenger`` cleared (if still on it), the
    version tagged ``role=rejected`` with the reason."""
    from recsys.tracking.challenger import clear_challenger
    from recsys.tracking.runs import client

    c = client(uri)
    for k, v in {"role": "rejected", "decision": reason[:4000],
                 "rejected_at": str(int(time.time()))}.items():
        c.set_model_version_tag(name, version, k, v)
    clear_challenger(uri, name, version)
    clear_alias(uri, name, CANARY, version)


def _tag(uri: str, name: str, version: str, out: CanaryResult) -> None:
    from recsys.tracking.runs import client

    tags = {"canary_verdict": out.verdict, "canary_reason": out.reason[:4000],
            "canary_champion": out.champion_version or "",
            **{f"canary_{arm}_{k}": str(v) for arm, s in zip(ARMS, (out.champion,
                                                                   out.challenger))
               for k, v in asdict(s).items()}}
    c = client(uri)
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)


# --- stats sources -------------------------------------------------------------------------


def feedback_stats(feedback_dir: str | Path, platform: str, champion_version: str | None,
                   challenger_version: str, since: float | None = None) -> tuple[ArmStats,
                                                                                  ArmStats]:
    """Per arm from the gateway's feedback log (``<feedback_dir>/<platform>/*.parquet``, one
    row per item shown or acted on: ``request_id``, ``item_id``, ``event_type``,
    ``served_by``, ``model_version``, ``timestamp``): requests and impressions of the arm's
    version answered by the model (the popular fallback is the same for both), and clicks on
    them (joined by request and item). ``since``: unix seconds."""
    import pyarrow.dataset as ds

    files = sorted(f for f in Path(feedback_dir, platform).glob("*.parquet")
                   if not f.name.startswith("."))  # a file being written is hidden
    arms = {"champion": ArmStats(), "challenger": ArmStats()}
    if not files:
        return arms["champion"], arms["challenger"]
    df = ds.dataset([str(f) for f in files], format="parquet").to_table().to_pandas()
    if since is not None and len(df):
        ts = df["timestamp"]
        if hasattr(ts, "dt"):  # a timestamp column (naive: UTC)
            import pandas as pd

            df = df[ts >= pd.Timestamp(since, unit="s", tz="UTC" if ts.dt.tz else None)]
        else:  # unix seconds
            df = df[ts.astype(float) >= since]
    shown = df[df["event_type"] == "impression"]
    if "source" in shown:  # popular answers do not depend on the model: not compared
        shown = shown[shown["source"].fillna("model") == "model"]
    versions = {"champion": champion_version, "challenger": challenger_version}
    clicks = df[df["event_type"] == "click"][["request_id", "item_id"]].drop_duplicates()
    for arm, v in versions.items():
        mine = shown[(shown["served_by"] == arm)
                     & (shown["model_version"].astype(str) == str(v))]
        hit = mine.merge(clicks, on=["request_id", "item_id"], how="inner")
        arms[arm] = ArmStats(requests=int(mine["request_id"].nunique()),
                             impressions=len(mine), clicks=len(hit))
    return arms["champion"], arms["challenger"]


def serve_counts(app_name: str, platform: str) -> dict[str, Any]:
    """The canary counts of a Serve app's Recommender for ``platform``
    (``Recommender.canary_stats``: one replica's counts per call)."""
    from ray import serve

    handle = serve.get_deployment_handle("Recommender", app_name=app_name)
    return dict(handle.canary_stats.remote(platform).result())


def serve_errors(app_name: str, platform: str) -> Stats:
    """The challenger's fallbacks that the app's Recommender counted since this call, as a
    stats source for ``combined`` (a replica's counters restart with it: never negative)."""
    base = serve_counts(app_name, platform)["fallbacks"]

    def read() -> tuple[ArmStats, ArmStats]:
        now = serve_counts(app_name, platform)["fallbacks"]
        return ArmStats(), ArmStats(errors=max(0, now - base))

    return read


def combined(traffic: Stats, errors: Stats) -> Stats:
    """Impressions and clicks from ``traffic``, the challenger's errors from ``errors``."""

    def read() -> tuple[ArmStats, ArmStats]:
        (a, b), (_, e) = traffic(), errors()
        return a, replace(b, errors=e.errors)

    return read
