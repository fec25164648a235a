"""The serving computation without Ray: ranking rules, the popular fallback, cross-platform
users, filters, search, batching, and model resolution (``recsys.serving.predictor``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from recsys.data.pseudonym import Pseudonymizer
from recsys.serving.model_source import parse_models_uri, resolve_model
from recsys.serving.predictor import Predictor, SearchUnavailable, UnknownPlatform
from recsys.serving.rules import ServingRules
from recsys.serving.schemas import RecommendRequest, SearchRequest
from recsys.serving.toy import USERS, ToyWorld, build_toy_world, item_title

PSEUDO = Pseudonymizer(bytes.fromhex("00112233445566778899aabbccddeeff"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_encoder: str, tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    return build_toy_world(tmp_path_factory.mktemp("toy"), tiny_encoder, PSEUDO)


@pytest.fixture(scope="module")
def predictor(world: ToyWorld) -> Predictor:
    return Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO)


def rec(p: Predictor, **kw: object) -> tuple[str, list[str], list[float], list[str]]:
    """Source, ids, scores of an answer, and the platforms of the history it used (internal:
    the response does not say, issue 20)."""
    prepared = p.prepare(RecommendRequest(**kw))
    out = p.recommend_many([prepared])[0]
    return (out.source, [i.item_id for i in out.items], [i.score for i in out.items],
            prepared.history_platforms)


def history_length(p: Predictor, **kw: object) -> int:
    prepared = p.prepare(RecommendRequest(**kw))
    return 0 if prepared.seq is None else int(prepared.seq.shape[0])


def reference_scores(p: Predictor, platform: str, seq: torch.Tensor,
                     marks: list[int] | None = None) -> torch.Tensor:
    """Scores of every item straight from the model's towers (not the predictor's code);
    ``marks``: the platform id of each history item (None: all the platform's own)."""
    cat = p.catalogs[platform]
    with torch.no_grad():
        user = p.model.user_tower(seq[None], torch.ones(1, len(seq), dtype=torch.bool),
                                  torch.tensor([cat.platform_id]),
                                  None if marks is None else torch.tensor([marks]))[0, -1]
        return F.normalize(cat.table, dim=-1) @ F.normalize(user, dim=-1)


@pytest.fixture(scope="module")
def keeping(world: ToyWorld) -> Predictor:
    """A predictor configured to return purchased items too (``repurchase: true``, a server
    rule, not a request field)."""
    return Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False,
                                 rules=rules({"default": {"repurchase": True}}))


def rules(raw: dict) -> ServingRules:
    return ServingRules.model_validate(raw)


def test_known_user_ranking_matches_the_model_and_skips_purchases(predictor: Predictor,
                                                                  keeping: Predictor) -> None:
    source, ids, scores, used = rec(predictor, platform="shop_a", user_id="alice", k=12)
    cat = predictor.catalogs["shop_a"]
    assert source == "model" and used == ["shop_a"]
    assert len(ids) == len(set(ids)) == 10  # 12 items minus the 2 alice bought
    assert not {"shop_a-001", "shop_a-007"} & set(ids)
    assert scores == sorted(scores, reverse=True)
    history = [cat.index[f"shop_a-{n:03d}"] for n in (1, 4, 7, 2)]  # funnels collapsed
    ref = reference_scores(predictor, "shop_a", cat.table[history])
    ref[0] = float("-inf")
    ref[[cat.index["shop_a-001"], cat.index["shop_a-007"]]] = float("-inf")
    top = torch.topk(ref, 10)
    assert ids == [cat.item_ids[i - 1] for i in top.indices.tolist()]
    assert scores == pytest.approx(top.values.tolist(), abs=1e-5)
    _, with_bought, _, _ = rec(keeping, platform="shop_a", user_id="alice", k=12)
    assert sorted(with_bought) == sorted(cat.item_ids)


