"""Federated pretraining on real local Ray: two rounds over two synthetic shops as client
actors, a loadable export that transfer can start from, and what the server receives from a
client inspected byte by byte (model-update tensors only: no user id, pseudonymous or raw, no
event)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from recsys.data.examples import read_split
from recsys.federated.config import FederatedJobConfig
from recsys.federated.payload import inspect_payload, payload_header, sent_shapes, serialize

CLIENTS = ["shop_a", "shop_b"]


def _cfg(examples: Any, tmp: Path, **federated: Any) -> FederatedJobConfig:
    return FederatedJobConfig.model_validate({
        "name": "fed", "platforms": CLIENTS,
        "data": {"examples": str(examples.path), "sequences": {"max_seq_len": 20},
                 "text": examples.manifest.config.text.model_dump(mode="json")},
        "model": {"dim": 16, "num_layers": 1, "num_heads": 2, "num_experts": 2},
        "optim": {"micro_batch_size": 128, "lr": 0.003},
        "encoder": {"cache_dir": str(tmp / "cache")},
        "federated": {"rounds": 2, "local_epochs": 1, "cpus_per_client": 0.5, **federated},
        "tracking": {"enabled": False}, "output_dir": str(tmp / "runs")})


@pytest.fixture(scope="module")
def federated(ray_cluster, synthetic_examples, tmp_path_factory: pytest.TempPathFactory):
    from recsys.federated.server import run_federated

    tmp = tmp_path_factory.mktemp("federated")
    return run_federated(_cfg(synthetic_examples, tmp, algorithm="fedprox", proximal_mu=0.01))


def test_two_rounds_give_a_loadable_pretrain_export(federated) -> None:
    from recsys.model.export import load_export, read_meta
    from recsys.training.trainer import load_init

    assert [int(m["round"]) for m in federated.rounds] == [0, 1]
    for m in federated.rounds:
        assert m["bytes_up"] > 0 and m["bytes_down"] > 0
        assert m["train_loss"] == m["train_loss"]  # finite, not NaN
        assert 0 <= m["valid_ndcg@10"] <= 1
    assert federated.bytes_up_per_round == pytest.approx(
        sum(m["bytes_up"] for m in federated.rounds) / 2)
    exported = load_export(federated.export_dir)
    assert exported.platforms == CLIENTS
    meta = read_meta(federated.export_dir)
    assert meta.mode == "pretrain" and meta.strategy == "federated_fedprox"
    init = load_init(federated.export_dir)  # what transfer.init_from reads
    assert set(init["state_dict"]) == set(exported.model.state_dict())
    assert set(federated.report.platforms) == set(CLIENTS)
    for res in federated.report.platforms.values():
        assert 0 <= res.metrics["ndcg@10"] <= 1


def test_server_receives_model_updates_only(ray_cluster, synthetic_examples,
                                            tmp_path: Path) -> None:
    """Ask a real client actor for an update, as the server does, and walk what arrives."""
    import ray

    from recsys.federated.export import catalog_inputs
    from recsys.federated.server import client_platforms, start_clients
    from recsys.training.model_setup import build_model

    cfg = _cfg(synthetic_examples, tmp_path, client_dp={"enabled": True, "clip": 0.5})
    platforms = client_platforms(cfg, synthetic_examples)
    inputs = catalog_inputs(synthetic_examples, platforms, cfg)
    state = build_model(cfg.train_config(), inputs, None, platforms).state_dict()
    allowed = sent_shapes(state)
    clients = start_clients(cfg, platforms, inputs.vocab.to_dict())
    try:
        update = ray.get(clients["shop_b"].fit.remote(
            serialize({k: state[k] for k in allowed}), 0))
    finally:
        for c in clients.values():
            ray.kill(c)
    # The returned object: the payload bytes and four numbers, nothing else.
    fields = dataclasses.asdict(update)
    assert set(fields) == {"payload", "num_rows", "train_loss", "steps", "seconds"}
    assert all(isinstance(v, (int, float)) for k, v in fields.items() if k != "payload")
    payload = update.payload
    assert inspect_payload(payload, allowed) == []
    assert set(payload_header(payload)) <= set(allowed)
    # No pseudonymous user id anywhere in the bytes (header or data), nor a raw one: the
    # lake's ids are the pseudonyms; raw ids never reach the example set.
    train = read_split(synthetic_examples, "train")
    users = set(train.filter(pc.equal(train["platform"], "shop_b"))["user_id"].to_pylist())
    assert users
    assert not [u for u in users if u.encode() in payload]
    # No event: every tensor is a float parameter delta, clipped to the DP bound.
    from recsys.federated.aggregate import update_norm
    from recsys.federated.payload import deserialize

    delta = deserialize(payload)
    assert all(v.is_floating_point() for v in delta.values())
    assert update_norm(delta) <= 0.5 + 1e-4
