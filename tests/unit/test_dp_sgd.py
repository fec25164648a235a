"""User-level DP-SGD (``recsys.training.privacy``, ``recsys.training.dp_engine``): the
accountant, the refusals, per-user clipping and Poisson sampling, on a tiny model, without Ray."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from recsys.config import ConfigError, load_config
from recsys.model.export import ExportInfo, PrivacyCard, read_meta, save_export
from recsys.model.features import FeatureVocab
from recsys.model.recommender import Recommender
from recsys.training.config import TrainJobConfig
from recsys.training.dp_engine import DPEngine, PrivacyPlan
from recsys.training.engine import TrainState
from recsys.training.items import ItemInputs, PlatformItems
from recsys.training.model_setup import build_model
from recsys.training.objective import PlatformTensors, RecommenderObjective
from recsys.training.privacy import (
    PerUserLoss,
    PrivacyError,
    UserRows,
    check_per_user_model,
    check_private_setup,
    noise_for_budget,
    per_user_gradients,
    poisson_sample,
    spent_epsilon,
    steps_per_epoch,
    trainable,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N = 15  # catalog size
H = 8
PRIVATE = ["mode=transfer", "transfer.init_from=x", "transfer.strategy=user_tower",
           "scaling.num_workers=1", "privacy.enabled=true", "privacy.noise_multiplier=1.0",
           "privacy.expected_users_per_step=4", "model.dim=16", "model.num_heads=2",
           "model.num_layers=1", "model.num_experts=2", "model.dropout=0.0",
           "data.sequences.max_seq_len=6", "loss.ctr_weight=0.0"]


def private_config(*extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, PRIVATE + list(extra))


def inputs() -> ItemInputs:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N + 1, H)).astype(np.float32)
    vecs[0] = 0
    vocab = FeatureVocab(brands={"a": 1}, categories={"c": 1})
    items = PlatformItems(name="shop", platform_id=0, brand_ids=np.zeros(N + 1, np.int64),
                          category_ids=np.zeros((N + 1, 1), np.int64), text_vecs=vecs,
                          token_ids=None, popularity=np.ones(N + 1))
    return ItemInputs(platforms=["shop"], vocab=vocab, items={"shop": items})


def user_rows() -> UserRows:
    """Five users; "heavy" has four rows (``train_windows``), the others one each."""
    rng = np.random.default_rng(1)
    users, hists, targets = [], [], []
    for u, rows in (("heavy", 4), ("b", 1), ("c", 1), ("d", 1), ("e", 1)):
        for _ in range(rows):
            users.append(u)
            hists.append(rng.integers(1, N + 1, rng.integers(1, 7)))
            targets.append(int(rng.integers(1, N + 1)))
    return UserRows.from_columns(users, hists, targets)


def engine(*extra: str) -> DPEngine:
    torch.manual_seed(0)
    cfg = private_config(*extra)
    it = inputs()
    model = _model(cfg, it)
    tensors = {0: PlatformTensors.from_items(it.items["shop"], torch.device("cpu"))}
    return DPEngine(RecommenderObjective(model, cfg.loss, tensors), cfg, user_rows(), 0)


def _model(cfg: TrainJobConfig, it: ItemInputs) -> Recommender:
    """A transfer model as ``build_model`` makes it from a pretrained export (user_tower)."""
    from recsys.training.model_setup import model_kwargs

    pre = Recommender(**model_kwargs(cfg, it, H, 1))
    init = {"config": pre.config, "state_dict": pre.state_dict()}
    return build_model(cfg, it, init, ["shop"])


def objective_grads(e: DPEngine, user: int) -> dict[str, torch.Tensor]:
    """The non-private objective's gradient on one user's rows alone."""
    e.module.zero_grad()
    hist, target = next(e.rows.chunks(np.array([user]), 1, 6))
    h, t = hist[0], target[0]
    keep = (h > 0).any(1)
    loss, _ = e.module(h[keep], t[keep], torch.zeros(int(keep.sum()), dtype=torch.long))
    loss.backward()
    return {f"model.{n}": torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in e.module.model.named_parameters() if p.requires_grad}


# -- per-user gradients and clipping ---------------------------------------------------------


def test_per_user_gradient_is_the_objective_gradient_on_that_users_rows() -> None:
    e = engine()
    users = np.arange(e.rows.num_users)
    hist, target = next(e.rows.chunks(users, 10, 6))
    order = users[np.argsort(e.rows.longest, kind="stable")]
    table = e.platform.item_table(e.loss.model).detach()
    grads, losses = per_user_gradients(e.loss, trainable(e.loss), hist, target,
                                       torch.ones_like(hist), table, torch.tensor(0))
    assert losses.shape == (5,) and torch.isfinite(losses).all()
    for i, u in enumerate(order):
        want = objective_grads(e, int(u))
        for name, g in want.items():
            torch.testing.assert_close(grads[name][i], g, rtol=1e-4, atol=1e-6)


def test_no_noise_and_no_clip_is_the_non_private_gradient() -> None:
    e = engine()
    e.optimizer.noise_multiplier = 0.0
    e.optimizer.max_grad_norm = 1e12  # no clip (0 * inf would be NaN noise)
    users = np.arange(e.rows.num_users)
    want = {n: sum(objective_grads(e, int(u))[n] for u in users) for n in e.names}
    e.private_step(users)
    expected_users = e.plan.sample_rate * e.rows.num_users
    for name, p in e.names.items():
        torch.testing.assert_close(p.grad * expected_users, want[name], rtol=1e-4, atol=1e-6)


def test_a_user_with_many_rows_contributes_at_most_max_grad_norm() -> None:
    e = engine()
    heavy = int(np.argmax([len(r) for r in e.rows.rows]))
    assert len(e.rows.rows[heavy]) == 4
    raw = torch.sqrt(sum((g ** 2).sum() for g in objective_grads(e, heavy).values()))
    clip = float(raw) / 10  # the clip binds
    e.optimizer.noise_multiplier = 0.0
    e.optimizer.max_grad_norm = clip
    e.private_step(np.array([heavy]))
    contributed = torch.sqrt(sum((p.grad ** 2).sum() for p in e.names.values()))
    assert float(contributed) * e.plan.sample_rate * e.rows.num_users == pytest.approx(
        clip, rel=1e-4)


def test_noise_has_the_configured_std_even_on_an_empty_step() -> None:
    e = engine("privacy.noise_multiplier=2.0", "privacy.max_grad_norm=0.5")
    e.private_step(np.array([], dtype=np.int64))
    noise = torch.cat([p.grad.flatten() for p in e.names.values()])
    expected_users = e.plan.sample_rate * e.rows.num_users
    assert float(noise.std() * expected_users) == pytest.approx(2.0 * 0.5, rel=0.1)
    assert e.steps == 1


def test_users_rows_are_grouped_and_padded() -> None:
    rows = user_rows()
    assert rows.num_users == 5 and rows.num_rows == 8
    assert sorted(len(r) for r in rows.rows) == [1, 1, 1, 1, 4]
    chunks = list(rows.chunks(np.arange(5), 2, 6))
    assert [h.shape[0] for h, _ in chunks] == [2, 2, 1]
    for hist, target in chunks:
        assert hist.shape[:2] == target.shape and hist.shape[2] <= 6
        # a padding row has no target and no history
        assert ((target == 0) == (hist == 0).all(-1)).all()


# -- Poisson sampling ------------------------------------------------------------------------


def test_poisson_sampling_statistics() -> None:
    rng = np.random.default_rng(0)
    n, q, draws = 2000, 0.05, 400
    masks = np.zeros((draws, n), bool)
    for i in range(draws):
        masks[i, poisson_sample(n, q, rng)] = True
    sizes = masks.sum(1)
    assert sizes.mean() == pytest.approx(n * q, rel=0.02)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.2)  # the size varies
    per_user = masks.mean(0)  # every user alike
    assert abs(per_user.mean() - q) < 0.002 and per_user.std() < 0.02
    both = (masks[:, 0::2] & masks[:, 1::2]).mean()  # pairs drawn independently
    assert both == pytest.approx(q * q, rel=0.15)
    assert steps_per_epoch(q) == 20 and steps_per_epoch(1.0) == 1


# -- the accountant --------------------------------------------------------------------------


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang, 2018):
    the root of delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return (lo + hi) / 2


def test_epsilon_decreases_as_noise_grows() -> None:
    eps = [spent_epsilon(s, 0.01, 1000, 1e-5) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(eps, eps[1:], strict=False))
    assert spent_epsilon(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_matches_opacus_accountant_stepped(mechanism: str) -> None:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    for _ in range(300):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    assert spent_epsilon(1.1, 0.02, 300, 1e-5, mechanism) == pytest.approx(
        acc.get_epsilon(delta=1e-5), rel=1e-6)


def test_known_value_without_subsampling() -> None:
    """q = 1: T steps at noise sigma are one Gaussian mechanism with mu = sqrt(T) / sigma,
    whose exact epsilon is known; PRV finds it, RDP bounds it from above."""
    sigma, steps, delta = 2.0, 16, 1e-5
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    assert exact == pytest.approx(10.0, abs=0.01)  # delta(10) = Phi(-4) - e^10 Phi(-6)
    assert spent_epsilon(sigma, 1.0, steps, delta, "prv") == pytest.approx(exact, rel=0.02)
    rdp = spent_epsilon(sigma, 1.0, steps, delta, "rdp")
    assert exact <= rdp <= exact * 1.15


def test_noise_for_a_budget_spends_it() -> None:
    sigma = noise_for_budget(4.0, 1e-4, 0.05, 200)
    assert spent_epsilon(sigma, 0.05, 200, 1e-4) == pytest.approx(4.0, abs=0.02)
    assert noise_for_budget(1.0, 1e-4, 0.05, 200) > sigma


def test_plan_resolves_delta_rate_and_noise_from_users() -> None:
    cfg = private_config("privacy.noise_multiplier=null", "privacy.target_epsilon=8",
                         "optim.epochs=3")
    plan = PrivacyPlan.resolve(cfg, users=400)
    assert plan.delta == 1 / 400 and plan.sample_rate == 4 / 400
    assert plan.steps_per_epoch == 100
    assert plan.epsilon(3 * 100) == pytest.approx(8.0, abs=0.02)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, why", [
    (["scaling.engine=deepspeed"], "ZeRO partitions"),
    (["scaling.num_workers=2"], "workers split rows, not users"),
    (["privacy.sampling=shuffle"], "Poisson"),
    (["optim.grad_accum=2"], "one Poisson draw"),
    (["transfer.strategy=freeze_encoder"], "item tower"),
    (["transfer.strategy=adapter_only"], "item tower"),
    (["mode=pretrain", "transfer.strategy=full"], "mode=transfer"),
    (["privacy.target_epsilon=8"], "exactly one of privacy.target_epsilon"),
    (["privacy.noise_multiplier=null"], "exactly one of privacy.target_epsilon"),
    (["privacy.sample_rate=0.1"], "exactly one of privacy.sample_rate"),
    (["train_platforms=[a,b]"], "exactly one platform"),
])
def test_configs_that_would_not_hold_the_guarantee_are_refused(overrides: list[str],
                                                               why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        private_config(*overrides)


def test_privacy_off_refuses_nothing() -> None:
    load_config(TrainJobConfig, None, ["scaling.engine=deepspeed", "privacy.sampling=shuffle"])


def test_trainable_item_tower_is_refused() -> None:
    model = _model(private_config(), inputs())
    check_per_user_model(model)  # user_tower: fine
    model.item_tower.adapter.requires_grad_(True)
    with pytest.raises(PrivacyError, match="outside the per-user computation.*item_tower"):
        check_per_user_model(model)


def test_batch_norm_is_refused() -> None:
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user_tower = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    with pytest.raises(PrivacyError, match="batch-norm layers"):
        check_per_user_model(Tower())


def test_several_platforms_or_cross_platform_histories_are_refused() -> None:
    with pytest.raises(PrivacyError, match="one platform"):
        check_private_setup(["a", "b"], cross_platform=False)
    with pytest.raises(PrivacyError, match="cross-platform"):
        check_private_setup(["a"], cross_platform=True)


# -- checkpoint and export -------------------------------------------------------------------


def test_checkpoint_keeps_the_count_of_steps(tmp_path: Path) -> None:
    e = engine()
    for _ in range(3):
        e.private_step(np.arange(2))
    state = TrainState(epoch=0)
    assert e.save(tmp_path, state, rank=0)
    assert TrainState.read(tmp_path).privacy["steps"] == 3
    fresh = engine()
    fresh.load(tmp_path)
    assert fresh.steps == 3
    assert fresh.privacy_metrics()["privacy_epsilon"] == pytest.approx(e.plan.epsilon(3))


def test_export_carries_the_privacy_card(tmp_path: Path) -> None:
    e = engine()
    e.private_step(np.arange(3))
    card = PrivacyCard.model_validate(e.plan.card(e.steps))
    model = e.module.model
    out = save_export(tmp_path / "export", model, model.state_dict(),
                      ExportInfo(platforms=["shop"], platforms_with_items=[], privacy=card),
                      {}, {})
    meta = read_meta(out)
    assert meta.privacy == card and meta.privacy.unit == "user"
    assert meta.privacy.epsilon == pytest.approx(e.plan.epsilon(1))


def test_per_user_loss_ignores_empty_rows() -> None:
    e = engine()
    loss = PerUserLoss(e.loss.model, 0.07, 0.1)
    table = e.platform.item_table(loss.model).detach()
    hist = torch.tensor([[0, 0, 3, 4], [0, 0, 0, 0]])
    value = loss(hist, torch.tensor([5, 0]), torch.ones_like(hist), table, torch.tensor(0))
    alone = loss(hist[:1], torch.tensor([5]), torch.ones_like(hist[:1]), table, torch.tensor(0))
    torch.testing.assert_close(value, alone)


def test_rank_zero_logs_the_mechanism_and_each_epochs_epsilon(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    from types import SimpleNamespace

    import recsys.tracking.runs as runs
    from recsys.training import loop

    e = engine()
    e.private_step(np.arange(2))
    logged: dict[str, object] = {}
    monkeypatch.setattr(runs, "log_params", lambda uri, run, params: logged.update(params))
    monkeypatch.setattr(runs, "log_metrics",
                        lambda uri, run, metrics, step: logged.update(metrics))
    monkeypatch.setattr(sys, "__stdout__", sys.stdout)
    w = SimpleNamespace(engine=e, cfg=e.cfg, tracking=runs.RunRef("uri", "run"), rank=0,
                        device=torch.device("cpu"), setup_seconds=0.0,
                        state=TrainState())
    loop.log_start(w)
    assert logged["privacy.noise_multiplier"] == 1.0 and logged["privacy.users"] == 5
    trained = loop.EpochTraining(losses=[1.0], sequences=3, seconds=1.0, skipped_steps=0)
    metrics = loop.epoch_metrics(w, 0, trained, {"valid_ndcg@10": 0.1}, 0.0)
    loop.log_epoch(w, 0, metrics)
    for key in ("privacy_epsilon", "privacy_delta", "privacy_noise_multiplier",
                "privacy_max_grad_norm", "privacy_sample_rate"):
        assert key in logged
    assert logged["privacy_epsilon"] == pytest.approx(e.plan.epsilon(1))
    assert "epsilon" in capsys.readouterr().out