def test_recent_items_extend_the_history(predictor: Predictor) -> None:
    cat = predictor.catalogs["shop_a"]
    _, ids, _, _ = rec(predictor, platform="shop_a", user_id="alice", k=3,
                       recent_items=["shop_a-005", "unknown-id", "shop_b-001"])
    history = [cat.index[f"shop_a-{n:03d}"] for n in (1, 4, 7, 2, 5)]
    ref = reference_scores(predictor, "shop_a", cat.table[history])
    # Never returned: padding, alice's purchases (001, 007) and the session's item (005).
    ref[[0, cat.index["shop_a-001"], cat.index["shop_a-007"], cat.index["shop_a-005"]]] = \
        float("-inf")
    assert ids == [cat.item_ids[i - 1] for i in torch.topk(ref, 3).indices.tolist()]
    out = predictor.recommend(RecommendRequest(platform="shop_b", recent_items=["shop_b-002"]))
    assert out.source == "model"
    assert history_length(predictor, platform="shop_b", recent_items=["shop_b-002"]) == 1


def test_histories_longer_than_max_len_keep_the_most_recent(predictor: Predictor,
                                                            world: ToyWorld) -> None:
    recent = [f"shop_a-{n:03d}" for n in range(1, 13)]
    # The whole catalog is in the session: by default nothing is left to recommend.
    assert predictor.recommend(RecommendRequest(platform="shop_a", recent_items=recent)
                               ).items == []
    assert history_length(predictor, platform="shop_a", recent_items=recent) \
        == predictor.max_len == 6
    session_ok = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO,
                                       search=False,
                                       rules=rules({"shop_a": {"exclude_session_items": False}}))
    out = session_ok.recommend(RecommendRequest(platform="shop_a", recent_items=recent))
    cat = predictor.catalogs["shop_a"]
    ref = reference_scores(predictor, "shop_a", cat.table[list(range(7, 13))])
    ref[0] = float("-inf")
    assert [i.item_id for i in out.items] == [
        cat.item_ids[i - 1] for i in torch.topk(ref, 10).indices.tolist()]


def test_user_known_only_on_another_platform_is_served_cross_platform(
        predictor: Predictor) -> None:
    source, ids, _, used = rec(predictor, platform="shop_a", user_id="bob", k=5)
    assert source == "model" and used == ["shop_b"]
    b, a = predictor.catalogs["shop_b"], predictor.catalogs["shop_a"]
    # bob's shop_b items, embedded with shop_b's table and marked as shop_b's, through the
    # user tower as shop_a.
    seq = b.table[[b.index["shop_b-003"], b.index["shop_b-005"], b.index["shop_b-008"]]]
    ref = reference_scores(predictor, "shop_a", seq, [b.platform_id] * 3)
    ref[0] = float("-inf")
    assert ids == [a.item_ids[i - 1] for i in torch.topk(ref, 5).indices.tolist()]
    assert all(i.startswith("shop_a-") for i in ids)
    # dave is known on both: his own platform's history wins.
    assert rec(predictor, platform="shop_a", user_id="dave")[3] == ["shop_a"]
    assert rec(predictor, platform="shop_b", user_id="dave")[3] == ["shop_b"]
    assert rec(predictor, platform="shop_b", user_id="alice")[3] == ["shop_a"]


def test_no_history_anywhere_falls_back_to_popular_items(predictor: Predictor) -> None:
    for user in (None, "nobody", "erin"):  # erin is only on shop_z, unknown to the model
        source, ids, scores, used = rec(predictor, platform="shop_a", user_id=user, k=3)
        assert source == "popular" and used == []
        assert ids == ["shop_a-003", "shop_a-006", "shop_a-001"] and scores[:2] == [6.0, 4.0]
    _, ids, _, _ = rec(predictor, platform="shop_b", k=50)
    assert len(ids) == len(set(ids)) and set(ids) <= set(predictor.catalogs["shop_b"].item_ids)


def test_filters_restrict_candidates_in_both_paths(predictor: Predictor) -> None:
    cat = predictor.catalogs["shop_a"]
    for user in ("alice", None):
        out = predictor.recommend(RecommendRequest(
            platform="shop_a", user_id=user, k=12, filters={"brand": " Acme "}))
        assert out.items and all(i.brand == "acme" for i in out.items)
        out = predictor.recommend(RecommendRequest(
            platform="shop_a", user_id=user, k=12, filters={"category": "Home>Decor"}))
        assert out.items and all(i.category == ["home", "decor"] for i in out.items)
    both = predictor.recommend(RecommendRequest(
        platform="shop_a", k=12, filters={"category": "home", "brand": "globex"}))
    expected = {cat.item_ids[i - 1] for i in range(1, 13)
                if cat.brands[i - 1] == "globex" and cat.categories[i - 1][0] == "home"}
    assert {i.item_id for i in both.items} == expected
    assert predictor.recommend(RecommendRequest(platform="shop_a", user_id="alice",
                                                filters={"brand": "nope"})).items == []


