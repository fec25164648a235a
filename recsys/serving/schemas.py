"""Request and response bodies of the recommendation endpoint, shared by the app and the tests.

Limits live here (not in the app) so that the OpenAPI schema states them and FastAPI answers a
violation with 422 before any model code runs.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_K = 100
MAX_RECENT_ITEMS = 200
PLATFORM_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # recsys.data.schema.validate_platform_name
REQUEST_ID_PATTERN = r"^[0-9a-f]{32}$"
# Not Serve's own x-request-id: that one is a trace id the client may set.
REQUEST_ID_HEADER = "x-recsys-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex


def _encodable(value: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no hash or tokenizer can encode: 422."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]
ItemId = Annotated[Text, Field(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Filters(_Body):
    """Restrict the candidates; case and whitespace are ignored (as in the feature vocabulary)."""

    category: Text | None = Field(None, min_length=1, max_length=256,
                                 description="a category path prefix, e.g. 'kitchen' or "
                                             "'kitchen > cookware'")
    brand: Text | None = Field(None, min_length=1, max_length=256)


class RecommendRequest(_Body):
    platform: str = Field(pattern=PLATFORM_PATTERN, description="the shop to recommend for")
    user_id: Text | None = Field(None, min_length=1, max_length=256,
                                description="raw user id; pseudonymised before the lookup")
    recent_items: list[ItemId] = Field(
        default_factory=list, max_length=MAX_RECENT_ITEMS,
        description="item ids of this platform seen in the current session, oldest first; "
                    "appended after the stored history")
    k: int = Field(10, ge=1, le=MAX_K)
    filters: Filters | None = None


class Reason(BaseModel):
    model_config = ConfigDict(frozen=True)  # shared by the items of one answer

    text: str = Field(description="why, in a few words: 'because you viewed <title>', 'based on "
                                  "your activity', 'popular on <platform>', 'matches your query'")
    item_id: str | None = Field(None, description="the item of the user's history on this "
                                "platform that the recommended one is most like (never an item "
                                "of another platform)")
    platform: str | None = Field(None, description="the platform of item_id")


class Item(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="cosine similarity (model, search) or event count (popular)")
    brand: str | None = None
    category: list[str] | None = None
    reason: Reason | None = Field(None, description="why this item (none when the platform's "
                                  "rules switch reasons off)")


class RecommendResponse(BaseModel):
    platform: str
    source: Literal["model", "popular"] = Field(
        description="model: the user tower answered; popular: no usable history")
    items: list[Item]
    model_version: str | None = None
    request_id: str = Field(default_factory=new_request_id, description="this answer's id "
                            "(also the x-recsys-request-id header): what POST /feedback refers to")
    served_by: Literal["champion", "challenger"] = Field(
        "champion", description="which model arm answered (challenger: a canary's share)")


class FeedbackRequest(_Body):
    """What a user did with an item of an answer (POST /feedback)."""

    platform: str = Field(pattern=PLATFORM_PATTERN)
    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="the answer's request_id")
    user_id: Text | None = Field(None, min_length=1, max_length=256,
                                description="raw user id; pseudonymised before it is logged")
    item_id: ItemId
    event_type: Literal["click", "cart", "purchase"]
    timestamp: datetime | None = Field(None, description="when it happened (default: on "
                                       "arrival; without a zone: UTC)")


class FeedbackAccepted(BaseModel):
    request_id: str
    status: Literal["accepted"] = "accepted"


class SearchRequest(_Body):
    platform: str = Field(pattern=PLATFORM_PATTERN)
    query: Text = Field(min_length=1, max_length=512)
    k: int = Field(10, ge=1, le=MAX_K)


class SearchResponse(BaseModel):
    platform: str
    query: str
    items: list[Item]
    model_version: str | None = None


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str
    export_path: str
    platforms: list[str]
    search: bool = Field(description="whether /search is available (text encoder loaded)")


class Health(BaseModel):
    status: Literal["ok", "ready", "stale", "loading"] = Field(
        description="stale: serving, but the newest champion failed to load")
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str
