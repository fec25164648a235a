"""The canary on a model replica (``recsys.serving.canary``): which users the challenger
answers, and how a replica follows the ``@challenger`` alias (load, swap, drop, a failed load
answered by the champion), with stand-in slots: no Ray, no registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from recsys.serving.args import AppArgs
from recsys.serving.canary import Canary, CanaryArgs, arm_of, challenger_uri, routing_key
from recsys.serving.schemas import RecommendRequest


def test_arms_are_deterministic_and_split_by_the_share() -> None:
    keys = [f"shop\x00u\x00user{i}" for i in range(20_000)]
    arms = [arm_of(k, 0.3) for k in keys]
    assert arms == [arm_of(k, 0.3) for k in keys]  # same user, same arm, on any replica
    share = arms.count("challenger") / len(keys)
    assert abs(share - 0.3) < 0.015, share
    # Growing the share only moves champion users over: nobody flips back.
    assert all(arm_of(k, 0.5) == "challenger" for k, a in zip(keys, arms) if a == "challenger")
    assert {arm_of(k, 0.0) for k in keys[:500]} == {"champion"}
    assert {arm_of(k, 1.0) for k in keys[:500]} == {"challenger"}
    assert arm_of(None, 1.0) == "champion"


def test_routing_key_is_the_user_else_the_session() -> None:
    user = RecommendRequest(platform="shop", user_id="alice", recent_items=["i1"])
    session = RecommendRequest(platform="shop", recent_items=["i1", "i2"])
    assert routing_key(user) == routing_key(user.model_copy(update={"recent_items": []}))
    assert routing_key(user) != routing_key(user.model_copy(update={"platform": "other"}))
    assert routing_key(session) is not None and "alice" not in routing_key(session)
    assert routing_key(RecommendRequest(platform="shop")) is None


def test_challenger_uri_sits_beside_the_champion() -> None:
    assert challenger_uri("models:/recsys-shop@champion", "challenger") \
        == "models:/recsys-shop@challenger"
    assert challenger_uri("models:/recsys-shop/3", "challenger") is None
    assert challenger_uri("runs/demo/train/pretrain/export", "challenger") is None


def test_app_args_validate_the_canary() -> None:
    assert AppArgs().canary.share == 0.0
    assert AppArgs(canary={"share": 0.25}).canary.alias == "canary"
    with pytest.raises(ValueError, match="share"):
        AppArgs(canary={"share": 1.5})


@dataclass
class FakeSlot:
    uri: str
    version: str
    discarded: list[str] = field(default_factory=list)
    retired: bool = False

    @property
    def predictor(self) -> SimpleNamespace:
        return SimpleNamespace(source=SimpleNamespace(
            version=self.version, discard=lambda: self.discarded.append(self.version)))


class Loader:
    """``Canary``'s loader: the registry's challenger version, or a failure for broken ones."""

    def __init__(self) -> None:
        self.version, self.broken, self.calls = "2", set(), 0

    def __call__(self, model: str, uri: str) -> FakeSlot:
        self.calls += 1
        if self.version in self.broken:
            raise ValueError(f"version {self.version}: model.safetensors is truncated")
        return FakeSlot(uri, self.version)


def _canary(share: float = 0.5) -> tuple[Canary, Loader, list[tuple[str, str, str]]]:
    loader, counted = Loader(), []
    return (Canary(CanaryArgs(share=share), loader, lambda *a: counted.append(a)), loader,
            counted)


CHAMPION = FakeSlot("models:/recsys-shop@champion", "1")


def _follow(canary: Canary, version: str | None) -> None:
    canary._follow("shop", "models:/recsys-shop@canary", version, CHAMPION,
                   poll_interval_s=1.0, backoff_max_s=4.0)


def _users(canary: Canary, n: int = 200) -> dict[str, int]:
    served = {"champion": 0, "challenger": 0}
    for i in range(n):
        slot = canary.route("shop", RecommendRequest(platform="shop", user_id=f"u{i}"))
        served["challenger" if slot is not None else "champion"] += 1
    return served


def test_a_replica_loads_swaps_and_drops_the_challenger() -> None:
    canary, loader, _ = _canary()
    assert _users(canary)["challenger"] == 0  # no challenger yet: all on the champion
    _follow(canary, "2")
    assert canary.slots["shop"].version == "2"
    served = _users(canary)
    assert 70 < served["challenger"] < 130, served
    _follow(canary, "2")
    assert loader.calls == 1  # the same version is not loaded again
    loader.version = "3"
    old = canary.slots["shop"]
    _follow(canary, "3")  # a newer challenger replaces it, the old files go
    assert canary.slots["shop"].version == "3" and old.retired and old.discarded == ["2"]
    _follow(canary, None)  # rolled back: the alias is gone
    assert canary.slots == {} and _users(canary)["challenger"] == 0
    _follow(canary, "3")
    _follow(canary, CHAMPION.version)  # promoted: it is the champion now
    assert canary.slots == {}


def test_a_challenger_that_fails_to_load_falls_back_to_the_champion() -> None:
    canary, loader, counted = _canary()
    loader.broken.add("2")
    _follow(canary, "2")
    assert canary.slots == {} and canary.failed["shop"].attempts == 1
    served = _users(canary)
    assert served["challenger"] == 0
    stats = canary.stats("shop")
    assert stats["failed_version"] == "2" and stats["fallbacks"] > 50
    assert counted and set(counted) == {("shop", "challenger", "fallback")}
    _follow(canary, "2")  # before its retry time: not tried again
    assert loader.calls == 1
    canary.failed["shop"].retry_at = 0.0
    _follow(canary, "2")
    assert loader.calls == 2 and canary.failed["shop"].attempts == 2
    _follow(canary, None)  # rolled back: nothing is held, nothing more counted
    assert canary.failed == {} and canary.stats("shop")["failed_version"] is None


def test_no_share_no_canary() -> None:
    canary, loader, _ = _canary(share=0.0)
    canary.poll({"shop": CHAMPION}, "http://127.0.0.1:1", 1.0, 4.0)  # not even asked
    assert not canary.enabled and loader.calls == 0 and _users(canary)["challenger"] == 0
