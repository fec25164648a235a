"""Amazon review data (source ``amazon-json``), in either of two layouts, told apart by the path.

**LC-Rec layout** (a directory holding ``X.inter.json`` + ``X.item.json``, or the ``.inter.json``
path itself): ``{user_index: [item_index, ...]}`` in chronological order without times, and
``{item_index: {title, description, brand, categories}}`` (``_row`` is then the 1-based position
in the flattened lists / in the item object, as these files are one JSON document each).
Timestamps are synthesised from the position (one second apart from 2000-01-01 UTC, as for
UniSRec files) and user ids are dataset-local indices, namespaced
``<user_namespace or platform>:<index>`` before hashing so that index 7 of one dataset never
links to index 7 of another. This is a fixed benchmark: items with an
empty title get a title made from their other text instead of being dropped (dropping them would
also drop their events and change the benchmark), and the report says how many.

**Amazon's own JSON lines** (optionally ``.gz``): reviews ``{"reviewerID", "asin",
"unixReviewTime", "overall", ...}`` at ``--path`` and metadata ``{"asin", "title", "brand",
"categories" | "category", "price", "description"}`` at ``--items-path`` (or ``meta_*`` beside the
reviews in a directory). The 2014 metadata is a Python dict literal per line, not JSON, so each
line falls back to :func:`ast.literal_eval`. Reviewer ids are global Amazon ids and are hashed
as-is (unless a namespace is given), so one reviewer links across categories. The 2023 release's
field names (``user_id``, ``parent_asin``, ``timestamp`` in ms, ``store``) are accepted too.
Reviews of items without metadata are quarantined by finalize (``item_not_in_catalog``); exact
duplicate (user, item, time) reviews are filtered as ``duplicate``.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json

from recsys.data.ingest.base import IngestError, IngestOptions, Ledger, SourceFrames
from recsys.data.ingest.parsing import blank, parse_price
from recsys.data.pseudonym import Pseudonymizer

EPOCH = pd.Timestamp("2000-01-01", tz="UTC")
_FALLBACK_TITLE_CHARS = 120
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def read(opts: IngestOptions, pseudo: Pseudonymizer) -> list[SourceFrames]:
    """Parse either layout into canonical frames for one platform."""
    path = opts.source_path()
    platform = opts.platform or path.name.split(".")[0].lower()
    items_path = Path(opts.items_path) if opts.items_path is not None else None
    layout, events_p, meta_p = _detect(path, items_path)
    if layout == "lcrec":
        return [_read_lcrec(events_p, meta_p, opts, pseudo, platform)]
    return [_read_reviews(events_p, meta_p, opts, pseudo, platform)]


def _detect(path: Path, items_path: Path | None) -> tuple[str, Path, Path]:
    """(layout, events file, item file) from what the path holds."""
    if path.is_dir():
        inters = sorted(path.glob("*.inter.json"))
        if len(inters) > 1:
            raise IngestError(str(path), f"several *.inter.json files {[p.name for p in inters]}:"
                              " give one of them as --path")
        if inters:
            return "lcrec", inters[0], items_path or _lcrec_item_file(inters[0])
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_JSON_SUFFIXES))
        metas = [p for p in files if p.name.startswith("meta")]
        reviews = [p for p in files if not p.name.startswith("meta")]
        if len(reviews) != 1 or (items_path is None and len(metas) != 1):
            raise IngestError(str(path), "expected X.inter.json (LC-Rec layout), or one reviews "
                              "file and one meta_* file (Amazon JSON lines); found "
                              f"{[p.name for p in files]}")
        return "reviews", reviews[0], items_path or metas[0]
    if not path.is_file():
        raise IngestError(str(path), "no such file or directory")
    if path.name.endswith(".inter.json"):
        return "lcrec", path, items_path or _lcrec_item_file(path)
    if items_path is None:
        raise IngestError(str(path), "Amazon reviews need their metadata file for item text: "
                          "give it as --items-path (e.g. meta_Office_Products.json.gz)")
    return "reviews", path, items_path


def _lcrec_item_file(inter: Path) -> Path:
    item = inter.with_name(inter.name[: -len(".inter.json")] + ".item.json")
    if not item.is_file():
        raise IngestError(str(inter), f"item file {item.name} not found beside it (or give "
                          "--items-path)")
    return item


# --------------------------------------------------------------------------- LC-Rec layout


def _load_json(path: Path) -> Any:
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise IngestError(str(path), f"not valid JSON: {exc.msg}", row=exc.lineno) from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise IngestError(str(path), f"cannot read: {exc}") from exc


def _read_lcrec(inter_p: Path, item_p: Path, opts: IngestOptions, pseudo: Pseudonymizer,
                platform: str) -> SourceFrames:
    ledger = Ledger(pseudo)
    inter = _load_json(inter_p)
    if not isinstance(inter, dict):
        raise IngestError(str(inter_p), "expected an object {user_index: [item_index, ...]}")
    for user, seq in inter.items():
        if not isinstance(seq, list):
            raise IngestError(str(inter_p), f"user {user!r}: expected a list of item indices, "
                              f"got {type(seq).__name__}")
    ns = opts.user_namespace or platform
    seqs = list(inter.values())
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    n = int(lens.sum())
    pos = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    events = pd.DataFrame({
        "user_id": np.repeat(np.array([f"{ns}:{u}" for u in inter], dtype=object), lens),
        "item_id": [None if i is None else str(i) for s in seqs for i in s],
        "event_type": "review",
        "timestamp": EPOCH + pd.to_timedelta(pos, unit="s"),
        "event_index": np.arange(n, dtype=np.int64),
        "_file": str(inter_p),
        "_row": np.arange(1, n + 1, dtype=np.int64),  # position in the flattened lists
    })
    ledger.events.rows_in = n

    meta = _load_json(item_p)
    if not isinstance(meta, dict):
        raise IngestError(str(item_p), "expected an object {item_index: {title, ...}}")
    rows = []
    for k, (idx, rec) in enumerate(meta.items(), start=1):
        if not isinstance(rec, dict):
            raise IngestError(str(item_p), f"item {idx!r}: expected an object, got "
                              f"{type(rec).__name__}", row=k)
        rows.append((str(idx), rec.get("title"), rec.get("description"), rec.get("brand"),
                     rec.get("categories"), rec.get("price")))
    items = _items_frame(rows, item_p, np.arange(1, len(rows) + 1), ledger)
    ledger.items.rows_in = len(items)
    _fill_titles(items, ledger)

    ledger.quirk("timestamps_synthesised", "source has no time; positions one second apart "
                 f"from {EPOCH.isoformat()}")
    ledger.quirk("user_ids", f"dataset-local indices, hashed as '{ns}:<index>'")
    ledger.quirk("item_ids", "dataset-local indices of the LC-Rec item file")
    ledger.quirk("category_split", "LC-Rec joins the path with ', ': names that contain a comma "
                 "(e.g. 'Calendars, Planners & Personal Organizers') become two levels")
    return SourceFrames(platform, events, items, ledger, str(inter_p))


def _fill_titles(items: pd.DataFrame, ledger: Ledger) -> None:
    """Give items with an empty title one made from their description, brand or category."""
    missing = blank(items["title"])
    if not missing.any():
        return
    made = [_fallback_title(d, b, c) for d, b, c in
            items.loc[missing, ["description", "brand", "category"]].itertuples(index=False)]
    items.loc[missing, "title"] = pd.Series(made, index=items.index[missing], dtype=object)
    ledger.quirk("titles_synthesised", {
        "count": int(sum(m is not None for m in made)),
        "rule": "empty title -> first sentence of the description (<= "
                f"{_FALLBACK_TITLE_CHARS} chars), else brand + leaf category",
    })


def _fallback_title(description: Any, brand: Any, category: Any) -> str | None:
    text = description.strip() if isinstance(description, str) else ""
    if text:
        first = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0]
        if len(first) > _FALLBACK_TITLE_CHARS:
            first = first[:_FALLBACK_TITLE_CHARS].rsplit(" ", 1)[0] + "..."
        return first
    parts = [brand.strip() if isinstance(brand, str) else "",
             category[-1] if isinstance(category, list) and category else ""]
    made = " ".join(p for p in parts if p)
    return made or None


# --------------------------------------------------------------------------- JSON lines layout


def _open_text(path: Path) -> Any:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _records(path: Path, literal_lines: Counter[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line: JSON, else a Python literal (Amazon 2014)."""
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    try:
                        rec = ast.literal_eval(line)
                    except (ValueError, TypeError, SyntaxError, MemoryError,
                            RecursionError) as exc2:
                        raise IngestError(str(path), "neither JSON nor a Python literal "
                                          f"({exc.msg})", row=lineno) from exc2
                    literal_lines[path.name] += 1
                if not isinstance(rec, dict):
                    raise IngestError(str(path), f"expected one object per line, got "
                                      f"{type(rec).__name__}", row=lineno)
                yield lineno, rec
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise IngestError(str(path), f"cannot read: {exc}") from exc


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# The review fields used, under their 2014/2018 and 2023 names. Times as float64 ms: exact for
# both unixReviewTime (s) and the 2023 millisecond timestamps.
_REVIEW_FIELDS = pa.schema([
    ("reviewerID", pa.string()), ("user_id", pa.string()), ("asin", pa.string()),
    ("parent_asin", pa.string()), ("unixReviewTime", pa.float64()), ("timestamp", pa.float64()),
    ("overall", pa.float64()), ("rating", pa.float64()),
])


