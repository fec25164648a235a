"""Champion/challenger on a real MLflow server (no Ray): tiny exports with random weights, scored
by the real validation evaluation on a hand-written example set, registered as pyfunc versions.

Which random model scores higher is not known in advance; the tests compute both scores and check
that the registry acts on them (promote the better one, tag the worse one, roll back)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

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
from recsys.model.recommender import Recommender
from recsys.tracking import champion_lock, registry, runs
from recsys.tracking.challenger import CHALLENGER, register_challenger
from recsys.tracking.model_card import CARD_MARK

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


def _export(root: Path, es: ExampleSet, seed: int, item_ids: list[str] | None = None,
            metrics: dict[str, float] | None = None) -> Path:
    torch.manual_seed(seed)
    model = Recommender(text_dim=H, dim=16, num_platforms=1, num_brands=2, num_categories=2,
                        max_len=MAX_LEN, num_layers=1, num_heads=2, dropout=0.0, num_experts=1)
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(N + 1, H)).astype(np.float32)
    vecs[0] = 0
    cats = np.zeros((N + 1, 3), np.int64)
    items = {PLATFORM: ExportedItems(PLATFORM, 0, item_ids or [f"i{i}" for i in range(1, N + 1)],
                                     np.r_[0, np.ones(N, np.int64)], cats, vecs)}
    meta = {"platforms": [PLATFORM], "platforms_with_items": [PLATFORM],
            "metrics": metrics or {}}
    return save_export(root, model, model.state_dict(), meta, items,
                       {PLATFORM: es.path / "catalog" / f"{PLATFORM}.parquet"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, mlflow_server):
    """Three registered versions of one model (random weights, seeds 0-2) and a scorer."""
    tmp = tmp_path_factory.mktemp("registry")
    es = _example_set(tmp / "examples")
    uri, name = mlflow_server.uri, f"recsys-test-{tmp.name}"
    exports, versions, model_uris = {}, {}, {}
    for seed in range(3):
        exports[seed] = _export(tmp / f"export{seed}", es, seed)
        run_id = runs.start_run(uri, "registry-test", f"m{seed}")
        model_uri = runs.log_recommender(uri, run_id, exports[seed],
                                          pip_requirements=["torch", "mlflow"])
        versions[seed] = runs.register_model(uri, model_uri, name, tags={"seed": seed})
        model_uris[seed] = model_uri
        runs.end_run(uri, run_id)
    scorer = registry.valid_scorer(es, PLATFORM)
    scores = {seed: scorer(exports[seed]) for seed in exports}
    return {"uri": uri, "name": name, "es": es, "exports": exports, "versions": versions,
            "scorer": scorer, "scores": scores, "tmp": tmp, "model_uris": model_uris,
            "server_root": mlflow_server.root}


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
    model_uri = runs.log_recommender(uri, run_id, other,
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
    model_uri = runs.log_recommender(uri, run_id, world["exports"][0],
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


# --- integrity (issue 20): compare-and-set moves of @champion, refused versions ---------------


def _fresh_model(world, label: str, n: int) -> tuple[str, list[str]]:
    """A registered model of its own (history starts empty) with ``n`` versions: the world's
    three logged models in turn."""
    name = f"{world['name']}-{label}"
    return name, [runs.register_model(world["uri"], world["model_uris"][i % 3], name)
                  for i in range(n)]


def _seed_of(world) -> Callable[[Path], int]:
    """Which of the world's exports an export (downloaded or not) is: by its weights."""
    def digest(export: Path) -> str:
        return hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()

    seeds = {digest(e): seed for seed, e in world["exports"].items()}
    return lambda export: seeds[digest(Path(export))]


