"""Ray Data pipeline on a real local Ray cluster: lake -> examples -> Ray Train worker shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys.data.examples import DataConfig, build_example_set, load_example_set, read_split
from recsys.data.ingest.base import IngestOptions
from recsys.data.ingest.runner import ingest
from recsys.data.pseudonym import Pseudonymizer
from recsys.data.sequences import SPLITS
from recsys.model.features import load_token_ids


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lake")
    ingest(IngestOptions(source="synthetic", out=out, scale=0.15, seed=3, buckets=2),
           Pseudonymizer(bytes(range(32))))
    return out


@pytest.fixture(scope="module")
def example_set(ray_cluster, lake: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ex") / "examples"
    cfg = DataConfig(lake=str(lake), examples=str(out),
                     sequences={"collapse_repeats": True, "max_seq_len": 20})
    return build_example_set(cfg)


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([("platform", "ascending"), ("user_id", "ascending"),
                      ("split", "ascending"), ("target", "ascending")])


def test_every_user_gets_one_valid_and_test_row(example_set) -> None:
    m = example_set.manifest
    assert len(m.platforms) >= 3
    for split in ("valid", "test"):
        t = read_split(example_set, split)
        keys = [f"{p}/{u}" for p, u in zip(t["platform"].to_pylist(), t["user_id"].to_pylist())]
        assert len(keys) == len(set(keys)) > 0
    for name, counts in m.platforms.items():
        assert counts.valid_rows == counts.test_rows == counts.users > 0
        assert counts.train_rows >= counts.users * 0.5
        t = read_split(example_set, "test").filter(pc.equal(read_split(example_set, "test")
                                                            ["platform"], name))
        assert pc.max(t["target"]).as_py() <= counts.catalog_items
        assert pc.min(t["target"]).as_py() >= 1
    hist = pc.list_value_length(read_split(example_set, "train")["history"])
    assert pc.max(hist).as_py() <= 20


def test_valid_history_is_test_history_minus_last(example_set) -> None:
    valid = {(r["platform"], r["user_id"]): r for r in read_split(example_set, "valid").to_pylist()}
    for r in read_split(example_set, "test").to_pylist()[:200]:
        v = valid[(r["platform"], r["user_id"])]
        assert r["history"][-1] == v["target"]
        assert r["history"][:-1][-len(v["history"]):] == v["history"][-(len(r["history"]) - 1):] \
            or len(r["history"]) == 1


def test_text_tokenised_once_per_distinct_text(example_set) -> None:
    text = example_set.manifest.text
    tokens = load_token_ids(example_set.path)
    assert len(tokens) == text.distinct_texts
    # partly shared catalogs: the same item on two shops is tokenised once
    assert text.distinct_texts < text.catalog_rows
    catalogs = list((example_set.path / "catalog").glob("*.parquet"))
    for f in catalogs:
        cat = pq.read_table(f)
        assert set(cat["text_hash"].to_pylist()) <= set(tokens)
        assert cat["item_idx"].to_pylist() == list(range(1, cat.num_rows + 1))


def test_deterministic_rebuild(ray_cluster, lake: Path, example_set, tmp_path: Path) -> None:
    cfg = example_set.manifest.config.model_copy(update={"examples": str(tmp_path / "again")})
    again = build_example_set(cfg)
    for split in SPLITS:
        assert _sorted(read_split(again, split)).equals(_sorted(read_split(example_set, split)))
    assert again.manifest.input_fingerprint == example_set.manifest.input_fingerprint
    # manifest.json round-trips through its one reader
    assert load_example_set(again.path).manifest == again.manifest


def test_missing_platform_is_named(ray_cluster, lake: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_example_set(DataConfig(lake=str(lake), examples=str(tmp_path / "x"),
                                     platforms=["nowhere"]))


def test_ray_train_workers_get_disjoint_shards(ray_cluster, example_set, tmp_path: Path) -> None:
    """Two Ray Train workers (gloo, fractional CPUs) read their own shard of the train split."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys.data.feed import example_datasets

    def loop(config: dict) -> None:
        import ray.train

        from recsys.data.feed import iter_batches

        ctx = ray.train.get_context()
        shard = ray.train.get_dataset_shard("train")
        seen = []
        for batch in iter_batches(shard, batch_size=64, max_len=20, shuffle_buffer=256, seed=0):
            assert batch["history"].shape[1] <= 20
            assert (batch["history"][:, -1] > 0).all()  # left padded: newest item last
            seen += [f"{h[h > 0].tolist()}|{t}" for h, t in zip(batch["history"], batch["target"])]
        Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(seen))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        datasets=example_datasets(example_set, splits=("train",)),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="shards"),
    )
    trainer.fit()
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    train = read_split(example_set, "train")
    assert len(r0) + len(r1) == train.num_rows
    assert abs(len(r0) - len(r1)) <= max(64, 0.2 * train.num_rows)
    expected = sorted(f"{h}|{t}" for h, t in zip(train["history"].to_pylist(),
                                                 train["target"].to_pylist()))
    assert sorted(r0 + r1) == expected


