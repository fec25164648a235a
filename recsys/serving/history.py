"""What serving knows about users: recent items and purchases per (pseudonym, platform), read
once from the lake at start-up, plus each platform's popular items.

Built the way the example set builds sequences (events sorted by time, a view->click->cart->
purchase funnel on one item collapsed into one interaction, the last ``max_len`` kept), so the
user tower sees histories like the ones it was trained on. Memory grows with users x max_len:
about 100 bytes per kept item in Python objects; a store for millions of users belongs in a
key-value service, this one suits a demo or a shop of modest size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.lake import list_platforms, read_events
from recsys.data.schema import IMPRESSION

log = logging.getLogger(__name__)

PURCHASE = "purchase"


@dataclass(frozen=True)
class UserHistory:
    """One user's recent interactions on one platform, oldest first."""

    items: tuple[str, ...]
    times_us: tuple[int, ...]  # event time of each item (UTC microseconds), for merging platforms
    purchased: frozenset[str]


@dataclass
class HistoryStore:
    """Per pseudonymous user: {platform: UserHistory}; per platform: items by event count."""

    users: dict[str, dict[str, UserHistory]] = field(default_factory=dict)
    popular: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    max_len: int = 50
    source: str | None = None

    def lookup(self, pseudonym: str) -> dict[str, UserHistory]:
        """The user's histories by platform ({} for an unknown user)."""
        return self.users.get(pseudonym, {})

    @property
    def num_users(self) -> int:
        return len(self.users)

    @classmethod
    def from_lake(cls, lake: str | Path, platforms: Iterable[str] | None = None,
                  max_len: int = 50, event_types: list[str] | None = None,
                  collapse_repeats: bool = True) -> HistoryStore:
        """Read the events of ``platforms`` (default: all in the lake) into a store."""
        lake = Path(lake)
        if not lake.is_dir():
            raise FileNotFoundError(f"lake {lake} not found (serving reads user histories from "
                                    "LAKE/platform=*/events)")
        names = list(platforms) if platforms is not None else list_platforms(lake)
        started = time.perf_counter()
        store = cls(max_len=max_len, source=str(lake))
        for name in names:
            events = read_events(lake, name)
            store.add_platform(name, events, event_types, collapse_repeats)
        log.info("history store: %d users on %s from %s in %.1f s", store.num_users, names, lake,
                 time.perf_counter() - started)
        return store

    def add_platform(self, platform: str, events: pa.Table,
                     event_types: list[str] | None = None,
                     collapse_repeats: bool = True) -> None:
        """Add one platform's events (lake schema) to the store. Impressions are exposures,
        not interactions: they count towards neither histories nor popularity."""
        events = events.filter(pc.not_equal(events["event_type"], IMPRESSION))
        counts = pc.value_counts(events["item_id"]).flatten()  # popularity over all event types
        order = sorted(zip(counts[0].to_pylist(), counts[1].to_pylist()),
                       key=lambda t: (-t[1], t[0]))
        self.popular[platform] = [(item, int(n)) for item, n in order]
        if event_types is not None:
            events = events.filter(pc.is_in(events["event_type"], pa.array(event_types)))
        events = events.sort_by([("user_id", "ascending"), ("timestamp", "ascending"),
                                 ("event_index", "ascending")])
        users = events["user_id"].to_numpy(zero_copy_only=False)
        items = events["item_id"].to_numpy(zero_copy_only=False)
        times = events["timestamp"].cast(pa.int64()).to_numpy()
        kinds = events["event_type"].to_numpy(zero_copy_only=False)
        n = len(users)
        if n == 0:
            return
        new_user = np.ones(n, bool)
        new_user[1:] = users[1:] != users[:-1]
        keep = np.ones(n, bool)
        if collapse_repeats:
            keep[1:] = new_user[1:] | (items[1:] != items[:-1])
        starts = np.flatnonzero(new_user)
        ends = np.append(starts[1:], n)
        bought = kinds == PURCHASE
        for s, e in zip(starts.tolist(), ends.tolist()):
            rows = np.arange(s, e)[keep[s:e]][-self.max_len:]
            purchased = frozenset(items[s:e][bought[s:e]].tolist())
            self.users.setdefault(users[s], {})[platform] = UserHistory(
                items=tuple(items[rows].tolist()), times_us=tuple(times[rows].tolist()),
                purchased=purchased)