def test_a_champion_that_moved_while_scoring_is_scored_again(world) -> None:
    """Another writer moves @champion while the challenger is compared with the old champion:
    the decision is not written against a champion that is gone, the new one is scored."""
    uri = world["uri"]
    name, (v0, v1, v2) = _fresh_model(world, "moved", 3)
    registry.promote(uri, name, v0)
    seed_of, scored = _seed_of(world), []

    def score(export: Path) -> float:
        seed = seed_of(export)
        scored.append(seed)
        if len(scored) == 2:  # scoring champion v0 while someone promotes v1 by hand
            registry.promote(uri, name, v1, reason="a concurrent writer")
        return {0: 0.5, 1: 0.9, 2: 0.7}[seed]

    d = registry.promote_if_better(uri, name, v2, score, platform=PLATFORM)
    assert scored == [2, 0, 1]
    # 0.7 beat v0 (0.5), but v0 was no longer the champion: compared with v1 (0.9) instead.
    assert not d.promoted and d.champion_version == v1 and d.champion_score == 0.9
    assert d.extra["attempts"] == 2
    assert registry.champion_state(uri, name) == registry.ChampionState(v1, [v0], 2)


def test_concurrent_promoters_keep_one_history(world) -> None:
    """Two threads run promote_if_better against one registered model over and over (random
    scores, random pauses while scoring). Replayed in generation order, the moves form one
    chain: no generation taken twice or skipped, each decision taken against the champion of its
    generation, and the history tag is exactly that chain."""
    uri = world["uri"]
    name, versions = _fresh_model(world, "race", 6)
    export_of = {v: world["exports"][i % 3] for i, v in enumerate(versions)}

    def promoter(seed: int) -> list[registry.Decision]:
        rng = random.Random(seed)

        def score(export: Path) -> float:
            time.sleep(rng.uniform(0, 0.05))  # the window in which the other thread writes
            return rng.random()

        out = []
        for _ in range(12):
            v = rng.choice(versions)
            out.append(registry.promote_if_better(uri, name, v, score, platform=PLATFORM,
                                                  challenger_export=export_of[v]))
        return out

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        decisions = [d for ds in pool.map(promoter, [1, 2]) for d in ds]
    moves = sorted((d for d in decisions if d.extra["moved"]),
                   key=lambda d: d.extra["generation"])
    assert [d.extra["generation"] for d in moves] == list(range(len(moves)))
    champion, history, champion_at = None, [], {0: None}
    for g, d in enumerate(moves):
        assert d.champion_version == champion, d
        if champion is not None:
            history.append(champion)
        champion = champion_at[g + 1] = d.version
    for d in decisions:
        assert champion_at[d.extra["generation"]] == d.champion_version, d
    assert registry.champion_state(uri, name) == registry.ChampionState(
        champion, history, len(moves))
    assert registry.alias_version(uri, name, "previous_champion") == history[-1]
    retried = sum(d.extra["attempts"] > 1 for d in decisions)
    print(f"\n{len(decisions)} decisions, {len(moves)} moves, {retried} compared again, "
          f"{time.monotonic() - started:.1f} s")
    assert len(moves) >= 4


def test_concurrent_rollbacks_and_promotions_each_take_one_step(world) -> None:
    """Started together, two rollbacks go back two steps (not both to the same version), and two
    promotions both land on the history, in one order or the other."""
    uri = world["uri"]
    name, vs = _fresh_model(world, "rollback", 6)
    for v in vs[:5]:
        registry.promote(uri, name, v)
    start = threading.Barrier(2)

    def together(fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        def call(arg: Any) -> Any:
            start.wait()
            return fn(arg)

        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(call, args))

    back = together(lambda _: registry.rollback(uri, name), [0, 1])
    assert sorted(back) == sorted([vs[3], vs[2]])
    assert registry.champion_state(uri, name) == registry.ChampionState(vs[2], vs[:2], 7)
    previous = together(lambda v: registry.promote(uri, name, v), [vs[0], vs[5]])
    state = registry.champion_state(uri, name)
    assert state.generation == 9 and state.champion in (vs[0], vs[5])
    first = vs[5] if state.champion == vs[0] else vs[0]
    assert state.history == [*vs[:2], vs[2], first]
    assert sorted(previous) == sorted([vs[2], first])