def test_cross_platform_histories_built_by_ray_data_match_the_whole_lake_build(
        ray_cluster, lake: Path, example_set, tmp_path: Path) -> None:
    """Each Ray Data task reads one bucket of its platform and only the buckets of the other
    platforms that can hold the same users: the result equals building from whole platforms,
    the rows and targets equal the own-history set's, and no history item from elsewhere is
    at or after its target's time."""
    from recsys.data.crossplatform import build_cross_examples, history_elsewhere
    from recsys.data.lake import list_platforms, read_events, read_items
    from recsys.data.sequences import item_index, user_sequences

    cfg = example_set.manifest.config.model_copy(update={
        "examples": str(tmp_path / "cross"),
        "sequences": example_set.manifest.config.sequences.model_copy(
            update={"cross_platform": True})})
    cross = build_example_set(cfg)
    assert cross.manifest.input_fingerprint != example_set.manifest.input_fingerprint
    platforms = list_platforms(lake)
    seqs = {p: user_sequences(read_events(lake, p), item_index(read_items(lake, p)["item_id"]),
                              cfg.sequences) for p in platforms}
    whole = pa.concat_tables([build_cross_examples(seqs, p, cfg.sequences, platforms)[0]
                              for p in platforms])
    built = pa.concat_tables([read_split(cross, s) for s in SPLITS])
    assert _sorted(built).equals(_sorted(whole))
    for split in ("valid", "test"):
        own, mine = read_split(example_set, split), read_split(cross, split)
        assert sorted(zip(own["platform"].to_pylist(), own["user_id"].to_pylist(),
                          own["target"].to_pylist())) == \
            sorted(zip(mine["platform"].to_pylist(), mine["user_id"].to_pylist(),
                       mine["target"].to_pylist()))
    test = read_split(cross, "test")
    assert history_elsewhere(test).mean() > 0.2  # synthetic shops share many users
    # times: every item from elsewhere was taken by this user strictly before the target
    first: dict[tuple[str, str, int], int] = {}
    last: dict[tuple[str, str, int], int] = {}
    for p, s in seqs.items():
        for k, (a, b) in enumerate(zip(s.starts.tolist(), s.ends.tolist())):
            for j in range(a, b):
                key = (p, s.users[k], int(s.items[j]))
                first[key] = min(first.get(key, 2**62), int(s.times[j]))
                last[key] = max(last.get(key, 0), int(s.times[j]))
    checked = 0
    for r in test.to_pylist():
        t = last[(r["platform"], r["user_id"], r["target"])]
        for item, q in zip(r["history"], r["history_platform"]):
            if q != r["platform"]:
                assert first[(q, r["user_id"], item)] < t
                checked += 1
    assert checked > 0


def test_a_lake_with_impressions_gives_every_row_its_shown_items(
        ray_cluster, example_set, tmp_path: Path) -> None:
    """Issue 21: the same world with impressions logged by shop_a only. Impressions never enter
    a history (rows and histories equal the plain set's); every file of the set carries
    ``shown``, non-zero only on shop_a, never the label itself; counted in the manifest."""
    lake = tmp_path / "lake"
    ingest(IngestOptions(source="synthetic", out=lake, scale=0.15, seed=3, buckets=2,
                         impressions=["shop_a"]), Pseudonymizer(bytes(range(32))))
    cfg = example_set.manifest.config.model_copy(update={"lake": str(lake),
                                                         "examples": str(tmp_path / "ex")})
    shown = build_example_set(cfg)
    assert shown.manifest.shown and not example_set.manifest.shown
    counts = {p: c.impressions for p, c in shown.manifest.platforms.items()}
    assert counts["shop_a"] > 0 and counts["shop_b"] == counts["shop_c"] == 0
    for split in SPLITS:
        plain, mine = _sorted(read_split(example_set, split)), _sorted(read_split(shown, split))
        assert mine.drop_columns(["shown"]).equals(plain)
        for r in mine.to_pylist():
            labels = r["history"][1:] + [r["target"]]
            assert len(r["shown"]) == len(labels)
            assert all(s != y for s, y in zip(r["shown"], labels) if s)
            if r["platform"] != "shop_a":
                assert not any(r["shown"])
    test = read_split(shown, "test")
    on_a = [r["shown"][-1] for r in test.to_pylist() if r["platform"] == "shop_a"]
    assert sum(1 for s in on_a if s) > 0.8 * len(on_a)  # a page before (almost) every choice
