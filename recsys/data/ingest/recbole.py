"""RecBole atomic files (source ``recbole``): ``X.inter`` + ``X.item`` with typed headers.

Headers name each tab-separated field with its RecBole type, e.g. ``user_id:token
item_id:token rating:float timestamp:float`` and ``item_id:token movie_title:token_seq
release_year:token class:token_seq`` (MovieLens-100k). ``--path`` is the directory or the
``.inter`` file; ``--items-path`` overrides the ``.item`` file beside it.

Mapping: title = ``movie_title``/``title``/``name`` (with the release year in parentheses when
there is one, so that remakes stay apart), category = ``class``/``genre``/``genres``/
``categories``/``category`` (RecBole separates tokens by spaces, so "Children's Comedy" is two
genres; a value containing commas is split on commas instead), description/brand/price when such
fields exist. The event type is ``rating`` when there is a rating field, else ``view``. Timestamps
are epoch seconds; without a timestamp field they are synthesised from row order. User ids are
dataset-local, so they are hashed as ``<user_namespace or platform>:<id>``.

Recipe ``genre-half-0`` / ``genre-half-1`` (``--recipe``, with ``--seed``): one of two platforms
cut from one catalog by genre, so that the same users appear on both (ingest both halves with the
same ``--user-namespace``). The rule (:func:`genre_halves`): the distinct genres of the item file,
sorted, are shuffled by ``numpy.random.default_rng(seed)`` and the first ceil(G/2) form half 0,
the rest half 1; a movie belongs to the half of its *first-listed* genre. Items of the other half
and their events are filtered (counted as ``genre_other_half``); items without a genre are
filtered from both halves (``genre_missing``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.ingest.base import IngestError, IngestOptions, Ledger, SourceFrames
from recsys.data.ingest.parsing import blank, id_text, parse_price
from recsys.data.ingest.tables import read_errors
from recsys.data.pseudonym import Pseudonymizer

EPOCH = pd.Timestamp("2000-01-01", tz="UTC")
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("movie_title", "title", "name")
CATEGORY_FIELDS = ("class", "genre", "genres", "categories", "category")
_YEAR = re.compile(r"^\d{3,4}(?:\.0+)?$")


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    """Events from ``X.inter``, the catalog from ``X.item``."""
    inter_p, item_p = _locate(opts.source_path(), opts.items_path)
    platform = opts.platform or inter_p.stem.lower()
    ledger = Ledger(pseudo)

    df, types = read_atomic(inter_p)
    ledger.events.rows_in = len(df)
    n = len(df)
    if "user_id" in df:
        user_field = "user_id"
    elif "session_id" in df:
        user_field = "session_id"
        ledger.quirk("user_is_session", "no user_id field: each session is treated as a user")
    else:
        raise IngestError(str(inter_p), f"no user_id field in header {list(types)}",
                          row=1, column="user_id")
    if "item_id" not in df:
        raise IngestError(str(inter_p), f"no item_id field in header {list(types)}", row=1,
                          column="item_id")
    ns = opts.user_namespace or platform
    users, _ = id_text(df[user_field])
    events = pd.DataFrame({
        "user_id": ns + ":" + users,
        "item_id": id_text(df["item_id"])[0],
        "event_index": np.arange(n, dtype=np.int64),
        "_file": str(inter_p),
        "_row": df["_row"].to_numpy(),
    })
    if user_field == "session_id":
        events["session_id"] = users
    if "rating" in df:
        events["event_type"] = "rating"
        dist = df["rating"].value_counts(dropna=True).sort_index()
        ledger.quirk("ratings_not_kept", {"event_type": "rating",
                                          "distribution": {str(k): int(v)
                                                           for k, v in dist.items()}})
    else:
        events["event_type"] = "view"
    if "timestamp" in df:
        seconds = pd.to_numeric(df["timestamp"], errors="coerce")
        events["timestamp"] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
        bad = events["timestamp"].isna() & ~blank(df["timestamp"])
        if bad.any():
            events["source_timestamp"] = df["timestamp"]
    else:
        events["timestamp"] = EPOCH + pd.to_timedelta(np.arange(n, dtype=np.int64), unit="s")
        ledger.quirk("timestamps_synthesised", "no timestamp field; row order, one second apart "
                     f"from {EPOCH.isoformat()}")
    ledger.quirk("user_ids", f"dataset-local ids, hashed as '{ns}:<id>'")

    items = _read_items(item_p, ledger)
    if opts.recipe is not None:
        events, items = _genre_half(opts.recipe, opts.seed, events, items, ledger, str(item_p))
    return [SourceFrames(platform, events, items, ledger, str(inter_p))]


GENRE_HALF = re.compile(r"^genre-half-([01])$")


def genre_halves(genres: list[str], seed: int) -> tuple[list[str], list[str]]:
    """The seeded partition of ``genres`` into two halves (sorted within each half): sorted,
    shuffled by ``numpy.random.default_rng(seed)``, the first ceil(G/2) are half 0."""
    names = sorted(set(genres))
    order = np.random.default_rng(seed).permutation(len(names))
    cut = (len(names) + 1) // 2
    return sorted(names[i] for i in order[:cut]), sorted(names[i] for i in order[cut:])


def _genre_half(recipe: str, seed: int, events: pd.DataFrame, items: pd.DataFrame,
                ledger: Ledger, item_path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the items (and their events) of one half of the genre partition."""
    m = GENRE_HALF.match(recipe)
    if m is None:
        raise IngestError(item_path, f"unknown recipe {recipe!r} for recbole; known: "
                          "genre-half-0, genre-half-1")
    if "category" not in items:
        raise IngestError(item_path, "recipe genre-half needs a genre field "
                          f"(one of {list(CATEGORY_FIELDS)})")
    half = int(m.group(1))
    first = items["category"].map(lambda g: g[0] if isinstance(g, list) and g else None)
    halves = genre_halves([g for gs in items["category"] if isinstance(gs, list) for g in gs],
                          seed)
    mine = set(halves[half])
    keep = first.isin(mine).to_numpy()
    missing = first.isna().to_numpy()
    ledger.filter("items", int(missing.sum()), "genre_missing")
    ledger.filter("items", int((~keep & ~missing).sum()), "genre_other_half")
    ev_keep = events["item_id"].isin(set(items.loc[keep, "item_id"])).to_numpy()
    ev_missing = events["item_id"].isin(set(items.loc[missing, "item_id"])).to_numpy()
    known = events["item_id"].isin(set(items["item_id"])).to_numpy()  # others: quarantined later
    ledger.filter("events", int(ev_missing.sum()), "genre_missing")
    ledger.filter("events", int((~ev_keep & ~ev_missing & known).sum()), "genre_other_half")
    ledger.quirk("genre_half", {"half": half, "seed": seed, "genres": halves[half],
                                "other_half": halves[1 - half],
                                "rule": "the half of the movie's first-listed genre"})
    return events[ev_keep | ~known].reset_index(drop=True), items[keep].reset_index(drop=True)


