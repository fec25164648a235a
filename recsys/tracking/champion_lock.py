"""The champion lock: compare-and-set for moves of ``@champion`` in an MLflow registry.

MLflow has no conditional write, and "read, write, re-read to verify" is no CAS: two writers can
both verify before either is overwritten, and one move is lost. A file lock next to the database
would hold on one machine only, while the registry may be a remote server. The one atomic step
every MLflow registry offers is creating a registered model: a second create of the same name
fails with RESOURCE_ALREADY_EXISTS, decided by the store's unique key. So ``champion_lock``
creates ``<name>.champion-lock`` (holder, token and lease expiry as its tags) and deletes it when
done (``recsys.tracking.registry`` makes every move under it). A lock left by a crashed process
is broken once its lease has expired; as with any lease, a holder stalled beyond it could
overlap the next one. The lock shows in the registry's model list while it is held.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from recsys.tracking.errors import RegistryError, already_exists, not_found
from recsys.tracking.runs import client as _client

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".champion-lock"
LOCK_LEASE_S = 300.0
"""A holder makes a handful of requests (MLflow's client retries a failing one for up to ~4
minutes): a lock older than this was left by a crash. Delete ``<name>.champion-lock`` by hand to
release it sooner."""
LOCK_WAIT_S = LOCK_LEASE_S + 60.0  # long enough to outwait a crashed holder's lease


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def champion_lock(uri: str, name: str, *, lease_s: float = LOCK_LEASE_S,
                  wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the champion lock of ``name`` for the block (a registered model that exists while it
    is held); waits up to ``wait_s`` for another holder, breaks a lock whose lease expired."""
    c = _client(uri)
    lock, token = lock_name(name), uuid.uuid4().hex
    deadline, delay = time.monotonic() + wait_s, 0.02
    while not _try_lock(c, lock, token, lease_s):
        if time.monotonic() > deadline:
            held = _lock_tags(c, lock) or {}
            raise RegistryError(
                f"{name}: waited {wait_s:.0f} s for {lock!r}, held by "
                f"{held.get('lock_holder', '?')} until {held.get('lock_expires', '?')} (unix "
                "time): another promotion or rollback is running, or a crashed one left it")
        time.sleep(delay * (0.5 + random.random()))  # jitter: waiters do not retry in step
        delay = min(2 * delay, 0.5)
    try:
        yield
    finally:
        _unlock(c, lock, token, lease_s)


def _try_lock(c: MlflowClient, lock: str, token: str, lease_s: float) -> bool:
    tags = {"lock_token": token, "lock_holder": f"{socket.gethostname()}:{os.getpid()}",
            "lock_expires": f"{time.time() + lease_s:.3f}"}
    try:
        c.create_registered_model(lock, tags=tags, description=(
            "Held while @champion moves (recsys.tracking.registry.champion_lock); "
            "not a model."))
        return True
    except MlflowException as e:
        # "Not found" from a create: under load the server answered for a lock that another
        # holder released meanwhile. Either way the lock's own tags say who holds it now.
        if not (already_exists(e) or not_found(e)):
            raise
    held = _lock_tags(c, lock)
    if held is None:
        return False  # released in between: try again
    if held.get("lock_token") == token:
        return True  # our create went through, its answer was lost and the client retried
    if float(held.get("lock_expires", "0")) < time.time():
        _break_stale(c, lock, held)
    return False


def _lock_tags(c: MlflowClient, lock: str) -> dict[str, str] | None:
    try:
        return dict(c.get_registered_model(lock).tags or {})
    except MlflowException as e:
        if not_found(e):
            return None
        raise


def _break_stale(c: MlflowClient, lock: str, held: dict[str, str]) -> None:
    """Remove a lock whose lease expired: renamed first (of two breakers, one rename wins),
    then deleted. A renamed lock that is not the expired one seen (another waiter broke that one
    and took the lock in between) is put back."""
    stale = f"{lock}.stale-{uuid.uuid4().hex[:8]}"
    try:
        c.rename_registered_model(lock, stale)
    except MlflowException as e:
        if not_found(e):
            return  # broken or released by someone else
        raise
    taken = _lock_tags(c, stale) or {}
    if taken.get("lock_token") != held.get("lock_token"):
        try:
            c.rename_registered_model(stale, lock)
            return
        except MlflowException as e:
            if not already_exists(e):
                raise
            log.warning("%s: broke a live lock of %s while breaking an expired one",
                        lock, taken.get("lock_holder"))
    else:
        log.warning("%s: broke the lock of %s, whose lease expired at %s", lock,
                    held.get("lock_holder"), held.get("lock_expires"))
    c.delete_registered_model(stale)


def _unlock(c: MlflowClient, lock: str, token: str, lease_s: float) -> None:
    held = _lock_tags(c, lock)
    if held is None or held.get("lock_token") != token:
        log.warning("%s: broken while held (held longer than its lease of %.0f s)", lock,
                    lease_s)
        return
    try:
        c.delete_registered_model(lock)
    except MlflowException as e:
        if not not_found(e):
            raise