def test_a_lock_left_by_a_crash_is_broken_after_its_lease(world) -> None:
    uri = world["uri"]
    name, (v0,) = _fresh_model(world, "stale", 1)
    c = MlflowClient(uri)
    lock = champion_lock.lock_name(name)
    c.create_registered_model(lock, tags={"lock_token": "dead", "lock_holder": "crashed:1",
                                          "lock_expires": f"{time.time() + 2:.3f}"})
    with pytest.raises(registry.RegistryError, match="held by crashed:1"):
        with champion_lock.champion_lock(uri, name, wait_s=0.3):
            pass
    started = time.monotonic()
    registry.promote(uri, name, v0)  # waits out the lease, then breaks the lock
    assert 0.5 < time.monotonic() - started < 15
    assert registry.alias_version(uri, name, "champion") == v0
    left = {m.name for m in c.search_registered_models(f"name LIKE '{name}%'")}
    assert left == {name}, "the lock (or a renamed stale one) was left behind"


@pytest.mark.parametrize("attack", ["truncated_weights", "pickled_ids", "path_escape"])
def test_a_broken_or_poisoned_version_is_refused(world, tmp_path: Path, attack: str) -> None:
    """A registered version whose export is truncated, holds a pickle, or whose MLmodel points
    outside its own directory: refused and tagged, never promoted (the champion stays)."""
    from recsys.model.pyfunc import CODE_FILE

    uri = world["uri"]
    name, (good,) = _fresh_model(world, f"refused-{attack}", 1)
    registry.promote(uri, name, good)
    export = Path(shutil.copytree(world["exports"][1], tmp_path / "export"))
    if attack == "truncated_weights":
        weights = export / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif attack == "pickled_ids":  # an old-style .npz with an object array, not the JSON ids
        ids = json.loads((export / "items" / f"{PLATFORM}.json").read_text())["item_ids"]
        np.savez(export / "items" / f"{PLATFORM}.npz", item_ids=np.asarray(ids, dtype=object))
        (export / "items" / f"{PLATFORM}.json").unlink()
    run_id = runs.start_run(uri, "registry-test", f"tampered-{attack}")
    model_uri = runs.log_pyfunc_model(uri, run_id, CODE_FILE, artifacts={"export": str(export)},
                                      pip_requirements=["torch", "mlflow"])
    runs.end_run(uri, run_id)
    version = runs.register_model(uri, model_uri, name)
    if attack == "path_escape":  # the stored MLmodel edited to send the export elsewhere
        source = MlflowClient(uri).get_model_version_download_uri(name, version)
        mlmodel = (world["server_root"] / "artifacts"
                   / source.removeprefix("mlflow-artifacts:/") / "MLmodel")
        text = mlmodel.read_text()
        assert "artifacts/export" in text
        mlmodel.write_text(text.replace("artifacts/export", "../../../../outside"))
    d = registry.promote_if_better(uri, name, version, world["scorer"], platform=PLATFORM)
    assert not d.promoted and d.extra == {"rejected": True}, d
    assert "refused" in d.reason and d.challenger_score is None and d.champion_version == good
    assert registry.alias_version(uri, name, "champion") == good
    tags = MlflowClient(uri).get_model_version(name, version).tags
    assert tags["role"] == "rejected" and tags["decision"] == d.reason
    print(f"\n{attack}: {d.reason}")


