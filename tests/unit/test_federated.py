"""Federated training without Ray: aggregation arithmetic (FedAvg, FedProx's server side,
FedAdam), client-level DP clipping and noise, the config's refusals, and the payload check: what
a client returns is walked byte by byte and must hold only float tensors of shared parameters."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from recsys.config import load_config
from recsys.federated.aggregate import (
    Server,
    client_dp_epsilon,
    clip_update,
    update_norm,
    weighted_mean,
)
from recsys.federated.config import FederatedConfig, FederatedJobConfig
from recsys.federated.payload import (
    PLATFORM_ROWS,
    densify,
    deserialize,
    inspect_payload,
    own_rows,
    payload_header,
    sent_shapes,
    serialize,
    shared_names,
)
from recsys.model.recommender import Recommender

REPO = Path(__file__).resolve().parents[2]


def _state(**values: list[float]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in values.items()}


def test_fedavg_is_the_row_weighted_mean() -> None:
    a, b = _state(w=[1.0, 0.0]), _state(w=[0.0, 3.0])
    mean = weighted_mean([a, b], [3, 1])
    assert torch.allclose(mean["w"], torch.tensor([0.75, 0.75]))
    server = Server(FederatedConfig(), {"w": torch.tensor([1.0, 1.0])})
    server.step([a, b], [3, 1])
    assert torch.allclose(server.weights["w"], torch.tensor([1.75, 1.75]))
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([a], [1, 2])


def test_platform_rows_come_from_their_owner_only() -> None:
    name = PLATFORM_ROWS[1]
    like = {name: torch.zeros(3, 2)}
    a = densify({name: torch.tensor([[1.0, 1.0]])}, 0, like)
    b = densify({name: torch.tensor([[2.0, 2.0]])}, 2, like)
    mean = weighted_mean([a, b], [1, 9])  # not diluted by the other client's weight
    assert torch.equal(mean[name], torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]))
    assert torch.equal(own_rows(mean, 2)[name], torch.tensor([[2.0, 2.0]]))


def test_fedprox_aggregates_like_fedavg() -> None:
    """FedProx changes the client's loss (the proximal term), not the server's mean."""
    ups = [_state(w=[1.0]), _state(w=[-1.0])]
    avg = Server(FederatedConfig(), {"w": torch.zeros(1)})
    prox = Server(FederatedConfig(algorithm="fedprox", proximal_mu=0.1), {"w": torch.zeros(1)})
    avg.step(ups, [1, 3])
    prox.step(ups, [1, 3])
    assert torch.equal(avg.weights["w"], prox.weights["w"])


def test_fedadam_first_steps_match_the_formula() -> None:
    cfg = FederatedConfig(algorithm="fedadam", server_lr=0.1, server_betas=(0.9, 0.99),
                          server_tau=1e-3)
    server = Server(cfg, {"w": torch.tensor([0.0])})
    server.step([_state(w=[2.0])], [1])
    m, v = 0.1 * 2.0, 0.01 * 4.0
    expected = 0.1 * m / (math.sqrt(v) + 1e-3)
    assert server.weights["w"].item() == pytest.approx(expected, rel=1e-5)
    server.step([_state(w=[2.0])], [1])
    m2, v2 = 0.9 * m + 0.2, 0.99 * v + 0.04
    assert server.weights["w"].item() == pytest.approx(
        expected + 0.1 * m2 / (math.sqrt(v2) + 1e-3), rel=1e-5)


def test_client_dp_clips_each_update_and_adds_noise_of_the_logged_std() -> None:
    big = _state(a=[3.0, 4.0], b=[0.0])  # norm 5
    clipped, norm = clip_update(big, 1.0)
    assert norm == pytest.approx(5.0) and update_norm(clipped) == pytest.approx(1.0)
    small, _ = clip_update(_state(a=[0.3, 0.4]), 1.0)
    assert torch.allclose(small["a"], torch.tensor([0.3, 0.4]))  # within the bound: unchanged
    cfg = FederatedConfig(client_dp={"enabled": True, "clip": 1.0, "noise_multiplier": 2.0})
    server = Server(cfg, {"w": torch.zeros(20000)},
                    generator=torch.Generator().manual_seed(0))
    ups = [{"w": torch.zeros(20000)} for _ in range(4)]
    stats = server.step(ups, [1, 1, 1, 1])
    assert stats["dp_noise_std"] == pytest.approx(2.0 * 1.0 / 4)
    assert float(server.weights["w"].std()) == pytest.approx(0.5, rel=0.05)
    # Equal weights under DP: a client with many rows weighs no more than one with few.
    server = Server(FederatedConfig(client_dp={"enabled": True, "noise_multiplier": 0.0}),
                    {"w": torch.zeros(1)})
    server.step([_state(w=[0.5]), _state(w=[-0.5])], [1000, 1])
    assert server.weights["w"].item() == pytest.approx(0.0)


def test_client_dp_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert math.isinf(client_dp_epsilon(0.0, 5, 1e-5))
    e5, e20 = client_dp_epsilon(2.0, 5, 1e-5), client_dp_epsilon(2.0, 20, 1e-5)
    assert 0 < e5 < e20
    assert client_dp_epsilon(4.0, 20, 1e-5) < e20


def _model() -> Recommender:
    return Recommender(text_dim=8, dim=8, num_platforms=3, num_brands=5, num_categories=6,
                       max_len=10, num_layers=1, num_heads=2, num_experts=2, repeat_bias=True)


def test_payload_holds_only_shared_float_tensors() -> None:
    state = _model().state_dict()
    delta = own_rows({k: torch.randn_like(state[k]) for k in shared_names(state)}, 1)
    payload = serialize(delta)
    allowed = sent_shapes(state)
    assert inspect_payload(payload, allowed) == []
    header = payload_header(payload)
    assert set(header) == set(allowed)  # no __metadata__, nothing but parameters
    assert all(e["dtype"] == "F32" for e in header.values())
    for name in PLATFORM_ROWS:
        assert header[name]["shape"][0] == 1  # the client's own platform row only
    back = deserialize(payload)
    assert torch.equal(back["ctr_head.linear.bias"], delta["ctr_head.linear.bias"])


def test_payload_check_refuses_ids_events_and_metadata() -> None:
    from safetensors.torch import save

    state = _model().state_dict()
    allowed = sent_shapes(state)
    ok = {k: torch.zeros(s) for k, s in allowed.items()}
    events = save({**ok, "history": torch.tensor([[3, 4, 5]])})
    problems = inspect_payload(events, allowed)
    assert any("'history' is not a shared parameter" in p for p in problems)
    assert any("dtype I64" in p for p in problems)
    tagged = save(ok, metadata={"user_id": "u_5f3a9c"})
    assert any("metadata" in p for p in inspect_payload(tagged, allowed))
    trailing = serialize(ok) + b"u_5f3a9c"
    assert any("beyond" in p for p in inspect_payload(trailing, allowed))
    wrong_row = dict(ok, **{PLATFORM_ROWS[0]: torch.zeros(3, 2)})  # every platform's rows
    assert any("shape" in p for p in inspect_payload(serialize(wrong_row), allowed))
    n = struct.unpack("<Q", serialize(ok)[:8])[0]
    assert json.loads(serialize(ok)[8:8 + n])  # a readable header, walked above


def test_config_refusals_and_shipped_yaml() -> None:
    with pytest.raises(ValueError, match="item_ids"):
        FederatedJobConfig(model={"item_ids": True}, platforms=["a", "b"])
    with pytest.raises(ValueError, match="proximal_mu > 0"):
        FederatedJobConfig(federated={"algorithm": "fedprox", "proximal_mu": 0.0})
    again = FederatedJobConfig(federated={"algorithm": "fedadam"})
    assert FederatedJobConfig.model_validate(again.model_dump(mode="json")) == again  # workers
    with pytest.raises(ValueError, match="at least two"):
        FederatedJobConfig(platforms=["a"])
    with pytest.raises(ValueError, match="extra"):
        FederatedJobConfig.model_validate({"federated": {"rounds": 2, "round": 3}})
    for path in sorted((REPO / "configs" / "federated").glob("*.yaml")):
        cfg = load_config(FederatedJobConfig, path)
        assert cfg.train_config().mode == "pretrain"


def test_pipeline_pretrain_stage_is_federated_only_when_enabled(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from recsys.pipeline.config import PipelineConfig
    from recsys.pipeline.context import Context
    from recsys.pipeline.stages import federated as federated_stage
    from recsys.pipeline.stages import train as train_stage
    from recsys.pipeline.state import PipelineState

    demo = REPO / "configs" / "pipeline" / "demo.yaml"
    assert not load_config(PipelineConfig, demo).federated.enabled  # the demo is unchanged
    calls: list[list[str]] = []
    monkeypatch.setattr(federated_stage, "federated_pretrain",
                        lambda ctx, platforms: calls.append(platforms) or "recorded")
    cfg = load_config(PipelineConfig, demo, ["federated.enabled=true", f"work_dir={tmp_path}"])
    ctx = Context(cfg, PipelineState(tmp_path / "pipeline"))
    train_stage.stage_pretrain(ctx)
    assert calls == [["shop_a", "shop_b"]] and ctx.result.pretrain == "recorded"
