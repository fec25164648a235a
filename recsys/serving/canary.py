"""The canary on a model replica: a share of each platform's users is answered by its
``@canary`` (a challenger that passed the offline gate) while the judge
(``recsys.production.canary``) compares the two arms.

Which arm answers is a pure function of the request (``arm_of``): a hash of the raw user
id (or, for an anonymous request, of its session items) below ``share`` goes to the challenger.
Every replica, and every request of one user, agree without any shared state; a user sees one
model for the whole canary. Requests with neither (the popular fallback answers those, the same
for both arms) stay on the champion.

A replica holds a challenger ``ModelSlot`` beside the champion's of a platform for as long as
``models:/<name>@<alias>`` (``alias``: ``canary``) exists and differs from the champion's
version: found, loaded, swapped and dropped by the replica's alias poller (``Canary.poll``),
never on the request path. When the judge promotes (``@champion`` moves to it, ``@canary`` is
cleared) or rolls back (``@canary`` cleared), the next poll drops the slot. A challenger that
fails to load or raises never fails a request: the champion answers in its place and the
fallback is counted (``recsys_canary_requests{outcome="fallback"}`` and ``Canary.stats``), which
is what the judge reads as the challenger's errors.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from recsys.config import StrictModel
from recsys.serving.model_source import (
    is_registry_uri,
    parse_models_uri,
    registry_version,
)
from recsys.serving.schemas import RecommendRequest
from recsys.serving.slots import ModelSlot

log = logging.getLogger("recsys.serve")

Arm = Literal["champion", "challenger"]
_SCALE = float(2**64)


class CanaryArgs(StrictModel):
    """The app's ``canary`` args: which share of users the challenger answers."""

    share: float = Field(0.0, ge=0, le=1, description="share of users (by a hash of their id) "
                         "answered by the platform's canary version while it has one (0: no "
                         "canary, no second model is loaded)")
    alias: str = Field("canary", pattern=r"^[A-Za-z0-9_-]{1,64}$",
                       description="registry alias of the version in a canary (set by the "
                                   "offline gate, recsys.production.gate), beside the champion's "
                                   "model_uri (which must be a models:/<name>@<alias> uri)")


def arm_of(key: str | None, share: float) -> Arm:
    """The arm of a routing key: the challenger for a ``share`` of keys (deterministic)."""
    if key is None or share <= 0:
        return "champion"
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"recsys-canary").digest()
    return "challenger" if int.from_bytes(digest, "big") / _SCALE < share else "champion"


def routing_key(body: RecommendRequest) -> str | None:
    """What a request is routed by: its platform and user, else its session items."""
    if body.user_id is not None:
        return f"{body.platform}\x00u\x00{body.user_id}"
    if body.recent_items:
        return f"{body.platform}\x00s\x00" + "\x00".join(body.recent_items)
    return None


def challenger_uri(champion_uri: str, alias: str) -> str | None:
    """``models:/<name>@<alias>`` beside a champion's ``models:/<name>@<its alias>``; None for
    a uri that follows no alias (a fixed version or a local export: no canary)."""
    if not is_registry_uri(champion_uri):
        return None
    ref = parse_models_uri(champion_uri)
    return None if ref.alias is None else f"models:/{ref.name}@{alias}"


@dataclass
class _Failed:
    version: str
    attempts: int
    retry_at: float


class Canary:
    """The challenger slots of one replica, the routing, and what each arm did.

    ``load(model, uri)`` makes a ``ModelSlot`` for ``uri`` (the replica's own loader);
    ``count(platform, arm, outcome)`` records a request (Serve metrics)."""

    def __init__(self, args: CanaryArgs, load: Callable[[str, str], ModelSlot],
                 count: Callable[[str, str, str], None] | None = None) -> None:
        self.args = args
        self._load, self._count = load, count or (lambda *_: None)
        self.slots: dict[str, ModelSlot] = {}
        self.failed: dict[str, _Failed] = {}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.fallbacks: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self.args.share > 0

    def route(self, model: str, body: RecommendRequest) -> ModelSlot | None:
        """The challenger slot that answers ``body``, or None (the champion does). A request
        routed to a challenger that failed to load is counted as its fallback here."""
        if not self.enabled or arm_of(routing_key(body), self.args.share) == "champion":
            return None
        slot = self.slots.get(model)
        if slot is None and model in self.failed:
            self.fell_back(model, body.platform)
        return slot

    def answered(self, model: str, platform: str, arm: Arm) -> None:
        self.requests[(model, arm)] += 1
        self._count(platform, arm, "answered")

    def fell_back(self, model: str, platform: str) -> None:
        self.fallbacks[model] += 1
        self._count(platform, "challenger", "fallback")

    def stats(self, model: str) -> dict[str, Any]:
        """This replica's counts for ``model`` (``recsys.production.canary.serve_errors``)."""
        slot, failed = self.slots.get(model), self.failed.get(model)
        return {"challenger": slot.predictor.source.version if slot else None,
                "failed_version": failed.version if failed else None,
                "requests": {arm: self.requests[(model, arm)]
                             for arm in ("champion", "challenger")},
                "fallbacks": self.fallbacks[model]}

    def poll(self, champions: dict[str, ModelSlot], tracking: str | None,
             poll_interval_s: float, backoff_max_s: float) -> None:
        """One check per champion held: load, swap or drop its challenger."""
        if not self.enabled:
            return
        for model in [m for m in self.slots if m not in champions]:  # the champion went
            self.drop(model)
        for model, champion in champions.items():
            uri = challenger_uri(champion.uri, self.args.alias)
            if uri is None or tracking is None:
                continue
            try:
                version: str | None = registry_version(parse_models_uri(uri), tracking)
            except LookupError:
                version = None
            except Exception:  # noqa: BLE001 (the registry is unreachable: ask again later)
                log.exception("checking %s failed", uri)
                continue
            self._follow(model, uri, version, champion, poll_interval_s, backoff_max_s)

    def _follow(self, model: str, uri: str, version: str | None, champion: ModelSlot,
                poll_interval_s: float, backoff_max_s: float) -> None:
        if version is None or version == champion.predictor.source.version:
            self.drop(model)  # rolled back, promoted, or never there
            return
        slot = self.slots.get(model)
        if slot is not None and slot.predictor.source.version == version:
            return
        failed = self.failed.get(model)
        if failed is not None and failed.version == version and time.monotonic() < \
                failed.retry_at:
            return
        self.drop(model, keep_failure=True)
        try:
            self.slots[model] = self._load(model, uri)
        except Exception as e:  # noqa: BLE001 (a broken challenger never breaks serving)
            attempts = failed.attempts + 1 if failed and failed.version == version else 1
            delay = min(backoff_max_s, poll_interval_s * 2 ** attempts)
            self.failed[model] = _Failed(version, attempts, time.monotonic() + delay)
            log.error("challenger %s version %s failed to load (attempt %d); the champion "
                      "answers its share: %s: %s", uri, version, attempts, type(e).__name__, e)
            return
        self.failed.pop(model, None)
        log.info("canary: %s version %s answers %.0f%% of %s's users", uri, version,
                 100 * self.args.share, model)

    def drop(self, model: str, keep_failure: bool = False) -> None:
        slot = self.slots.pop(model, None)
        if not keep_failure:
            self.failed.pop(model, None)
        if slot is not None:
            slot.retired = True
            slot.predictor.source.discard()
            log.info("canary: dropped the challenger of %s (version %s)", model,
                     slot.predictor.source.version)