def _trained_challenger(world, name: str, seed: int, tmp: Path) -> tuple[str, str]:
    """A run with two epochs (the second one best), its export of epoch 1, the model logged at
    that epoch with test metrics, registered through ``register_challenger``."""
    uri = world["uri"]
    run_id = runs.start_run(uri, "registry-test", f"trained{seed}")
    for epoch, ndcg in ((0, 0.1), (1, 0.3)):
        runs.log_metrics(uri, run_id, {"valid_ndcg@10": ndcg, "train_loss": 2.0 - epoch},
                         step=epoch)
    export = _export(tmp / f"trained{seed}", world["es"], seed,
                     metrics={"epoch": 1, "valid_ndcg@10": 0.3})
    model_uri = runs.log_recommender(uri, run_id, export, pip_requirements=["torch", "mlflow"])
    runs.log_metrics(uri, run_id, {f"test_ndcg@10/{PLATFORM}": 0.25}, step=2,
                     model_id=runs.logged_model_id(model_uri))
    runs.end_run(uri, run_id)
    return register_challenger(uri, model_uri, name, export, platform=PLATFORM), str(export)


def test_a_registered_version_carries_its_best_epoch_test_metrics_and_card(world) -> None:
    """The LoggedModel has epoch 1's metrics (the exported one), not epoch 0's; the version has
    a description with them and its test metrics as tags; the registered model a description."""
    uri, name = world["uri"], f"{world['name']}-card"
    version, _ = _trained_challenger(world, name, 0, world["tmp"] / "card")
    c = MlflowClient(uri)
    mv = c.get_model_version(name, version)
    model = c.get_logged_model(runs.logged_model_id(str(mv.source)))
    by_key = {m.key: m for m in model.metrics}
    assert by_key["valid_ndcg_at_10"].value == pytest.approx(0.3)
    assert by_key["valid_ndcg_at_10"].step == 1 and by_key["train_loss"].value == 1.0
    assert by_key[f"test_ndcg_at_10/{PLATFORM}"].value == pytest.approx(0.25)
    assert mv.tags[f"test_ndcg_at_10/{PLATFORM}"] == "0.250000"
    assert mv.tags["best_epoch"] == "1"
    assert mv.description.startswith(CARD_MARK)
    assert f"test_ndcg_at_10/{PLATFORM}` | 0.2500" in mv.description
    assert "best epoch (1)" in mv.description
    described = c.get_registered_model(name).description
    assert described.startswith(CARD_MARK) and "@challenger" in described
    # A description someone wrote by hand is kept.
    c.update_registered_model(name, description="written by hand")
    _trained_challenger(world, name, 1, world["tmp"] / "card")
    assert c.get_registered_model(name).description == "written by hand"


def test_challenger_alias_lifecycle(world) -> None:
    """@challenger points at a version from registration until the gate decides: removed when
    it is promoted or beaten; a decision on an older version leaves a newer challenger alone."""
    uri, name, scorer = world["uri"], f"{world['name']}-alias", world["scorer"]
    tmp = world["tmp"] / "alias"
    first, first_export = _trained_challenger(world, name, 0, tmp)
    assert registry.alias_version(uri, name, CHALLENGER) == first
    d = registry.promote_if_better(uri, name, first, scorer, platform=PLATFORM,
                                   challenger_export=Path(first_export))
    assert d.promoted and registry.alias_version(uri, name, CHALLENGER) is None
    assert registry.describe(uri, name)["challenger"] is None
    # Two challengers registered at once: deciding the older one keeps the newer one's alias.
    older, _ = _trained_challenger(world, name, 1, tmp)
    newer, _ = _trained_challenger(world, name, 2, tmp)
    assert registry.alias_version(uri, name, CHALLENGER) == newer
    registry.promote_if_better(uri, name, older, scorer, platform=PLATFORM)
    assert registry.alias_version(uri, name, CHALLENGER) == newer
    # The newer one: promoted or beaten, either way no longer a challenger.
    registry.promote_if_better(uri, name, newer, scorer, platform=PLATFORM)
    assert registry.alias_version(uri, name, CHALLENGER) is None
    # Promoted by hand: the alias goes too.
    manual, _ = _trained_challenger(world, name, 3, tmp)
    registry.promote(uri, name, manual, reason="test")
    assert registry.alias_version(uri, name, CHALLENGER) is None
