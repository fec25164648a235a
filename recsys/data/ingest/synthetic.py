"""The embedded default source: several shops of one synthetic world, no download needed.

One global pool of users and of items; every platform sees a subset of each, so raw user ids
(``u000123``) and item ids/texts coincide across shops and cross-platform transfer is learnable.
Generation model, all vectorised over sequences (one numpy pass per sequence position):

* items: category path [top, sub], title "Brand Adjective Noun Variant", lognormal price per top
  category, Zipf popularity (tilted a little per platform), a latent vector near its sub's centroid;
* users: a concentrated Dirichlet taste over top categories and a latent vector, both shared by
  every platform the user is on; heavy-tailed sequence lengths (at least 3 per platform);
* next item: stay in the previous sub-category, move to a sibling sub, or draw a fresh top
  category from the taste; then the item ~ popularity * exp(user . item / tau) inside that sub
  (sampled by importance resampling of popularity-drawn candidates, so cost is O(events));
* each chosen item is a funnel view -> click -> cart -> purchase, in sessions, in 2025-H1 (UTC).

A small, deterministic share of dirty rows (unknown event type, unknown item, blank title) is
injected on purpose so that every default ingest exercises the quarantine.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.data.ingest.base import IngestOptions, Ledger, SourceFrames
from recsys.data.pseudonym import Pseudonymizer

# top category: (median price, {sub: nouns}, adjectives, brands)
VOCAB: dict[str, tuple[float, dict[str, str], str, str]] = {
    "electronics": (80, {"audio": "headphones earbuds speaker soundbar",
                         "computing": "laptop-stand keyboard mouse monitor",
                         "phones": "charger phone-case usb-cable power-bank"},
                    "wireless smart compact portable ultra-slim noise-cancelling",
                    "Voltix Nexon Auralis Kyro"),
    "kitchen": (35, {"cookware": "skillet saucepan wok dutch-oven",
                     "appliances": "blender toaster kettle air-fryer",
                     "tableware": "dinner-plate bowl mug glass-set"},
                "nonstick stainless ceramic cast-iron ergonomic classic",
                "Cucina Ferro HearthCo Saltwell"),
    "outdoor": (45, {"camping": "tent sleeping-bag lantern camp-stove",
                     "hiking": "backpack trekking-pole water-bottle headlamp",
                     "cycling": "bike-helmet bike-light saddle floor-pump"},
                "waterproof lightweight rugged insulated packable all-weather",
                "Ridgeline Alpenko Trailhook Northpeak"),
    "beauty": (18, {"skincare": "serum moisturizer cleanser sunscreen",
                    "makeup": "lipstick mascara foundation eyeshadow-palette",
                    "haircare": "shampoo conditioner hair-oil styling-cream"},
               "hydrating matte vegan fragrance-free radiant gentle",
               "Lumae Verdure Silkra Orabelle"),
    "toys": (25, {"building": "brick-set construction-kit marble-run magnet-tiles",
                  "plush": "teddy-bear plush-dragon hand-puppet cuddle-bunny",
                  "games": "board-game jigsaw-puzzle card-game trivia-set"},
             "colorful educational giant classic deluxe mini",
             "Playvale Tinkertop Jollybee Wondrix"),
    "office": (30, {"stationery": "notebook pen-set planner sticky-notes",
                    "furniture": "desk-chair standing-desk bookshelf file-cabinet",
                    "supplies": "stapler label-maker shredder whiteboard"},
               "ergonomic refillable adjustable minimalist recycled heavy-duty",
               "Deskwise Penmark Archly Quillon"),
    "garden": (40, {"plants": "seed-kit planter herb-garden bulb-pack",
                    "tools": "pruner trowel hose-nozzle rake",
                    "patio": "lounger parasol bistro-set fire-pit"},
               "weatherproof self-watering galvanized foldable organic sturdy",
               "Greenvale Rootwise Bloomfield Terrano"),
    "pet": (22, {"dog": "dog-bed leash chew-toy harness",
                 "cat": "scratching-post cat-tree litter-box cat-toy",
                 "aquarium": "fish-tank aquarium-filter aquarium-heater fish-food"},
            "durable washable calming orthopedic interactive natural",
            "Pawsome Furrly Tailwind Petora"),
    "books": (14, {"fiction": "novel thriller fantasy-saga mystery",
                   "nonfiction": "biography cookbook history-book travel-guide",
                   "kids": "picture-book activity-book bedtime-stories comic"},
              "bestselling illustrated annotated hardcover paperback collectors",
              "Inkwell Marlowe Northbook Pagecraft"),
    "sports": (35, {"fitness": "yoga-mat dumbbell resistance-band kettlebell",
                    "team": "football basketball shin-guards jersey",
                    "running": "running-shoes running-belt sports-watch compression-socks"},
               "pro-grade breathable anti-slip lightweight adjustable competition",
               "Stridex Apexa Kinetic Velora"),
}
VARIANTS = ("", "", "", "Pro", "Mini", "Max", "2-Pack", "XL", "Lite", "Plus", "Gen 2", "Black",
            "White", "Blue")
EVENT_FUNNEL = np.array(["view", "click", "cart", "purchase"], dtype=object)

DIRTY_FRACTION = 0.001       # share of extra, invalid event rows (quarantined by finalize)
SEQS_PER_PLATFORM = 1200     # user sequences per platform at scale 1 (~20k events)
ITEMS_PER_PLATFORM = 900     # catalog size per platform at scale 1
USER_SHARE, ITEM_SHARE = 0.35, 0.40  # chance to also be on / be sold by each other platform
ZIPF, POP_TILT = 1.1, 0.3    # item popularity exponent; per-platform log-popularity noise
TASTE_CONC, DIM, TAU, CANDIDATES = 0.2, 8, 0.5, 24
P_SAME_SUB, P_SIBLING_SUB, P_NEW_SESSION = 0.45, 0.20, 0.25
LEN_MU, LEN_SIGMA, MAX_LEN = 1.67, 0.9, 250
SHOWN = 4  # impressions: other candidates on the page a choice was made from (if logged)
START = pd.Timestamp("2025-01-01", tz="UTC")
Frames = dict[str, tuple[pd.DataFrame, pd.DataFrame]]  # platform -> (events, items)
WINDOW_S = (pd.Timestamp("2025-06-30", tz="UTC") - START).total_seconds()


def default_names(n: int) -> list[str]:
    return [f"shop_{chr(97 + i)}" if n <= 26 else f"shop_{i:03d}" for i in range(n)]


def _words(s: str) -> str:
    return s.replace("-", " ").title().replace("Usb", "USB")


def _catalog(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Global item pool: text columns, plus each item's sub-category index."""
    tops = list(VOCAB)
    subs = [(t, s) for t in tops for s in VOCAB[t][1]]
    n_sub = len(subs)
    sub = np.concatenate([np.arange(n_sub), rng.integers(n_sub, size=max(n - n_sub, 0))])[:n]
    sub = rng.permutation(sub)
    top = np.array([tops.index(subs[s][0]) for s in range(n_sub)])[sub]
    picks = rng.random((n, 5))
    titles, descs, brands, cats = [], [], [], []
    for i in range(n):
        t, s = subs[sub[i]]
        _, nouns, adjs, brs = VOCAB[t]
        nl, al, bl = nouns[s].split(), adjs.split(), brs.split()
        noun, adj = nl[int(picks[i, 0] * len(nl))], al[int(picks[i, 1] * len(al))]
        brand, var = bl[int(picks[i, 2] * len(bl))], VARIANTS[int(picks[i, 3] * len(VARIANTS))]
        titles.append(f"{brand} {_words(adj)} {_words(noun)} {var}".strip())
        descs.append(None if picks[i, 4] < 0.15 else
                     f"{'An' if adj[0] in 'aeiou' else 'A'} {adj.replace('-', ' ')} "
                     f"{noun.replace('-', ' ')} by {brand}, for {s}.")
        brands.append(brand)
        cats.append((t, s))
    price = np.array([VOCAB[tops[t]][0] for t in top]) * np.exp(0.5 * rng.standard_normal(n))
    df = pd.DataFrame({"item_id": [f"i{i:06d}" for i in range(n)], "title": titles,
                       "description": descs, "brand": brands, "category": cats,
                       "price": price})
    return df, sub


