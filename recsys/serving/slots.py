"""The models a model replica holds: one ``ModelSlot`` per model uri (a platform's champion, or
the app's one model), each swapped in place when its own alias moves.

Why slots and Serve's model multiplexing (``@serve.multiplexed``, model id = platform) rather
than a deployment per platform: a platform added later is served by loading its champion on
the first request that names it, with no redeploy of anything; Serve routes a platform's
requests to replicas that already hold its model; a replica keeps at most
``max_models_per_replica`` models and unloads the least recently used (its ``__del__`` removes
the downloaded files). A deployment per platform would need the app's config (and the gateway's
handles) changed for every new platform, and would hold every platform's model whether or not
it is asked for.

A slot's model follows its alias: a poller checks every slot, loads a new version beside the
current one and swaps the reference (in-flight requests keep the predictor they started with).
A version that fails to load (a poisoned or broken export: pickle, path escape, truncated
weights, a catalog that does not match) is counted, its downloaded files are removed, and it is
tried again after an exponential backoff; meanwhile the slot serves what it has and says it is
stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from recsys.serving.model_source import is_registry_uri, parse_models_uri, registry_version
from recsys.serving.predictor import Predictor

log = logging.getLogger("recsys.serve")

PLATFORM_FIELD = "{platform}"
SINGLE_MODEL_ID = "default"


def model_id(model_uri: str, platform: str) -> str:
    """The multiplexed model id of a request: its platform when the app serves one model per
    platform (``models:/recsys-{platform}@champion``), else one id for the app's one model."""
    return platform if PLATFORM_FIELD in model_uri else SINGLE_MODEL_ID


def uri_of(model_uri: str, model: str) -> str:
    """The model uri a model id stands for."""
    return model_uri.replace(PLATFORM_FIELD, model) if PLATFORM_FIELD in model_uri else model_uri


@dataclass(frozen=True)
class FailedLoad:
    """A version this slot could not load (it keeps serving the one it has)."""

    version: str
    attempts: int
    error: str
    retry_at: float  # time.monotonic() of the next try


class ModelSlot:
    """One model on a replica: the predictor in use, and the alias it follows."""

    def __init__(self, model: str, uri: str, load: Callable[[str], Predictor],
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.model, self.uri = model, uri
        self._load, self._on_failure = load, on_failure or (lambda _: None)
        self.predictor = load(uri)
        self.failed: FailedLoad | None = None
        self.swaps = 0
        self.retired = False

    @property
    def follows_alias(self) -> bool:
        return is_registry_uri(self.uri) and parse_models_uri(self.uri).alias is not None

    def poll(self, tracking: str | None, poll_interval_s: float, backoff_max_s: float) -> None:
        """One check of the alias: swap in a new version, or retry a failed one when due."""
        if self.retired or not self.follows_alias:
            return
        try:
            version = registry_version(parse_models_uri(self.uri), tracking)
        except Exception:  # noqa: BLE001 (the registry is unreachable: keep serving, ask later)
            log.exception("checking %s failed; still serving version %s", self.uri,
                          self.predictor.source.version)
            return
        failed = self.failed
        if version == self.predictor.source.version:
            self.failed = None  # the alias was moved back to what is served
        elif failed is None or failed.version != version or time.monotonic() >= failed.retry_at:
            self._swap_to(version, failed, poll_interval_s, backoff_max_s)

    def _swap_to(self, version: str, failed: FailedLoad | None, poll_interval_s: float,
                 backoff_max_s: float) -> None:
        started = time.perf_counter()
        try:
            new = self._load(self.uri)  # cleans up its own download when it fails
        except Exception as e:  # noqa: BLE001 (whatever a bad version raises, keep serving)
            attempts = failed.attempts + 1 if failed and failed.version == version else 1
            delay = min(backoff_max_s, poll_interval_s * 2 ** attempts)
            self.failed = FailedLoad(version, attempts, f"{type(e).__name__}: {e}"[:500],
                                     time.monotonic() + delay)
            self._on_failure(parse_models_uri(self.uri).name)
            log.error("%s version %s failed to load (attempt %d, next in %.0f s); still "
                      "serving version %s: %s", self.uri, version, attempts, delay,
                      self.predictor.source.version, self.failed.error)
            return
        if self.retired:  # unloaded while this version loaded: keep nothing of it
            new.source.discard()
            return
        old, self.predictor, self.swaps, self.failed = self.predictor, new, self.swaps + 1, None
        old.source.discard()  # in-flight requests hold the old model in memory, not its files
        log.info("%s -> version %s, swapped in %.1f s", self.uri, new.source.version,
                 time.perf_counter() - started)

    def status(self) -> tuple[str, str]:
        """(``ready`` or ``stale``, what is served and, when stale, which version failed)."""
        p = self.predictor
        serving = f"{p.source.name} version {p.source.version}"
        f = self.failed
        if f is None:
            return "ready", serving
        wait = max(0.0, f.retry_at - time.monotonic())
        return "stale", (f"serving {serving}; version {f.version} failed to load {f.attempts} "
                         f"time(s), next try in {wait:.0f} s: {f.error}")

    def __del__(self) -> None:
        """Serve's LRU unloads a slot by calling this: its files go, the poller skips it."""
        self.retired = True
        predictor = getattr(self, "predictor", None)
        if predictor is not None:
            predictor.source.discard()