def test_unknown_platform_is_named(predictor: Predictor) -> None:
    with pytest.raises(UnknownPlatform, match="'shop_z'.*shop_a"):
        predictor.recommend(RecommendRequest(platform="shop_z"))
    with pytest.raises(UnknownPlatform, match="shop_q"):
        predictor.search(SearchRequest(platform="shop_q", query="x"))


def test_request_limits_are_validated() -> None:
    for bad in ({"platform": "shop_a", "k": 0}, {"platform": "shop_a", "k": 101},
                {"platform": "Shop A"}, {"platform": "shop_a", "filters": {"color": "red"}},
                {"platform": "shop_a", "recent_items": ["x"] * 201},
                {"platform": "shop_a", "user_id": "\ud800"}):  # json.loads lets it through
        with pytest.raises(ValidationError):
            RecommendRequest.model_validate(bad)


def test_batched_answers_equal_single_ones(predictor: Predictor) -> None:
    requests = [RecommendRequest(platform=p, user_id=u, k=4)
                for p in ("shop_a", "shop_b") for u in ("alice", "bob", "dave", None)]
    batched = predictor.recommend_many([predictor.prepare(r) for r in requests])
    for r, b in zip(requests, batched):
        single = predictor.recommend(r)
        assert [i.item_id for i in b.items] == [i.item_id for i in single.items]
        assert [i.score for i in b.items] == pytest.approx([i.score for i in single.items],
                                                           abs=1e-5)


def test_search_embeds_the_query_like_an_item_without_brand_or_category(
        predictor: Predictor) -> None:
    # shop_b's items were exported without brand/category: an item's exact text is its twin.
    for n in (2, 7):
        out = predictor.search(SearchRequest(platform="shop_b", query=item_title("shop_b", n),
                                             k=3))
        assert out.items[0].item_id == f"shop_b-{n:03d}"
        assert out.items[0].score == pytest.approx(1.0, abs=1e-4)
    out = predictor.search(SearchRequest(platform="shop_a", query="steel knife", k=12))
    assert len({i.item_id for i in out.items}) == 12
    assert [i.score for i in out.items] == sorted((i.score for i in out.items), reverse=True)


def test_search_without_an_encoder_says_why(world: ToyWorld) -> None:
    p = Predictor.from_export(world.export, None, search=False)
    assert p.info().search is False
    with pytest.raises(SearchUnavailable, match="disabled"):
        p.search(SearchRequest(platform="shop_a", query="x"))
    # Without a lake: no histories, and an honest empty popular list.
    out = p.recommend(RecommendRequest(platform="shop_a", user_id="alice"))
    assert out.source == "popular" and out.items == []


def test_model_uris_are_parsed_and_local_exports_resolved(world: ToyWorld,
                                                          tmp_path: Path) -> None:
    assert parse_models_uri("models:/recsys-shop_a@champion") == ("recsys-shop_a", None,
                                                                  "champion")
    assert parse_models_uri("models:/m/3") == ("m", "3", None)
    for bad in ("models:/", "models:/m@", "models:/m/x", "models:/a/b/c"):
        with pytest.raises(ValueError, match="expected models:/"):
            parse_models_uri(bad)
    source = resolve_model(str(world.export))
    assert source.export_path == world.export.resolve() and source.version is None
    with pytest.raises(FileNotFoundError, match="export.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="tracking uri"):
        resolve_model("models:/m@champion")


def test_unknown_platform_survives_pickling() -> None:
    """It travels from a model replica to the gateway, which answers 404 with its message."""
    import pickle

    from recsys.serving.predictor import UnknownPlatform

    e = pickle.loads(pickle.dumps(UnknownPlatform("shop_q", ["shop_b", "shop_a"])))
    assert isinstance(e, UnknownPlatform) and isinstance(e, KeyError)
    assert str(e) == "unknown platform 'shop_q'; this model serves ['shop_a', 'shop_b']"


def test_repeat_bias_moves_the_users_seen_items_as_in_training(world: ToyWorld) -> None:
    """A model's learned repeat bias is applied to the items of the user's history on this
    platform (here with repurchase allowed, so they can be returned at all)."""
    p = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False,
                              rules=rules({"default": {"repurchase": True}}))
    cat = p.catalogs["shop_a"]
    seen = {cat.index[f"shop_a-{n:03d}"] for n in (1, 4, 7, 2)}  # alice's history
    p.model.enable_repeat_bias()
    for bias in (5.0, -5.0):  # beyond any cosine difference: seen items first, or last
        with torch.no_grad():
            p.model.repeat.weight.fill_(bias)
        _, ids, _, _ = rec(p, platform="shop_a", user_id="alice", k=12)
        head = {cat.index[i] for i in (ids[:4] if bias > 0 else ids[-4:])}
        assert head == seen


