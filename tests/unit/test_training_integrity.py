"""Training integrity (issue 20) without Ray: a NaN at step k fails that epoch naming the step; a
truncated or broken latest checkpoint falls back to the one before; a run is not resumed under a
changed config. The real DDP engine on a tiny model (Ray's ``prepare_model`` needs a Train
session, so it is replaced by the identity: one process, no process group)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.model.recommender import Recommender
from recsys.training.checkpoints import earlier_checkpoints, restore
from recsys.training.config import TrainJobConfig
from recsys.training.engine import DDPEngine, TrainState
from recsys.training.items import PlatformItems
from recsys.training.loop import train_steps
from recsys.training.objective import PlatformTensors, RecommenderObjective
from recsys.training.run import RESUME_CONFIG, check_resume_config

H = D = 16
N, MAX_LEN = 20, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def _items(pid: int, poisoned: bool = False) -> PlatformTensors:
    rng = np.random.default_rng(pid)
    vecs = rng.normal(size=(N + 1, H)).astype(np.float32)
    vecs[0] = 0.0
    if poisoned:
        vecs[5] = np.nan  # one broken text vector in this platform's catalog
    items = PlatformItems(name=f"shop{pid}", platform_id=pid,
                          brand_ids=np.r_[0, rng.integers(1, 4, N)],
                          category_ids=np.zeros((N + 1, 3), np.int64), text_vecs=vecs,
                          token_ids=None, popularity=np.ones(N + 1))
    return PlatformTensors.from_items(items, torch.device("cpu"))


def _engine(monkeypatch: pytest.MonkeyPatch, poisoned: bool = False,
            seed: int = 0) -> DDPEngine:
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kw: model)
    torch.manual_seed(seed)
    model = Recommender(text_dim=H, dim=D, num_platforms=2, num_brands=4, num_categories=2,
                        max_len=MAX_LEN, num_layers=1, num_heads=2, dropout=0.0, num_experts=2)
    cfg = TrainJobConfig.model_validate({"optim": {"lr": 0.01}})
    objective = RecommenderObjective(model, cfg.loss, {0: _items(0, poisoned), 1: _items(1)})
    return DDPEngine(objective, cfg)


def _batch(platform: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, N + 1, (4, 5), generator=g)
    history[:, :2] = 0  # left padding
    return {"history": history, "target": torch.randint(1, N + 1, (4,), generator=g),
            "platform": torch.full((4,), platform)}


def _weights(engine: DDPEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.module.model.state_dict().items()}


# --- a NaN at step k -------------------------------------------------------------------------


def test_a_nan_loss_at_step_k_fails_that_epoch_naming_the_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Platform 0's catalog has a NaN text vector; only batch k is from platform 0, so the loss
    is finite until step k and NaN there. The epoch fails at step k, before the optimizer
    applies the NaN gradients."""
    engine = _engine(monkeypatch, poisoned=True)
    k = 4
    batches = [_batch(1, s) for s in range(k)] + [_batch(0, k), _batch(1, k + 1)]
    before = {}

    def feed():
        for step, b in enumerate(batches):
            if step == k:
                before.update(_weights(engine))
            yield b

    with pytest.raises(FloatingPointError,
                       match=rf"^epoch 3, step {k}: non-finite training loss \(nan\)"):
        train_steps(engine, feed(), epoch=3)
    after = _weights(engine)
    assert all(torch.equal(before[n], after[n]) for n in before), "the NaN step was applied"
    assert all(torch.isfinite(v).all() for v in after.values())
    # The same batches without the poisoned catalog train through.
    losses, seen = train_steps(_engine(monkeypatch), batches, epoch=3)
    assert len(losses) == k + 2 and seen == 4 * (k + 2) and np.isfinite(losses).all()


def test_a_nan_gradient_with_a_finite_loss_fails_at_its_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(monkeypatch)
    k, calls = 2, []
    weight = next(p for p in engine.module.parameters() if p.requires_grad)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("nan") if len(calls) == k + 1 else grad

    weight.register_hook(poison)
    with pytest.raises(FloatingPointError,
                       match=rf"^epoch 0, step {k}: non-finite gradient norm \(nan\)"):
        train_steps(engine, [_batch(1, s) for s in range(5)], epoch=0)
    assert torch.isfinite(weight).all()


# --- a truncated latest checkpoint -----------------------------------------------------------


def _checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 ) -> tuple[DDPEngine, list[Path], list[dict[str, torch.Tensor]]]:
    """Three checkpoints of one run (after epochs 0, 1, 2), named as Ray Train names them, with
    the weights each holds."""
    engine = _engine(monkeypatch)
    dirs, weights = [], []
    for epoch in range(3):
        train_steps(engine, [_batch(1, 10 * epoch + s) for s in range(2)], epoch=epoch)
        d = tmp_path / "run" / f"checkpoint_2026-12-06_10-0{epoch}-00.000000"
        d.mkdir(parents=True)
        assert engine.save(d, TrainState(epoch=epoch, best=0.1 * epoch), rank=0)
        dirs.append(d)
        weights.append(_weights(engine))
    (tmp_path / "run" / "resume_config.json").write_text("{}")  # not a checkpoint: ignored
    return engine, dirs, weights


