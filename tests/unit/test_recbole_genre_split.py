"""The recbole adapter's ``genre-half-0`` / ``genre-half-1`` recipe: one catalog cut into two
platforms by a seeded genre partition, the same users on both (MovieLens-1M in
``bench/cross_platform.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.data import lake
from recsys.data.ingest.base import IngestError, IngestOptions
from recsys.data.ingest.recbole import genre_halves
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer

KEY = bytes(range(32))
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller"]
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n" + "".join(
    f"{i}\tMovie {i}\t1990\t{GENRES[i % 7]} {GENRES[(i + 3) % 7]}\n" for i in range(1, 15)
) + "15\tNo Genre\t1990\t\n"
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t4\t{1000 + 10 * i + u}\n" for u in (1, 2, 3) for i in range(1, 16))


def halves(tmp_path: Path, seed: int = 1) -> dict[str, lake.PlatformTables]:
    src = tmp_path / "ml"
    src.mkdir(exist_ok=True)
    (src / "ml.inter").write_text(INTER)
    (src / "ml.item").write_text(ITEM)
    out = {}
    for half in (0, 1):
        opts = IngestOptions(source="recbole", path=src, out=tmp_path / "lake",
                             platform=f"ml_{half}", recipe=f"genre-half-{half}", seed=seed,
                             user_namespace="ml")
        ingest(opts, Pseudonymizer(KEY))
        out[f"ml_{half}"] = lake.read_platform(opts.out, f"ml_{half}")
    return out


def test_the_partition_is_seeded_and_covers_every_genre_once() -> None:
    a, b = genre_halves(GENRES * 2, seed=1)
    assert sorted(a + b) == GENRES and len(a) == 4 and not set(a) & set(b)
    assert genre_halves(GENRES, seed=1) == (a, b)
    assert any(genre_halves(GENRES, seed=s) != (a, b) for s in range(2, 6))


def test_two_platforms_with_the_same_users_and_disjoint_catalogs(tmp_path: Path) -> None:
    got = halves(tmp_path)
    h0, h1 = genre_halves(GENRES, seed=1)
    items = {p: set(t.items["item_id"].to_pylist()) for p, t in got.items()}
    assert not items["ml_0"] & items["ml_1"]
    assert len(items["ml_0"]) + len(items["ml_1"]) == 14  # the genre-less movie in neither
    for p, half in (("ml_0", h0), ("ml_1", h1)):
        first = {f"{i}" for i in range(1, 15) if GENRES[i % 7] in half}
        assert items[p] == first  # a movie follows its first-listed genre
        report = got[p].report
        assert report["events"]["invariant_holds"]
        assert report["events"]["filtered_by_rule"]["genre_missing"] == 3
        assert report["quirks"]["genre_half"]["genres"] == half
    users = {p: set(t.events["user_id"].to_pylist()) for p, t in got.items()}
    assert users["ml_0"] == users["ml_1"] and len(users["ml_0"]) == 3  # one pseudonym each


def test_an_unknown_recipe_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ml.inter").write_text(INTER)
    (src / "ml.item").write_text(ITEM)
    with pytest.raises(IngestError, match="unknown recipe 'genre-half-2'"):
        ingest(IngestOptions(source="recbole", path=src, out=tmp_path / "lake",
                             platform="ml", recipe="genre-half-2"), Pseudonymizer(KEY))
