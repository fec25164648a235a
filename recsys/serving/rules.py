"""The serving rules per platform (app config, never a request field) and the reasons that come
with each recommended item.

Rules are the server's: if a request could switch one off, comparing the answers with and without
it would tell the caller what the user bought or viewed (issue 20). Each platform's entry sets only
what differs from ``default``::

    rules:
      default: {exclude_session_items: true, repurchase: false, reasons: true}
      grocer: {repurchase: true}        # a grocery-like shop: people buy the same things again

A reason names the history item most like the recommended one (cosine in the item space the
scores use), only when that item is of the request's own platform: a user's items on other
platforms are other shops' data, so their contribution is "based on your activity", unnamed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, RootModel, model_validator

from recsys.config import StrictModel
from recsys.data.schema import validate_platform_name
from recsys.serving.schemas import Reason

DEFAULT = "default"
MAX_TITLE = 60  # characters of a title in a reason; longer ones are cut with an ellipsis
ACTIVITY = Reason(text="based on your activity")  # a history item of another platform
QUERY = Reason(text="matches your query")


class PlatformRules(StrictModel):
    """What one platform's answers may contain."""

    exclude_session_items: bool = Field(True, description="never recommend back the request's "
                                        "recent_items (what the user is looking at right now)")
    repurchase: bool = Field(False, description="false: never recommend what the user bought "
                             "on this platform; true: bought items may come back (a grocery-like "
                             "shop, where people re-buy)")
    reasons: bool = Field(True, description="each returned item says why (the history item it "
                          "is most like, 'popular on <platform>', 'matches your query')")
    rerank_top_n: int = Field(0, ge=0, le=1000, description="0: the retrieval's order; N: the "
                              "CTR head re-orders the retrieval's top N (at least k) by click "
                              "probability, which becomes the items' score")


class ServingRules(RootModel[dict[str, PlatformRules]]):
    """``{default: PlatformRules, <platform>: PlatformRules}``; a platform's entry overrides
    only the fields it sets, the rest come from ``default`` (itself defaulting to
    ``PlatformRules()``). Resolved when validated: every entry then holds all its fields, so a
    dump validates back to the same rules."""

    root: dict[str, PlatformRules] = Field(default_factory=lambda: {DEFAULT: PlatformRules()})

    @model_validator(mode="after")
    def _resolve(self) -> ServingRules:
        bad = []
        for name in self.root:
            if name != DEFAULT:
                try:
                    validate_platform_name(name)
                except ValueError as e:
                    bad.append(f"rules.{name}: {e}")
        if bad:
            raise ValueError("; ".join(bad))
        default = self.root.get(DEFAULT) or PlatformRules()
        self.root = {DEFAULT: default, **{
            name: PlatformRules(**{**default.model_dump(), **own.model_dump(exclude_unset=True)})
            for name, own in self.root.items() if name != DEFAULT}}
        return self

    def of(self, platform: str) -> PlatformRules:
        """The rules that apply on ``platform``."""
        return self.root.get(platform) or self.root[DEFAULT]

    def platforms(self) -> list[str]:
        """The platforms with an entry of their own."""
        return sorted(set(self.root) - {DEFAULT})


def closest(history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """For each item (k, D), the row of ``history`` (L, D) with the highest cosine: (k,) long.
    One (k, D) x (D, L) product per request: O(k L D)."""
    sims = F.normalize(items, dim=-1) @ F.normalize(history, dim=-1).T       # (k, L)
    return sims.argmax(dim=1)


@torch.inference_mode()
def explain(platform: str, titles: list[str | None], item_ids: list[str],
            history: torch.Tensor, rows: list[tuple[str, int]], items: torch.Tensor
            ) -> list[Reason]:
    """Per returned item (``items`` (k, D) of ``platform``'s catalog), the history item that
    the user tower was fed (``history`` (L, D), ``rows`` (platform, item index) each) that it is
    most like: named when it is of ``platform`` (its ``titles``/``item_ids``, index i at i - 1),
    "based on your activity" when it is another platform's."""
    if not len(items):
        return []
    out = []
    for row in closest(history, items).tolist():
        source, i = rows[row]
        out.append(viewed(titles[i - 1] or "", item_ids[i - 1], platform)
                   if source == platform else ACTIVITY)
    return out


def viewed(title: str, item_id: str, platform: str) -> Reason:
    """"because you viewed <title>" naming one of the user's items on the request's platform.
    Never "bought": a key scoped to the platform must not learn what a user bought
    (docs/security.md), and every interaction in a view -> purchase funnel was a view."""
    title = title.strip() or item_id
    if len(title) > MAX_TITLE:
        title = title[:MAX_TITLE - 1].rstrip() + "…"
    return Reason(text=f"because you viewed {title}", item_id=item_id, platform=platform)


def popular(platform: str) -> Reason:
    return Reason(text=f"popular on {platform}")


def rerank(ctr_logit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], user: torch.Tensor,
           items: torch.Tensor, idx: list[int], k: int) -> tuple[list[int], list[float]]:
    """The second stage: the retrieval's candidates ``idx`` (their vectors ``items``, (N, D))
    re-ordered by the CTR head's click probability sigma(w . [u; i; u * i]) for ``user`` (D,);
    the top ``k`` with their probabilities. O(N D), once per request."""
    if not idx:
        return [], []
    probs = torch.sigmoid(ctr_logit(user.expand(len(idx), -1), items))          # (N,)
    top = torch.topk(probs, min(k, len(idx)))
    return [idx[i] for i in top.indices.tolist()], top.values.tolist()