# -- serving rules (server config, per platform) and reasons (issue 21) -------------------------


def shop_item(platform: str, n: int) -> str:
    return ToyWorld.item_id(platform, n)


@pytest.mark.parametrize(("platform", "user"), [
    ("shop_a", "alice"), ("shop_a", "bob"), ("shop_a", None), ("shop_b", "bob"),
    ("shop_b", "dave")])
def test_session_items_are_never_returned_by_default(predictor: Predictor, platform: str,
                                                     user: str | None) -> None:
    n_items = predictor.catalogs[platform].num_items
    session = [shop_item(platform, n) for n in (2, 3, 6)]  # 3 and 6: the most popular too
    source, ids, _, _ = rec(predictor, platform=platform, user_id=user, k=n_items,
                            recent_items=session)
    assert source == "model" and ids and not set(session) & set(ids)
    bought = {shop_item(platform, n) for n, kind in USERS.get(user or "", {}).get(platform, [])
              if kind == "purchase"}
    assert len(ids) == n_items - len(set(session) | bought)  # everything else still comes back


def test_session_rule_off_returns_session_items(world: ToyWorld) -> None:
    p = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False,
                              rules=rules({"default": {"exclude_session_items": False}}))
    session = ["shop_a-002", "shop_a-005"]
    _, ids, _, _ = rec(p, platform="shop_a", user_id="alice", k=12, recent_items=session)
    assert set(session) <= set(ids) and not {"shop_a-001", "shop_a-007"} & set(ids)


def test_repurchase_is_a_per_platform_rule_and_entries_inherit_the_default(
        world: ToyWorld) -> None:
    """shop_b re-buys (a grocery-like shop): bob's purchase there may come back; shop_a keeps
    the default (alice's purchases never return); shop_b inherits the default's session rule."""
    p = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False,
                              rules=rules({"default": {"exclude_session_items": False},
                                           "shop_b": {"repurchase": True}}))
    assert p.rules["shop_b"].repurchase and not p.rules["shop_b"].exclude_session_items
    assert not p.rules["shop_a"].repurchase
    _, b_ids, _, _ = rec(p, platform="shop_b", user_id="bob", k=9, recent_items=["shop_b-001"])
    assert sorted(b_ids) == sorted(p.catalogs["shop_b"].item_ids)  # 005 (bought) and 001 too
    _, a_ids, _, _ = rec(p, platform="shop_a", user_id="alice", k=12)
    assert len(a_ids) == 10 and not {"shop_a-001", "shop_a-007"} & set(a_ids)


def test_rules_are_validated_and_round_trip() -> None:
    from recsys.serving.args import AppArgs

    for bad, message in (({"shop_a": {"repurchse": True}}, "repurchse"),
                         ({"Shop A": {}}, "rules.Shop A: platform name"),
                         ({"default": {"reasons": "sometimes"}}, "reasons")):
        with pytest.raises(ValidationError, match=message):
            AppArgs.model_validate({"rules": bad})
    with pytest.raises(ValidationError, match="exclude_purchased"):  # replaced by rules
        AppArgs.model_validate({"exclude_purchased": True})
    args = AppArgs.model_validate({"rules": {"default": {"reasons": False},
                                             "grocer": {"repurchase": True}}})
    grocer = args.rules.of("grocer")
    assert grocer.repurchase and not grocer.reasons and args.rules.of("other").reasons is False
    assert AppArgs.model_validate(args.model_dump(mode="json")).rules == args.rules
    assert AppArgs().rules.of("anything") == ServingRules().of("x")
    assert ServingRules().of("x").exclude_session_items and not ServingRules().of("x").repurchase


@pytest.mark.parametrize("field", ["exclude_session_items", "repurchase", "reasons", "rules",
                                   "exclude_purchased", "exclude_seen"])
