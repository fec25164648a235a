"""Champion/challenger on a real MLflow server (no Ray): tiny exports with random weights, scored
by the real validation evaluation on a hand-written example set, registered as pyfunc versions.

Which random model scores higher is not known in advance; the tests compute both scores and check
that the registry acts on them (promote the better one, tag the worse one, roll back)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.examples import (
    DataConfig,
    ExampleManifest,
    ExampleSet,
    PlatformCounts,
    TextCounts,
    load_example_set,
)
from recsys.data.sequences import EXAMPLES_SCHEMA
from recsys.model.export import ExportedItems, save_export
from recsys.model.pyfunc import RecommenderPyfunc
from recsys.model.recommender import Recommender
from recsys.tracking import registry, runs

N, H, MAX_LEN = 30, 16, 8
PLATFORM = "shop_a"


def _rows(split: str, starts: list[int], length: int) -> list[dict]:
    out = []
    for u, s in enumerate(starts):
        seq = [(s - 1 + j) % N + 1 for j in range(length + 1)]
        out.append({"platform": PLATFORM, "user_id": f"{split}-{u}", "split": split,
                    "history": seq[:-1], "target": seq[-1]})
    return out


def _example_set(root: Path) -> ExampleSet:
    for split, starts in (("train", [1, 7, 13]), ("valid", list(range(1, N, 2))),
                          ("test", [2, 4])):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(_rows(split, starts, 4), schema=EXAMPLES_SCHEMA),
                       root / split / "a.parquet")
    (root / "catalog").mkdir()
    pq.write_table(pa.table({
        "item_idx": pa.array(np.arange(1, N + 1, dtype=np.int32)),
        "item_id": [f"i{i}" for i in range(1, N + 1)],
        "title": [f"item {i}" for i in range(1, N + 1)], "brand": ["acme"] * N,
        "category": pa.array([["home"]] * N, pa.list_(pa.string())),
        "price": pa.array(np.ones(N)), "text": [f"item {i}" for i in range(1, N + 1)],
        "text_hash": [str(i) for i in range(1, N + 1)]}), root / "catalog" / f"{PLATFORM}.parquet")
    ExampleManifest(created_at=datetime.now(UTC), seconds=0.0, input_fingerprint="test",
                    config=DataConfig(), text=TextCounts(distinct_texts=N, catalog_rows=N),
                    platforms={PLATFORM: PlatformCounts(catalog_items=N, lake_users=0,
                                                        users_too_short=0)}).write(root)
    return load_example_set(root)


def _export(root: Path, es: ExampleSet, seed: int, item_ids: list[str] | None = None) -> Path:
    torch.manual_seed(seed)
    model = Recommender(text_dim=H, dim=16, num_platforms=1, num_brands=2, num_categories=2,
                        max_len=MAX_LEN, num_layers=1, num_heads=2, dropout=0.0, num_experts=1)
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(N + 1, H)).astype(np.float32)
    vecs[0] = 0
    cats = np.zeros((N + 1, 3), np.int64)
    items = {PLATFORM: ExportedItems(PLATFORM, 0, item_ids or [f"i{i}" for i in range(1, N + 1)],
                                     np.r_[0, np.ones(N, np.int64)], cats, vecs)}
    meta = {"platforms": [PLATFORM], "platforms_with_items": [PLATFORM]}
    return save_export(root, model, model.state_dict(), meta, items,
                       {PLATFORM: es.path / "catalog" / f"{PLATFORM}.parquet"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, mlflow_server):
    """Three registered versions of one model (random weights, seeds 0-2) and a scorer."""
    tmp = tmp_path_factory.mktemp("registry")
    es = _example_set(tmp / "examples")
    uri, name = mlflow_server.uri, f"recsys-test-{tmp.name}"
    exports, versions = {}, {}
    for seed in range(3):
        exports[seed] = _export(tmp / f"export{seed}", es, seed)
        run_id = runs.start_run(uri, "registry-test", f"m{seed}")
        model_uri = runs.log_pyfunc_model(uri, run_id, RecommenderPyfunc(),
                                          artifacts={"export": str(exports[seed])},
                                          pip_requirements=["torch", "mlflow"])
        versions[seed] = runs.register_model(uri, model_uri, name, tags={"seed": seed})
        runs.end_run(uri, run_id)
    scorer = registry.valid_scorer(es, PLATFORM)
    scores = {seed: scorer(exports[seed]) for seed in exports}
    return {"uri": uri, "name": name, "es": es, "exports": exports, "versions": versions,
            "scorer": scorer, "scores": scores, "tmp": tmp}


def test_valid_scorer_is_a_real_evaluation(world) -> None:
    scores = world["scores"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert len(set(scores.values())) > 1, "random models scored identically: no comparison"


def test_champion_challenger_promote_and_rollback(world) -> None:
    uri, name, scores, versions = world["uri"], world["name"], world["scores"], world["versions"]
    worst, best = min(scores, key=scores.get), max(scores, key=scores.get)
    # The first version to arrive becomes champion (nothing to compare against).
    first = registry.promote_if_better(uri, name, versions[worst], world["scorer"],
                                       platform=PLATFORM, challenger_export=world["exports"][worst])
    assert first.promoted and first.champion_version is None
    assert registry.alias_version(uri, name, "champion") == versions[worst]
    # A better one takes the alias; both scores are recomputed, not read from tags.
    better = registry.promote_if_better(uri, name, versions[best], world["scorer"],
                                        platform=PLATFORM)
    assert better.promoted
    assert better.champion_score == pytest.approx(scores[worst])
    assert better.challenger_score == pytest.approx(scores[best])
    assert registry.alias_version(uri, name, "champion") == versions[best]
    assert registry.alias_version(uri, name, "previous_champion") == versions[worst]
    # A worse one does not, and carries both scores as tags.
    worse = registry.promote_if_better(uri, name, versions[worst], world["scorer"],
                                       platform=PLATFORM)
    assert not worse.promoted and worse.champion_version == versions[best]
    assert registry.alias_version(uri, name, "champion") == versions[best]
    tags = {v.version: v.tags for v in registry.list_versions(uri, name)}[versions[worst]]
    assert tags["role"] == "challenger"
    assert float(tags["challenger_valid_ndcg_at_10"]) == pytest.approx(scores[worst], abs=1e-6)
    assert float(tags["champion_valid_ndcg_at_10"]) == pytest.approx(scores[best], abs=1e-6)
    # By hand: promote the third version, then one rollback restores the previous champion.
    third = next(s for s in versions if s not in (worst, best))
    assert registry.promote(uri, name, versions[third]) == versions[best]
    assert registry.rollback(uri, name) == versions[best]
    assert registry.alias_version(uri, name, "champion") == versions[best]
    info = registry.describe(uri, name)
    assert info["champion"] == versions[best] and info["champion_history"] == [versions[worst]]
    # The champion alias resolves to a model that loads and recommends.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # MLflow 3 defaults the registry to a local sqlite file
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"platform": [PLATFORM], "history": [["i1", "i2"]],
                                      "k": [5]}))
    assert len(out["items"][0]) == 5


def test_different_catalog_is_not_compared(world, mlflow_server) -> None:
    uri, name = world["uri"], world["name"]
    other = _export(world["tmp"] / "other", world["es"], 5,
                    item_ids=[f"x{i}" for i in range(1, N + 1)])
    run_id = runs.start_run(uri, "registry-test", "other")
    model_uri = runs.log_pyfunc_model(uri, run_id, RecommenderPyfunc(),
                                      artifacts={"export": str(other)},
                                      pip_requirements=["torch", "mlflow"])
    version = runs.register_model(uri, model_uri, name)
    before = registry.alias_version(uri, name, "champion")
    d = registry.promote_if_better(uri, name, version, world["scorer"], platform=PLATFORM,
                                   challenger_export=other)
    assert not d.promoted and "another catalog" in d.reason
    assert registry.alias_version(uri, name, "champion") == before


def test_rollback_without_history_is_a_clear_error(world) -> None:
    uri = world["uri"]
    name = world["name"] + "-fresh"
    run_id = runs.start_run(uri, "registry-test", "fresh")
    model_uri = runs.log_pyfunc_model(uri, run_id, RecommenderPyfunc(),
                                      artifacts={"export": str(world["exports"][0])},
                                      pip_requirements=["torch", "mlflow"])
    version = runs.register_model(uri, model_uri, name)
    registry.promote(uri, name, version)
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(uri, name)
    with pytest.raises(registry.RegistryError, match="no registered model"):
        registry.list_versions(uri, name + "-missing")


def test_cli_list_show_promote_rollback(world) -> None:
    import subprocess
    import sys

    uri, name = world["uri"], world["name"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "recsys.cli", "registry", *args, "--name",
                               name, "--tracking-uri", uri], capture_output=True, text=True,
                              timeout=120, cwd=world["tmp"])

    champion = registry.alias_version(uri, name, "champion")
    other = next(v for v in world["versions"].values() if v != champion)
    r = cli("promote", "--version", other)
    assert r.returncode == 0, r.stderr
    assert f"@champion -> v{other} (was {champion})" in r.stdout
    r = cli("list")
    assert r.returncode == 0 and f"champion v{other}, previous v{champion}" in r.stdout
    r = cli("rollback")
    assert r.returncode == 0 and f"rolled back to v{champion}" in r.stdout
    r = cli("show", "--json")
    assert json.loads(r.stdout)["champion"] == champion
    assert not (world["tmp"] / "mlflow.db").exists()  # nothing resolved against a local store