def _restore(engine: DDPEngine, latest: Path, **kw) -> TrainState:
    from ray.train import Checkpoint

    checkpoint = Checkpoint.from_directory(str(latest))
    return restore(engine, [checkpoint, *earlier_checkpoints(checkpoint)], **kw)


def _same(engine: DDPEngine, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(weights[k], v) for k, v in _weights(engine).items())


@pytest.mark.parametrize("damage", ["truncated_ddp_pt", "broken_train_state", "missing_ddp_pt"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    _, dirs, weights = _checkpoints(tmp_path, monkeypatch)
    latest = dirs[-1]
    if damage == "truncated_ddp_pt":
        blob = (latest / "ddp.pt").read_bytes()
        (latest / "ddp.pt").write_bytes(blob[: len(blob) // 2])
    elif damage == "broken_train_state":
        (latest / "train_state.json").write_text('{"format_version": 1, "epoch": 2, "be')
    else:
        (latest / "ddp.pt").unlink()
    fresh = _engine(monkeypatch, seed=1)
    with caplog.at_level(logging.WARNING, logger="recsys.training.loop"):
        state = _restore(fresh, latest)
    assert state.epoch == 1 and state.best == pytest.approx(0.1)
    assert _same(fresh, weights[1])
    text = caplog.text
    assert "does not load" in text and latest.name in text and "instead of the latest" in text


def test_an_intact_latest_checkpoint_is_used_without_a_word(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _, dirs, weights = _checkpoints(tmp_path, monkeypatch)
    fresh = _engine(monkeypatch, seed=1)
    with caplog.at_level(logging.WARNING, logger="recsys.training.loop"):
        assert _restore(fresh, dirs[-1]).epoch == 2
    assert _same(fresh, weights[2]) and not caplog.text


def test_ranks_move_on_together_and_none_loading_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, dirs, weights = _checkpoints(tmp_path, monkeypatch)
    # The latest loads here but not on another rank: every rank takes the one before.
    others = iter([False, True])
    fresh = _engine(monkeypatch, seed=1)
    assert _restore(fresh, dirs[-1], agree=lambda ok: ok and next(others)).epoch == 1
    assert _same(fresh, weights[1])
    for d in dirs:
        (d / "ddp.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RuntimeError, match=r"no checkpoint of this run loads \(3 tried\)") as e:
        _restore(fresh, dirs[-1])
    assert all(d.name in str(e.value) for d in dirs) and "resume=false" in str(e.value)


# --- resume under a changed config -----------------------------------------------------------


def _cfg(tmp_path: Path, **optim: float) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "name": "r", "output_dir": str(tmp_path), "optim": {"lr": 0.003, **optim},
        "model": {"dim": 16, "num_heads": 2}, "tracking": {"enabled": True}})


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    check_resume_config(_cfg(tmp_path))  # a new run records its config
    assert (tmp_path / "r" / RESUME_CONFIG).is_file()
    (tmp_path / "r" / "checkpoint_2026-12-06_10-00-00.000000").mkdir()
    # What may change: epochs, patience, tracking, placement.
    more = _cfg(tmp_path, epochs=40, early_stopping_patience=9)
    check_resume_config(more.model_copy(update={
        "tracking": more.tracking.model_copy(update={"enabled": False}),
        "scaling": more.scaling.model_copy(update={"cpus_per_worker": 1.0})}))
    changed = _cfg(tmp_path, lr=0.01, seed=7)
    changed = changed.model_copy(update={"model": changed.model.model_copy(update={"dim": 32})})
    with pytest.raises(ValueError, match="another config") as e:
        check_resume_config(changed)
    msg = str(e.value)
    assert "model.dim: 16 -> 32" in msg and "optim.lr: 0.003 -> 0.01" in msg
    assert "optim.seed: 0 -> 7" in msg and "resume=false" in msg and "new name" in msg
    assert "optim.epochs" not in msg.split("(")[1].split(")")[0]  # not among the differences
    # The refused config was not recorded: the original one still guards the checkpoints.
    with pytest.raises(ValueError, match="model.dim"):
        check_resume_config(changed)


def test_a_run_without_checkpoints_takes_the_new_config(tmp_path: Path) -> None:
    """Nothing to resume (the last attempt failed before its first checkpoint): no refusal."""
    check_resume_config(_cfg(tmp_path))
    check_resume_config(_cfg(tmp_path, lr=0.01))
    (tmp_path / "r" / "checkpoint_2026-12-06_10-00-00.000000").mkdir()
    with pytest.raises(ValueError, match=r"optim.lr: 0.01 -> 0.003"):
        check_resume_config(_cfg(tmp_path))