def test_no_request_field_toggles_a_rule(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        RecommendRequest.model_validate({"platform": "shop_a", field: False})


def expected_reasons(p: Predictor, platform: str, history: list[str], ids: list[str]
                     ) -> list[str]:
    """For each returned item, the history item (of ``platform``) with the highest cosine,
    computed here from the item matrix."""
    cat = p.catalogs[platform]
    h = F.normalize(cat.table[[cat.index[i] for i in history]], dim=-1)       # (L, D)
    out = []
    for item in ids:
        v = F.normalize(cat.table[cat.index[item]], dim=-1)                   # (D,)
        out.append(history[int(torch.argmax(h @ v))])
    return out


def test_reasons_name_the_most_similar_history_item(predictor: Predictor) -> None:
    history = ["shop_a-001", "shop_a-004", "shop_a-007", "shop_a-002", "shop_a-005"]
    out = predictor.recommend(RecommendRequest(platform="shop_a", user_id="alice", k=12,
                                               recent_items=["shop_a-005"]))
    ids = [i.item_id for i in out.items]
    named = expected_reasons(predictor, "shop_a", history, ids)
    assert len(set(named)) > 1  # the test would not tell argmax from a constant otherwise
    for item, expected in zip(out.items, named):
        n = int(expected.rsplit("-", 1)[1])
        assert item.reason is not None
        assert (item.reason.item_id, item.reason.platform) == (expected, "shop_a")
        assert item.reason.text == f"because you viewed {item_title('shop_a', n)}"
    # A session-only user: the session's items are the history named.
    session = ["shop_b-002", "shop_b-007"]
    out = predictor.recommend(RecommendRequest(platform="shop_b", recent_items=session, k=9))
    assert [i.reason.item_id for i in out.items] == expected_reasons(
        predictor, "shop_b", session, [i.item_id for i in out.items])


def test_reasons_never_name_another_platforms_item(predictor: Predictor) -> None:
    """bob is known only on shop_b: on shop_a his answer comes from shop_b's items, which are
    another shop's data: "based on your activity", nothing named."""
    out = predictor.recommend(RecommendRequest(platform="shop_a", user_id="bob", k=12))
    assert out.source == "model" and len(out.items) == 12
    for item in out.items:
        assert item.reason is not None
        assert item.reason.model_dump() == {"text": "based on your activity", "item_id": None,
                                            "platform": None}
    # A history mixing platforms: a shop_b row that is the closest to shop_a-005 (its very
    # vector) is the top contributor there and stays unnamed; the shop_a rows are named.
    cat, b = predictor.catalogs["shop_a"], predictor.catalogs["shop_b"]
    p = predictor.prepare(RecommendRequest(platform="shop_a", user_id="dave", k=12))
    p.seq = torch.cat([p.seq, cat.table[[cat.index["shop_a-005"]]]])
    p.history = [*p.history, ("shop_b", b.index["shop_b-003"])]
    items = predictor.recommend_many([p])[0].items
    reasons = {i.item_id: i.reason for i in items}
    assert reasons["shop_a-005"].text == "based on your activity"
    assert reasons["shop_a-005"].item_id is None
    texts = " ".join(r.text for r in reasons.values())
    assert "shop_b" not in texts and item_title("shop_b", 3) not in texts
    assert {r.item_id for r in reasons.values()} - {None} <= {"shop_a-009", "shop_a-010"}
    assert any(r.item_id is not None for r in reasons.values())


def test_popular_search_and_switched_off_reasons(predictor: Predictor, world: ToyWorld) -> None:
    out = predictor.recommend(RecommendRequest(platform="shop_a", k=3))
    assert out.source == "popular"
    assert {i.reason.text for i in out.items} == {"popular on shop_a"}
    found = predictor.search(SearchRequest(platform="shop_b", query="red shirt", k=2))
    assert {i.reason.text for i in found.items} == {"matches your query"}
    quiet = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False,
                                  rules=rules({"shop_a": {"reasons": False}}))
    for request in (RecommendRequest(platform="shop_a", user_id="alice"),
                    RecommendRequest(platform="shop_a")):
        assert all(i.reason is None for i in quiet.recommend(request).items)
    assert all(i.reason is not None
               for i in quiet.recommend(RecommendRequest(platform="shop_b")).items)