def _locate(path: Path, items_path: Path | None) -> tuple[Path, Path]:
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if len(inters) != 1:
            hint = " (train/valid/test splits are read by source 'unisrec')" if len(inters) > 1 \
                else ""
            raise IngestError(str(path), f"expected exactly one *.inter file, found "
                              f"{[p.name for p in inters]}{hint}")
        inter = inters[0]
    elif path.is_file():
        inter = path
    else:
        raise IngestError(str(path), "no such file or directory")
    item = Path(items_path) if items_path is not None else inter.with_suffix(".item")
    if not item.is_file():
        raise IngestError(str(item), "item file not found: item text (a title per item) is "
                          "required; give --items-path")
    return inter, item


def read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """One atomic file as text columns named without their types, plus a ``_row`` line number.

    Blank lines are skipped but still counted, so ``_row`` is the true line of the file.
    """
    try:
        with path.open(encoding="utf-8") as fh:
            header = fh.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(str(path), f"cannot read: {exc}") from exc
    if not header.strip():
        raise IngestError(str(path), "empty file or empty header", row=1)
    types: dict[str, str] = {}
    for field in header.split("\t"):
        name, sep, kind = field.strip().partition(":")
        if not sep or kind not in RECBOLE_TYPES:
            raise IngestError(str(path), f"header field {field!r} is not 'name:type' with type "
                              f"in {list(RECBOLE_TYPES)}", row=1, column=field)
        if name in types:
            raise IngestError(str(path), f"field {name!r} appears twice in the header", row=1,
                              column=name)
        types[name] = kind
    with read_errors(path, malformed="wrong number of tab-separated fields"):
        df = pd.read_csv(path, sep="\t", skiprows=1, header=None, names=list(types), dtype=str,
                         quoting=csv.QUOTE_NONE, keep_default_na=False, na_values=[""],
                         skip_blank_lines=False, encoding="utf-8", engine="c")
    df["_row"] = np.arange(2, len(df) + 2, dtype=np.int64)
    blank_line = df[list(types)].isna().all(axis=1)
    if blank_line.any():
        df = df[~blank_line].reset_index(drop=True)
    return df, types


def _read_items(path: Path, ledger: Ledger) -> pd.DataFrame:
    df, types = read_atomic(path)
    ledger.items.rows_in = len(df)
    if "item_id" not in df:
        raise IngestError(str(path), f"no item_id field in header {list(types)}", row=1,
                          column="item_id")
    title_field = next((f for f in TITLE_FIELDS if f in df), None)
    if title_field is None:
        raise IngestError(str(path), f"no title field (one of {list(TITLE_FIELDS)}) in header "
                          f"{list(types)}", row=1, column="title")
    title = df[title_field].astype("string").str.strip()
    if "release_year" in df:
        year = df["release_year"].astype("string").str.strip()
        ok = year.str.match(_YEAR).fillna(False).astype(bool) & ~blank(title)
        title = title.mask(ok, title + " (" + year.str.replace(r"\.0+$", "", regex=True) + ")")
        odd = int((~blank(year) & ~year.str.match(_YEAR).fillna(False).astype(bool)).sum())
        if odd:
            ledger.quirk("release_year_not_a_year", odd)
    items = pd.DataFrame({
        "item_id": id_text(df["item_id"])[0],
        "title": title,
        "_file": str(path),
        "_row": df["_row"].to_numpy(),
    })
    cat_field = next((f for f in CATEGORY_FIELDS if f in df), None)
    if cat_field is not None:
        items["category"] = [_split_tokens(v) for v in df[cat_field]]
    for name in ("description", "brand"):
        if name in df:
            items[name] = df[name]
    if "price" in df:
        items["price"], junk = parse_price(df["price"])
        if junk:
            ledger.quirk("unparseable_item_prices", junk)
    ledger.quirk("item_fields", {"title": title_field, "category": cat_field})
    return items


def _split_tokens(value: object) -> list[str] | None:
    """A token_seq as a list: comma-separated when it has commas, else space-separated."""
    if not isinstance(value, str) or not value.strip():
        return None
    parts = value.split(",") if "," in value else value.split()
    cleaned = [p.strip().strip("'\"[]").strip() for p in parts]
    return [p for p in cleaned if p] or None