def _world(num_platforms: int, scale: float, seed: int, names: list[str] | None,
           dirty_fraction: float, impressions: Collection[str] = ()
           ) -> tuple[Frames, dict[str, Any]]:
    """Generate every platform at once (one world), plus the overlap statistics for the report.

    Each choice is the user's favourite of ``CANDIDATES`` items drawn from a sub-category by
    popularity: the page the shop showed. For the platforms in ``impressions`` the first
    ``SHOWN`` other candidates of that page are logged as ``impression`` events at the time of
    the choice's first event (shown, not clicked: the hard negatives of a ranker). They draw no
    random numbers, so the rest of the world is the same with or without them."""
    names = list(names) if names else default_names(num_platforms)
    if len(names) != num_platforms or len(set(names)) != num_platforms:
        raise ValueError(f"need {num_platforms} distinct platform names, got {names}")
    P, rng = num_platforms, np.random.default_rng(seed)
    n_items = max(60, round(ITEMS_PER_PLATFORM * scale * P / (1 + (P - 1) * ITEM_SHARE)))
    n_users = max(2 * P, round(SEQS_PER_PLATFORM * scale * P / (1 + (P - 1) * USER_SHARE)))
    catalog, item_sub = _catalog(rng, n_items)
    sub_top = np.array([i for i, t in enumerate(VOCAB) for _ in VOCAB[t][1]])
    n_sub, n_top = len(sub_top), len(VOCAB)
    sub_start = np.searchsorted(sub_top, np.arange(n_top))
    sub_count = np.bincount(sub_top, minlength=n_top)

    # --- items: who sells what (each (platform, sub) non-empty), popularity, latent vectors
    sold = rng.random((P, n_items)) < ITEM_SHARE
    sold[rng.integers(P, size=n_items), np.arange(n_items)] = True
    log_pop = -ZIPF * np.log1p(rng.permutation(n_items))
    by_sub = np.lexsort((-log_pop, item_sub))  # by sub, most popular first
    best_of_sub = by_sub[np.searchsorted(item_sub[by_sub], np.arange(n_sub))]
    for p in range(P):
        sold[p, best_of_sub[np.bincount(item_sub[sold[p]], minlength=n_sub) == 0]] = True
    plat_pop = np.exp(log_pop + POP_TILT * rng.standard_normal((P, n_items)))
    centroid = rng.standard_normal((n_sub, DIM))
    item_vec = (0.6 * centroid[item_sub] + 0.8 * rng.standard_normal((n_items, DIM))) / np.sqrt(DIM)
    plat_price = np.round(catalog["price"].to_numpy() * np.exp(
        0.05 * rng.standard_normal((P, n_items))), 2)
    # Popularity-sorted-by-group table for inverse-CDF sampling inside (platform, sub).
    gp, gi = np.nonzero(sold)
    gkey = gp * n_sub + item_sub[gi]
    order = np.argsort(gkey, kind="stable")
    g_item, cum = gi[order], np.cumsum(plat_pop[gp, gi][order])
    g_end = np.cumsum(np.bincount(gkey, minlength=P * n_sub))
    g_start = g_end - np.bincount(gkey, minlength=P * n_sub)
    g_base = np.concatenate([[0.0], cum])[g_start]
    g_total = cum[g_end - 1] - g_base

    # --- users: membership, taste, latent vector, activity; one sequence per (user, platform)
    member = rng.random((n_users, P)) < USER_SHARE
    member[np.arange(n_users), rng.permutation(np.arange(n_users) % P)] = True  # none empty
    cat_prior = rng.dirichlet(np.full(n_top, 5.0))
    taste_cum = np.cumsum(rng.dirichlet(TASTE_CONC * n_top * cat_prior, size=n_users), axis=1)
    user_vec = rng.standard_normal((n_users, DIM))
    activity = rng.standard_normal(n_users)
    s_plat, s_user = np.nonzero(member.T)  # platform-major, so each platform is contiguous
    n_seq = len(s_user)
    noise = np.sqrt(1 - 0.6**2) * rng.standard_normal(n_seq)
    lens = np.minimum(3 + np.floor(np.exp(LEN_MU + LEN_SIGMA * (0.6 * activity[s_user] + noise))),
                      MAX_LEN).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    n_inter = int(lens.sum())

    # --- sequences: one vectorised step per position over all still-active sequences
    by_len = np.argsort(-lens, kind="stable")
    o_user, o_plat, o_off = s_user[by_len], s_plat[by_len], offsets[by_len]
    active = np.searchsorted(-lens[by_len], -np.arange(lens.max()), side="left")  # len > t
    inter_item = np.empty(n_inter, dtype=np.int64)
    inter_shown = np.empty((n_inter, SHOWN), dtype=np.int64)  # (I, SHOWN) not chosen
    prev_sub = np.zeros(n_seq, dtype=np.int64)
    for t, k in enumerate(active):
        u, r = o_user[:k], rng.random((k, 3))
        top = np.minimum((taste_cum[u] < r[:, :1]).sum(axis=1), n_top - 1)
        sub = sub_start[top] + (r[:, 1] * sub_count[top]).astype(np.int64)
        if t:
            prev = prev_sub[:k]
            sib = sub_start[sub_top[prev]] + (r[:, 1] * sub_count[sub_top[prev]]).astype(np.int64)
            sub = np.where(r[:, 2] < P_SAME_SUB, prev,
                           np.where(r[:, 2] < P_SAME_SUB + P_SIBLING_SUB, sib, sub))
        g = o_plat[:k] * n_sub + sub
        x = g_base[g, None] + rng.random((k, CANDIDATES)) * g_total[g, None]
        j = np.clip(np.searchsorted(cum, x, side="right"), g_start[g, None], g_end[g, None] - 1)
        cand = g_item[j]
        score = np.einsum("kcd,kd->kc", item_vec[cand], user_vec[u]) / TAU
        score += rng.gumbel(size=score.shape)
        best = score.argmax(axis=1)
        inter_item[o_off[:k] + t] = cand[np.arange(k), best]
        page = cand[:, :SHOWN].copy()  # the first SHOWN candidates, the chosen one swapped out
        on_page = best < SHOWN
        page[on_page, best[on_page]] = cand[on_page, SHOWN]
        inter_shown[o_off[:k] + t] = page
        prev_sub[:k] = sub

    # --- funnel, sessions and time (seconds from START, squeezed into the window if needed)
    seq_of = np.repeat(np.arange(n_seq), lens)
    plat_of = s_plat[seq_of]
    rates = np.clip(np.array([0.35, 0.35, 0.55]) * np.exp(0.1 * rng.standard_normal((P, 3))), 0, 1)
    steps = rng.random((n_inter, 3)) < rates[plat_of]
    n_ev = 1 + np.cumprod(steps, axis=1).sum(axis=1)
    delay = np.array([2.0, 5.0, 10.0]) + rng.exponential([15.0, 60.0, 120.0], (n_inter, 3))
    cum_delay = np.concatenate([np.zeros((n_inter, 1)), np.cumsum(delay, axis=1)], axis=1)
    duration = cum_delay[np.arange(n_inter), n_ev - 1]
    new_sess = rng.random(n_inter) < P_NEW_SESSION
    new_sess[offsets] = True
    gap = np.where(new_sess, 3600 + rng.exponential(3 * 86400, n_inter),
                   3 + rng.exponential(60, n_inter))
    inc = np.concatenate([[0.0], duration[:-1] + gap[1:]])
    inc[offsets] = 0.0
    csum = np.cumsum(inc)
    start = csum - np.repeat(csum[offsets], lens)
    last = offsets + lens - 1
    span = start[last] + duration[last]
    squeeze = np.minimum(1.0, 0.98 * WINDOW_S / np.maximum(span, 1.0))
    begin = rng.random(n_seq) * np.maximum(WINDOW_S - span * squeeze, 0)
    ev_inter = np.repeat(np.arange(n_inter), n_ev)
    stage = np.arange(len(ev_inter)) - np.repeat(np.cumsum(n_ev) - n_ev, n_ev)
    ev_item = inter_item[ev_inter]
    qty = np.where(stage == 3, rng.geometric(0.75, len(stage)), np.nan)
    logs_shown = np.isin(np.asarray(names, dtype=object)[plat_of], list(impressions))
    if logs_shown.any():  # impressions: stage -1, just before the view of the same choice
        imp_inter = np.repeat(np.flatnonzero(logs_shown), SHOWN)
        imp_item = inter_shown[logs_shown].ravel()
        real = imp_item != inter_item[imp_inter]  # a page may hold the chosen item twice
        imp_inter, imp_item = imp_inter[real], imp_item[real]
        order = np.lexsort((np.concatenate([stage, np.full(len(imp_inter), -1)]),
                            np.concatenate([ev_inter, imp_inter])))
        ev_inter = np.concatenate([ev_inter, imp_inter])[order]
        stage = np.concatenate([stage, np.full(len(imp_inter), -1)])[order]
        ev_item = np.concatenate([ev_item, imp_item])[order]
        qty = np.concatenate([qty, np.full(len(imp_inter), np.nan)])[order]
    ev_seq = seq_of[ev_inter]
    seconds = begin[ev_seq] + (start[ev_inter] + cum_delay[ev_inter, np.maximum(stage, 0)]
                               ) * squeeze[ev_seq]
    ev_time = START + pd.to_timedelta(np.round(seconds * 1e6).astype(np.int64), unit="us")
    ev_sess = np.cumsum(new_sess)[ev_inter] - 1
    ev_plat = plat_of[ev_inter]
    price = np.where(stage == 3, plat_price[ev_plat, ev_item], np.nan)

    user_ids = np.array([f"u{u:06d}" for u in range(n_users)], dtype=object)
    out: Frames = {}
    stats: dict[str, Any] = {
        "users_global": n_users, "items_global": n_items,
        "users_on_2plus_platforms": round(float((member.sum(1) >= 2).mean()), 3),
        "user_jaccard_mean": _mean_jaccard(member.T), "catalog_jaccard_mean": _mean_jaccard(sold),
        "platforms": {}}
    ev_bounds = np.searchsorted(ev_plat, np.arange(P + 1))
    for p, name in enumerate(names):
        sl = slice(ev_bounds[p], ev_bounds[p + 1])
        sess = ev_sess[sl] - (ev_sess[sl][0] if sl.stop > sl.start else 0)
        sess_ids = np.array([f"{name}-s{s:07d}" for s in range(sess.max(initial=-1) + 1)],
                            dtype=object)
        events = pd.DataFrame({
            "user_id": user_ids[s_user[ev_seq[sl]]],
            "item_id": catalog["item_id"].to_numpy()[ev_item[sl]],
            "event_type": np.where(stage[sl] < 0, "impression",
                                   EVENT_FUNNEL[np.maximum(stage[sl], 0)]),
            "timestamp": ev_time[sl],
            "quantity": qty[sl], "price": price[sl],
            "session_id": sess_ids[sess],
        })
        items = catalog[sold[p]].assign(price=plat_price[p, sold[p]]).reset_index(drop=True)
        items["category"] = [list(c) for c in items["category"]]
        shown = (events["event_type"] == "impression").to_numpy()
        events = events.assign(_pos=np.arange(len(events)))
        seen, items, dirty = _dirty(rng, events[~shown].reset_index(drop=True), items, name,
                                    dirty_fraction)
        # Dirty rows come from the other events only: the same world with or without impressions.
        events = pd.concat([seen, events[shown]]).sort_values("_pos", kind="stable")
        events = events.drop(columns="_pos").reset_index(drop=True)
        n = len(events)
        events = events.assign(event_index=np.arange(n, dtype=np.int64), _file="synthetic",
                               _row=np.arange(1, n + 1, dtype=np.int64))
        items = items.assign(_file="synthetic", _row=np.arange(1, len(items) + 1, dtype=np.int64))
        others = np.delete(np.arange(P), p)
        stats["platforms"][name] = {
            "users": int(member[:, p].sum()),
            "users_also_elsewhere": int((member[:, p] & member[:, others].any(1)).sum()),
            "catalog_items": int(sold[p].sum()),
            "items_also_elsewhere": int((sold[p] & sold[others].any(0)).sum()), **dirty}
        out[name] = (events, items)
    return out, stats