def test_a_long_title_is_cut_in_the_reason() -> None:
    from recsys.serving.rules import MAX_TITLE, viewed

    reason = viewed("x" * 300, "i1", "shop_a")
    assert reason.text.startswith("because you viewed x") and reason.text.endswith("…")
    assert len(reason.text) == len("because you viewed ") + MAX_TITLE
    assert viewed("  ", "i1", "shop_a").text == "because you viewed i1"


def test_rerank_reorders_the_retrievals_top_n_by_click_probability(world: ToyWorld,
                                                                   predictor: Predictor) -> None:
    """Two stages (issue 21): with ``rerank_top_n`` N the retrieval's top N (the same
    candidates as without) come back ordered by the CTR head's sigma(w . [u; i; u * i]),
    computed here from the model's head directly; without it, the retrieval order."""
    p = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False,
                              rules=rules({"shop_a": {"rerank_top_n": 8}}))
    retrieval = rec(predictor, platform="shop_a", user_id="alice", k=8)[1]
    _, ids, scores, _ = rec(p, platform="shop_a", user_id="alice", k=5)
    assert set(ids) <= set(retrieval) and len(ids) == 5
    cat = p.catalogs["shop_a"]
    prepared = p.prepare(RecommendRequest(platform="shop_a", user_id="alice", k=5))
    with torch.no_grad():
        user = p.user_vectors([prepared])[0]
        rows = torch.tensor([cat.index[i] for i in retrieval])
        probs = torch.sigmoid(p.model.ctr_head(user.expand(len(rows), -1), cat.table[rows]))
    order = torch.argsort(probs, descending=True)[:5].tolist()
    assert ids == [retrieval[i] for i in order]
    assert scores == pytest.approx(probs[order].tolist(), abs=1e-6)
    assert all(0 < s < 1 for s in scores) and scores == sorted(scores, reverse=True)
    assert ids != retrieval[:5] or probs[:5].tolist() == sorted(probs[:5].tolist(), reverse=True)
    # Other platforms keep the retrieval order (the rule is per platform).
    assert rec(p, platform="shop_b", user_id="bob", k=4)[1] == \
        rec(predictor, platform="shop_b", user_id="bob", k=4)[1]


def test_a_model_trained_on_merged_histories_is_served_merged_ones(world: ToyWorld) -> None:
    """Issue 21: when the model was trained with ``data.sequences.cross_platform`` the user's
    history on every platform is merged by time (as training merges it) even when there is one
    on the request's platform, each item marked with its platform; the answer equals the towers
    fed that merged history."""
    from recsys.model.export import load_export
    from recsys.serving.history import HistoryStore
    from recsys.serving.model_source import resolve_model

    exported = load_export(world.export)
    exported.meta = exported.meta.model_copy(update={
        "train_config": {"data": {"sequences": {"cross_platform": True}}}})
    history = HistoryStore.from_lake(world.lake, platforms=list(exported.items),
                                     max_len=int(exported.model.config["max_len"]))
    p = Predictor(exported, resolve_model(str(world.export)), history, PSEUDO, search=False)
    assert p.merge
    prepared = p.prepare(RecommendRequest(platform="shop_a", user_id="dave", k=5))
    a, b = p.catalogs["shop_a"], p.catalogs["shop_b"]
    # dave viewed shop_a-009 and bought shop_a-010, then viewed shop_b-001 (toy.USERS order).
    assert prepared.history == [("shop_a", a.index["shop_a-009"]),
                                ("shop_a", a.index["shop_a-010"]),
                                ("shop_b", b.index["shop_b-001"])]
    assert prepared.history_platforms == ["shop_a", "shop_b"]
    seq = torch.stack([a.table[a.index["shop_a-009"]], a.table[a.index["shop_a-010"]],
                       b.table[b.index["shop_b-001"]]])
    ref = reference_scores(p, "shop_a", seq, [a.platform_id, a.platform_id, b.platform_id])
    ref[[0, a.index["shop_a-010"]]] = float("-inf")  # padding; bought (no repurchase)
    _, ids, _, _ = rec(p, platform="shop_a", user_id="dave", k=5)
    assert ids == [a.item_ids[i - 1] for i in torch.topk(ref, 5).indices.tolist()]
    # The own-history model keeps its own platform's history when there is one.
    own = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False)
    assert not own.merge and rec(own, platform="shop_a", user_id="dave")[3] == ["shop_a"]
