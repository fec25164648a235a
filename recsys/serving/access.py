"""Who may call the endpoint, on which platforms, how often: API keys and per-key rate limits.

Keys come from a file (``api_key_file``, mode 0600, mounted from a k8s Secret on a cluster) or
one environment variable, never from a deployment's ``runtime_env`` (the Ray dashboard shows it
to anyone who can reach the dashboard). The file has one key per line:

    <key>                              # one key, named "default", every platform
    <name> <key> [<platforms>|*] [<requests per second>]

e.g. ``shop_a-backend 3f9c... shop_a 50``: a key scoped to platforms (a shop's backend sees
its own platform only) and its own rate limit. Lines starting with ``#`` are comments.

Auth fails closed: with ``auth: api_key`` (the default) and no key anywhere the gateway refuses
to start; serving without keys takes ``auth: none`` in the config, for a loopback demo.
"""

from __future__ import annotations

import base64
import hmac
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

ANONYMOUS = "anonymous"


class AuthConfigError(ValueError):
    """The endpoint cannot start with this auth configuration (the message says why)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: str = field(repr=False)
    platforms: frozenset[str] | None = None  # None: every platform
    rate_per_s: float | None = None          # None: the app's default


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's name, or ``anonymous`` (only with ``auth: none``)."""

    name: str
    platforms: frozenset[str] | None = None
    rate_per_s: float | None = None

    @property
    def authenticated(self) -> bool:
        return self.name != ANONYMOUS

    def may_use(self, platform: str) -> bool:
        return self.platforms is None or platform in self.platforms


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """The keys of a key file (see the module docstring); errors name the line, not the key."""
    keys: list[ApiKey] = []
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    for n, line in lines:
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            parts = ["default", parts[0]]
        if len(parts) > 4:
            raise AuthConfigError(f"{source}:{n}: expected '<name> <key> [platforms] [rate]'")
        name, secret = parts[0], parts[1]
        if len(secret) < 16:
            raise AuthConfigError(f"{source}:{n}: key {name!r} is shorter than 16 characters")
        platforms = None
        if len(parts) > 2 and parts[2] != "*":
            platforms = frozenset(p for p in parts[2].split(",") if p)
        try:
            rate = float(parts[3]) if len(parts) > 3 else None
        except ValueError:
            raise AuthConfigError(f"{source}:{n}: rate {parts[3]!r} is not a number") from None
        keys.append(ApiKey(name, secret, platforms, rate))
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise AuthConfigError(f"{source}: key names repeat: {sorted(names)}")
    return keys


def load_keys(key_file: str | Path | None, key_env: str | None) -> list[ApiKey]:
    """The keys from ``key_file`` (refused when others may read it) and ``$key_env``."""
    keys: list[ApiKey] = []
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise AuthConfigError(f"api_key_file {path} does not exist")
        # World bits refused; group bits allowed: a k8s Secret mounted with defaultMode 0400
        # and the pod's fsGroup arrives as root:<fsGroup> 0440.
        if os.name == "posix" and path.stat().st_mode & stat.S_IRWXO:
            raise AuthConfigError(f"api_key_file {path} is readable by others: chmod 600 it")
        keys += parse_keys(path.read_text(), str(path))
    if key_env and os.environ.get(key_env):
        keys += parse_keys(os.environ[key_env], f"${key_env}")
    return keys


def check_auth(auth: str, keys: list[ApiKey]) -> None:
    """Fail closed: keys are required unless the config says ``auth: none``."""
    if auth == "api_key" and not keys:
        raise AuthConfigError(
            "no API key configured (api_key_file / $RECSYS_API_KEY): the endpoint refuses to "
            "start. Give it a key, or set auth: none explicitly to serve without one (a "
            "loopback demo only)")
    if auth == "none" and keys:
        raise AuthConfigError("auth: none but API keys are configured: remove one or the other")


def identify(keys: list[ApiKey], header_key: str | None, authorization: str | None
             ) -> Caller | None:
    """The caller a request's ``x-api-key`` header or HTTP Basic password (what a browser sends
    for ``/docs``) belongs to; None: no key matched. Every key is compared in constant time."""
    offered = header_key or _basic_password(authorization)
    if not offered:
        return None
    found = None
    for k in keys:  # no early exit: the time taken does not depend on which key matched
        if hmac.compare_digest(offered.encode(), k.secret.encode()):
            found = k
    return None if found is None else Caller(found.name, found.platforms, found.rate_per_s)


def _basic_password(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second on average, bursts of one
    second's worth. Per gateway replica (n replicas allow n times the rate); the gateway's event
    loop is single-threaded, so no lock is needed."""

    def __init__(self, default_rate: float) -> None:
        self.default_rate = default_rate
        self.buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill)

    def wait_s(self, caller: Caller) -> float:
        """0 if the request may go now (a token is taken), else seconds until one is free."""
        rate = caller.rate_per_s if caller.rate_per_s is not None else self.default_rate
        if rate <= 0:
            return 0.0
        burst = max(1.0, rate)
        now = time.monotonic()
        tokens, last = self.buckets.get(caller.name, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self.buckets[caller.name] = (tokens - 1.0, now)
            return 0.0
        self.buckets[caller.name] = (tokens, now)
        return (1.0 - tokens) / rate