def _first(rec: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` with a non-empty value (2023 files carry both asin and parent_asin)."""
    for key in keys:
        value = rec.get(key)
        if value is not None and value != "":
            return value
    return None


def _reviews_fast(path: Path) -> pd.DataFrame | None:
    """Arrow's C++ JSON reader for strict-JSON review files (tens of millions of lines).

    Returns None when the file is anything but clean JSON lines of the expected field types;
    the line-by-line reader then handles it and names the offending line.
    """
    try:
        table = pa_json.read_json(path, parse_options=pa_json.ParseOptions(
            explicit_schema=_REVIEW_FIELDS, unexpected_field_behavior="ignore"))
    except (pa.ArrowException, OSError, EOFError, ValueError):
        return None
    df = table.to_pandas(types_mapper={pa.string(): pd.StringDtype()}.get)
    parent = df["parent_asin"]
    secs = df["unixReviewTime"]
    return pd.DataFrame({
        "user": df["reviewerID"].fillna(df["user_id"]),
        "item": parent.where(~blank(parent), df["asin"]),
        "ms": (secs * 1000.0).fillna(df["timestamp"]),
        "rating": df["overall"].fillna(df["rating"]),
        "_row": _nonblank_lines(path, len(df)),
    })


def _nonblank_lines(path: Path, n: int) -> np.ndarray:
    """Line numbers of the ``n`` non-blank lines (Arrow skips blank ones without saying where)."""
    newlines, last = 0, b"\n"
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as fh:
        while chunk := fh.read(1 << 22):
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    if newlines + (last != b"\n") == n:
        return np.arange(1, n + 1, dtype=np.int64)
    with _open_text(path) as fh:
        rows = [i for i, line in enumerate(fh, start=1) if line.strip()]
    return np.asarray(rows, dtype=np.int64)


def _reviews_slow(path: Path, literal_lines: Counter[str]) -> pd.DataFrame:
    users: list[Any] = []
    items: list[Any] = []
    millis: list[float | None] = []
    ratings: list[float | None] = []
    rows: list[int] = []
    for lineno, rec in _records(path, literal_lines):
        user = _first(rec, "reviewerID", "user_id")
        item = _first(rec, "parent_asin", "asin")
        secs = _number(rec.get("unixReviewTime"))
        users.append(None if user is None else str(user))
        items.append(None if item is None else str(item))
        millis.append(secs * 1000.0 if secs is not None else _number(rec.get("timestamp")))
        ratings.append(_number(_first(rec, "overall", "rating")))
        rows.append(lineno)
    return pd.DataFrame({
        "user": pd.Series(users, dtype="string"),
        "item": pd.Series(items, dtype="string"),
        "ms": pd.Series(millis, dtype="float64"),
        "rating": pd.Series(ratings, dtype="float64"),
        "_row": np.asarray(rows, dtype=np.int64),
    })


def _read_reviews(reviews_p: Path, meta_p: Path, opts: IngestOptions, pseudo: Pseudonymizer,
                  platform: str) -> SourceFrames:
    ledger = Ledger(pseudo)
    literal_lines: Counter[str] = Counter()
    raw = _reviews_fast(reviews_p)
    if raw is None:
        raw = _reviews_slow(reviews_p, literal_lines)
    n = len(raw)
    user_col = raw["user"].astype("string")
    if opts.user_namespace:
        user_col = opts.user_namespace + ":" + user_col
    events = pd.DataFrame({
        "user_id": user_col,
        "item_id": raw["item"].astype("string"),
        "event_type": "review",
        "timestamp": pd.to_datetime(raw["ms"], unit="ms", utc=True, errors="coerce"),
        "event_index": np.arange(n, dtype=np.int64),
        "_file": str(reviews_p),
        "_row": raw["_row"].to_numpy(dtype=np.int64),
    })
    ledger.events.rows_in = n
    key = ["user_id", "item_id", "timestamp"]
    dup = events.duplicated(key, keep="first") & events[key].notna().all(axis=1)
    ledger.filter("events", int(dup.sum()), "duplicate")
    events = events[~dup].reset_index(drop=True)
    ratings = raw["rating"].value_counts(dropna=True).sort_index()
    if len(ratings):
        ledger.quirk("ratings_ignored", {"event_type": "review",
                                         "distribution": {str(float(k)): int(v)
                                                          for k, v in ratings.items()}})

    meta_rows = []
    meta_lines = []
    for lineno, rec in _records(meta_p, literal_lines):
        asin = _first(rec, "parent_asin", "asin")
        category = rec["categories"] if "categories" in rec else rec.get("category")
        meta_rows.append((None if asin is None else str(asin), rec.get("title"),
                          rec.get("description"), _first(rec, "brand", "store"), category,
                          rec.get("price")))
        meta_lines.append(lineno)
    items = _items_frame(meta_rows, meta_p, np.asarray(meta_lines, dtype=np.int64), ledger)
    ledger.items.rows_in = len(items)
    if literal_lines:
        ledger.quirk("python_literal_lines", dict(literal_lines))
    ledger.quirk("user_ids", f"namespaced '{opts.user_namespace}:<reviewerID>'"
                 if opts.user_namespace else "global Amazon reviewer ids, hashed as-is")
    return SourceFrames(platform, events, items, ledger, str(reviews_p))


# --------------------------------------------------------------------------- item fields


def _items_frame(rows: list[tuple[Any, ...]], path: Path, row_numbers: np.ndarray,
                 ledger: Ledger) -> pd.DataFrame:
    """Raw (id, title, description, brand, categories, price) tuples -> clean item columns."""
    raw = pd.DataFrame(rows, columns=["item_id", "title", "description", "brand", "category",
                                      "price"], dtype=object)
    unescaped: dict[str, int] = {}
    for col in ("title", "description", "brand"):
        raw[col], changed = _text_column(raw[col])
        if changed:
            unescaped[col] = changed
    if unescaped:
        ledger.quirk("html_entities_unescaped", unescaped)
    paths = [_category_path(v) for v in raw["category"]]
    raw["category"] = pd.Series([p for p, _ in paths], index=raw.index, dtype=object)
    multi = sum(extra for _, extra in paths)
    if multi:
        ledger.quirk("category_first_path_of_several", multi)
    raw["price"], junk = parse_price(raw["price"])
    if junk:
        ledger.quirk("unparseable_item_prices", junk)
    raw["_file"] = str(path)
    raw["_row"] = row_numbers
    return raw


def _text_column(values: pd.Series) -> tuple[pd.Series, int]:
    """Lists joined (2018 descriptions are lists of paragraphs), HTML entities unescaped."""
    out = []
    changed = 0
    for v in values:
        if isinstance(v, (list, tuple)):
            v = " ".join(str(p).strip() for p in v if p is not None and str(p).strip())
        elif v is not None and not isinstance(v, str):
            v = str(v)
        if v and "&" in v:
            u = html.unescape(v)
            changed += u != v
            v = u
        out.append(v)
    return pd.Series(out, index=values.index, dtype=object), changed


def _category_path(value: Any) -> tuple[list[str] | None, bool]:
    """Root-first path; returns (path, whether other paths were dropped).

    2014: list of paths, the first is taken; 2018/2023: one flat list; LC-Rec: one string
    joined with ', '.
    """
    if value is None:
        return None, False
    if isinstance(value, str):
        parts = [html.unescape(p.strip()) for p in value.split(",")]
        return [p for p in parts if p] or None, False
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (list, tuple)) for v in value):
            first = [html.unescape(str(p).strip()) for p in value[0] if str(p).strip()]
            return first or None, len(value) > 1
        flat = [html.unescape(str(p).strip()) for p in value
                if not isinstance(p, (list, tuple)) and str(p).strip()]
        return flat or None, False
    return None, False