def _mean_jaccard(sets: np.ndarray) -> float | None:
    """Mean pairwise Jaccard overlap of the rows of a (platform x entity) membership matrix."""
    pairs = [(a, b) for a in range(len(sets)) for b in range(a + 1, len(sets))]
    if not pairs:
        return None
    return round(float(np.mean([(sets[a] & sets[b]).sum() / (sets[a] | sets[b]).sum()
                                for a, b in pairs])), 3)


def _dirty(rng: np.random.Generator, events: pd.DataFrame, items: pd.DataFrame, name: str,
           fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Copies of a few real rows with an unknown event type or item, and blank-titled items."""
    if fraction <= 0 or len(events) == 0:
        return events, items, {"dirty_events": 0, "dirty_items": 0}
    n_bad = max(2, round(fraction * len(events)))
    src = np.sort(rng.choice(len(events), size=min(n_bad, len(events)), replace=False))
    bad = events.iloc[src].copy()
    half = len(bad) // 2
    bad.iloc[:half, bad.columns.get_loc("event_type")] = "wishlist"
    bad.iloc[half:, bad.columns.get_loc("item_id")] = [f"ghost{i:05d}" for i in
                                                        range(len(bad) - half)]
    key = np.concatenate([np.arange(len(events)), src + 0.5])  # right after its source row
    events = pd.concat([events, bad]).iloc[np.argsort(key, kind="stable")].reset_index(drop=True)
    n_items = max(2, round(fraction * len(items)))
    blank = pd.DataFrame({"item_id": [f"{name}-broken{i:03d}" for i in range(n_items)],
                          "title": ["", "   "] * (n_items // 2) + [""] * (n_items % 2),
                          "description": None, "brand": None, "category": None,
                          "price": np.nan})
    return events, pd.concat([items, blank], ignore_index=True), {
        "dirty_events": len(bad), "dirty_items": n_items}


def generate(num_platforms: int, scale: float, seed: int, names: list[str] | None = None, *,
             dirty_fraction: float = DIRTY_FRACTION, impressions: Collection[str] = ()
             ) -> Frames:
    """Pure generator: platform -> (events, items) frames in the shape ``finalize`` expects;
    ``impressions``: the platforms that also log what they showed."""
    return _world(num_platforms, scale, seed, names, dirty_fraction, impressions)[0]


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    names = opts.platform.split(",") if opts.platform else default_names(opts.num_platforms)
    unknown = sorted(set(opts.impressions) - set(names))
    if unknown:
        raise ValueError(f"impressions names unknown platform(s) {unknown}; platforms: {names}")
    frames, stats = _world(len(names), opts.scale, opts.seed, names, DIRTY_FRACTION,
                           opts.impressions)
    out = []
    for name, (events, items) in frames.items():
        if opts.user_namespace:  # opt-out of cross-platform linking, as for any source
            events["user_id"] = opts.user_namespace + ":" + events["user_id"]
        ledger = Ledger(pseudo)
        ledger.events.rows_in, ledger.items.rows_in = len(events), len(items)
        ledger.quirk("synthetic_parameters", {
            "seed": opts.seed, "scale": opts.scale, "platforms": names,
            "dirty_fraction": DIRTY_FRACTION, "zipf": ZIPF, "taste_concentration": TASTE_CONC,
            "p_same_sub": P_SAME_SUB, "p_sibling_sub": P_SIBLING_SUB, "tau": TAU})
        ledger.quirk("synthetic_world", {k: v for k, v in stats.items() if k != "platforms"})
        ledger.quirk("synthetic_platform", stats["platforms"][name])
        ledger.quirk("dirty_rows_injected", "on purpose, to exercise the quarantine")
        out.append(SourceFrames(name, events, items, ledger, "synthetic"))
    return out


def write_logs(out: str | Path, num_platforms: int = 3, scale: float = 1.0, seed: int = 0,
               names: list[str] | None = None,
               holdback: dict[str, float] | None = None) -> dict[str, dict[str, Path]]:
    """The synthetic shops as raw log files, the way a shop would export them.

    ``out/<platform>/events-0001.parquet`` (raw user ids: ingest pseudonymises them) and
    ``out/catalog/<platform>.parquet``; ingest them with source ``generic`` (``--path`` the
    platform's directory, ``--items-path`` its catalog). ``holdback={"shop_c": 0.2}`` keeps the
    last 20% of shop_c's events (by time) out of the first file and writes them to
    ``out/.holdback/<platform>.parquet``: :func:`release_holdback` moves them in as
    ``events-0002.parquet``, i.e. "new logs arrived" for one platform.
    """
    out = Path(out)
    holdback = holdback or {}
    unknown = sorted(set(holdback) - set(names or default_names(num_platforms)))
    if unknown:
        raise ValueError(f"holdback names unknown platform(s) {unknown}")
    files: dict[str, dict[str, Path]] = {}
    for name, (events, items) in generate(num_platforms, scale, seed, names).items():
        events = events.drop(columns=["event_index", "_file", "_row"])
        items = items.drop(columns=["_file", "_row"])
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / "catalog").mkdir(parents=True, exist_ok=True)
        if name in holdback:
            if not 0 < holdback[name] < 1:
                raise ValueError(f"holdback for {name} must be in (0, 1), got {holdback[name]}")
            cut = events["timestamp"].quantile(1 - holdback[name])
            late = events["timestamp"] > cut
            (out / ".holdback").mkdir(exist_ok=True)
            events[late].to_parquet(out / ".holdback" / f"{name}.parquet", index=False)
            events = events[~late]
        events.to_parquet(out / name / "events-0001.parquet", index=False)
        items.to_parquet(out / "catalog" / f"{name}.parquet", index=False)
        files[name] = {"path": out / name, "items_path": out / "catalog" / f"{name}.parquet"}
    return files


def release_holdback(out: str | Path, platform: str) -> Path:
    """Move a platform's held-back events in as its next log file; returns that file."""
    out = Path(out)
    src = out / ".holdback" / f"{platform}.parquet"
    if not src.exists():
        raise FileNotFoundError(f"no held-back events for {platform} under {out}")
    n = len(list((out / platform).glob("events-*.parquet")))
    dst = out / platform / f"events-{n + 1:04d}.parquet"
    src.replace(dst)
    return dst
