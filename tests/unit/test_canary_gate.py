"""The offline gate before a canary (``recsys.production.gate.offline_gate``), in a real MLflow
registry with real exports scored on the same validation data: the first version becomes
champion, a better one gets ``@canary`` (and keeps ``@challenger``) without taking
``@champion``, a worse one loses ``@challenger`` and gets no ``@canary``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from recsys.production.gate import offline_gate
from recsys.tracking import registry, runs
from recsys.tracking.challenger import CHALLENGER
from tests.unit.test_registry import PLATFORM, _example_set, _export


@pytest.fixture(scope="module")
def versions(mlflow_server, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("gate")
    es = _example_set(tmp / "examples")
    uri, name = mlflow_server.uri, f"recsys-gate-{uuid.uuid4().hex[:6]}"
    scorer = registry.valid_scorer(es, PLATFORM)
    out = {}
    for seed in range(3):
        export = _export(tmp / f"export{seed}", es, seed)
        run_id = runs.start_run(uri, "gate-test", f"m{seed}")
        model_uri = runs.log_recommender(uri, run_id, export, pip_requirements=["torch"])
        runs.end_run(uri, run_id)
        out[seed] = (runs.register_model(uri, model_uri, name), export, scorer(export))
    return uri, name, scorer, out


def test_the_gate_leaves_a_better_version_to_the_canary(versions) -> None:
    uri, name, scorer, out = versions
    order = sorted(out, key=lambda s: out[s][2])  # worst, middle, best by validation NDCG@10
    assert out[order[0]][2] < out[order[2]][2]

    def gate(seed: int) -> registry.Decision:
        version, export, _ = out[seed]
        registry.set_alias(uri, name, CHALLENGER, version)  # as register_challenger does
        return offline_gate(uri, name, version, scorer, platform=PLATFORM,
                            challenger_export=Path(export))

    first = gate(order[1])
    assert first.promoted and registry.alias_version(uri, name, "champion") == out[order[1]][0]
    better = gate(order[2])
    assert not better.promoted and better.extra["canary"] and "canary next" in better.reason
    assert registry.alias_version(uri, name, "champion") == out[order[1]][0]
    assert registry.alias_version(uri, name, "canary") == out[order[2]][0]
    assert registry.alias_version(uri, name, CHALLENGER) == out[order[2]][0]
    registry.set_alias(uri, name, "canary", out[order[2]][0])
    worse = gate(order[0])
    assert not worse.promoted and not worse.extra["canary"]
    assert "does not beat" in worse.reason
    assert registry.alias_version(uri, name, CHALLENGER) is None
    assert registry.alias_version(uri, name, "canary") == out[order[2]][0]  # untouched
    tags = {v.version: v.tags for v in registry.list_versions(uri, name)}
    assert tags[out[order[0]][0]]["role"] == "challenger"


def test_the_trigger_refits_one_platform_from_its_champion() -> None:
    from recsys.production.trigger import REFIT_STAGES, refit_config

    cfg = refit_config("configs/pipeline/demo.yaml", "shop_b",
                       {"registry.canary": {"feedback_dir": "runs/demo/feedback"}})
    assert cfg.active == REFIT_STAGES == ["ingest", "examples", "transfer", "register"]
    assert cfg.transfer is not None and cfg.transfer.targets == ["shop_b"]
    assert cfg.transfer.warm_start == "champion" and cfg.registry.canary is not None
    assert refit_config("configs/pipeline/demo.yaml", "shop_c").registry.canary is None
