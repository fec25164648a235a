"""The DP-SGD engine (``privacy.enabled``): Poisson-sampled users, per-user clipping, noise.

It replaces the DDP engine's ``step(batch)`` by :meth:`DPEngine.train_epoch`, because the
batches are its own: each step draws users (not rows) by Poisson sampling from the worker's
training rows grouped per user (:class:`~recsys.training.privacy.UserRows`). Per-user gradients
come from ``torch.func`` (see :mod:`recsys.training.privacy` for why); Opacus's
``DPOptimizer`` clips them (``p.grad_sample``), sums, adds noise and divides by the expected
number of users per step, then AdamW steps. Opacus's accountant gives (epsilon, delta) after
each epoch; the count of steps is saved with every checkpoint, so a resumed run goes on
spending from where it was.

The sampling and the noise draw from the operating system's entropy, not from ``optim.seed``:
a noise that the logged config reproduces would be known to whoever reads it. A private run is
therefore not repeatable bit for bit. (Floating-point Gaussian sampling is not hardened against
the attacks that Opacus's ``secure_mode`` with torchcsprng addresses.)
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.training.config import TrainJobConfig
from recsys.training.engine import Engine, TrainState, check_finite, param_groups
from recsys.training.privacy import (
    PerUserLoss,
    PrivacyError,
    UserRows,
    check_per_user_model,
    noise_for_budget,
    per_user_gradients,
    poisson_sample,
    spent_epsilon,
    steps_per_epoch,
    trainable,
)


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved numbers of a private run: what the accountant is fed and the card says."""

    users: int
    sample_rate: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    steps_per_epoch: int
    accountant: str
    target_epsilon: float | None

    @classmethod
    def resolve(cls, cfg: TrainJobConfig, users: int) -> PrivacyPlan:
        """From the config and the number of training users: the sample rate, delta (default
        1 / users) and the noise multiplier (calibrated to ``target_epsilon`` over
        ``optim.epochs``, or as given)."""
        p = cfg.privacy
        if users < 1:
            raise PrivacyError("DP-SGD refused: no training users")
        q = p.sample_rate if p.sample_rate is not None else \
            min(1.0, (p.expected_users_per_step or 1) / users)
        delta = p.delta if p.delta is not None else 1.0 / users
        per_epoch = steps_per_epoch(q)
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
        else:
            assert p.target_epsilon is not None  # the config's validator asks for one of them
            sigma = noise_for_budget(p.target_epsilon, delta, q, per_epoch * cfg.optim.epochs,
                                     p.accountant)
        return cls(users=users, sample_rate=q, delta=delta, noise_multiplier=sigma,
                   max_grad_norm=p.max_grad_norm, steps_per_epoch=per_epoch,
                   accountant=p.accountant, target_epsilon=p.target_epsilon)

    def epsilon(self, steps: int) -> float:
        return spent_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta,
                             self.accountant)

    def card(self, steps: int) -> dict[str, Any]:
        """The ``privacy`` block of the export's metadata and the checkpoint state."""
        return {"mechanism": "DP-SGD", "unit": "user", **asdict(self), "steps": steps,
                "epsilon": self.epsilon(steps),
                "expected_users_per_step": self.sample_rate * self.users,
                "opacus": metadata.version("opacus")}


def user_rows_from_shard(shard: Any, platform_ids: dict[str, int]) -> tuple[UserRows, int]:
    """The worker's whole training shard grouped per user, and its one platform's model id."""
    users: list[Any] = []
    histories: list[Any] = []
    targets: list[int] = []
    platforms: set[str] = set()
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        if "history_platform" in batch:
            raise PrivacyError("DP-SGD refused: cross-platform histories are not covered")
        users.extend(batch["user_id"].tolist())
        histories.extend(batch["history"])
        targets.extend(batch["target"].tolist())
        platforms.update(str(p) for p in batch["platform"])
    if len(platforms) > 1:
        raise PrivacyError(f"DP-SGD refused: one platform per run, the rows hold {platforms}")
    if not platforms:
        raise PrivacyError("DP-SGD refused: the training shard is empty")
    return UserRows.from_columns(users, histories, targets), platform_ids[platforms.pop()]


class DPEngine(Engine):
    """User-level DP-SGD on one worker (the config refuses more, see ``privacy_problems``)."""

    def __init__(self, objective: nn.Module, cfg: TrainJobConfig, rows: UserRows,
                 platform_id: int) -> None:
        from opacus.optimizers import DPOptimizer

        model = objective.model
        check_per_user_model(model)
        self.module = objective
        self.cfg = cfg
        self.rows = rows
        self.platform = objective.platforms[platform_id]
        self.plan = PrivacyPlan.resolve(cfg, rows.num_users)
        self.loss = PerUserLoss(model, cfg.loss.temperature, cfg.loss.ctr_weight)
        self.names = {n: p for n, p in self.loss.named_parameters() if p.requires_grad}
        base = torch.optim.AdamW(param_groups(objective, cfg), lr=cfg.optim.lr,
                                 weight_decay=cfg.optim.weight_decay)
        self.noise = torch.Generator(device=self._device()).manual_seed(secrets.randbits(63))
        self.optimizer = DPOptimizer(
            base, noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            expected_batch_size=self.plan.sample_rate * rows.num_users,  # type: ignore[arg-type]
            loss_reduction="mean", generator=self.noise)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.rng = np.random.default_rng(secrets.randbits(128))
        self.steps = 0

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def step(self, history: torch.Tensor, target: torch.Tensor, platform: torch.Tensor,
             history_platform: torch.Tensor | None = None) -> dict[str, float]:
        raise TypeError("DPEngine draws its own Poisson batches of users: call train_epoch")

    def train_epoch(self, epoch: int) -> tuple[list[float], int]:
        """``steps_per_epoch`` steps; returns the mean user loss of each step that had users,
        and the number of rows trained on."""
        losses: list[float] = []
        seen = 0
        for _ in range(self.plan.steps_per_epoch):
            users = poisson_sample(self.rows.num_users, self.plan.sample_rate, self.rng)
            try:
                loss = self.private_step(users)
            except FloatingPointError as e:
                raise FloatingPointError(f"epoch {epoch}, step {self.steps}: {e}; the run stops "
                                         "rather than train on it") from e
            if users.size:
                losses.append(loss)
                seen += sum(len(self.rows.rows[u]) for u in users)
        return losses, seen

    def private_step(self, users: np.ndarray) -> float:
        """One DP-SGD step over ``users`` (may be empty: the noise is still added and the
        step counted, as the accountant assumes); returns their mean loss."""
        device = self._device()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            table = self.platform.item_table(self.loss.model)  # (N+1, D), item tower frozen
        params = trainable(self.loss)
        pid = torch.tensor(self.platform.platform_id, device=device)
        total, count = 0.0, 0
        for hist, target in self.rows.chunks(users, self.cfg.privacy.chunk_users,
                                             self.cfg.data.sequences.max_seq_len):
            hist, target = hist.to(device), target.to(device)
            negative = torch.randint(1, self.platform.num_items + 1, hist.shape, device=device)
            grads, values = per_user_gradients(self.loss, params, hist, target, negative, table,
                                               pid)
            for name, p in self.names.items():
                p.grad_sample = grads[name]
            self.optimizer.clip_and_accumulate()
            total += float(values.detach().sum())
            count += len(values)
        if count == 0:  # an empty draw: the sum of clipped gradients is zero
            for p in self.names.values():
                p.grad_sample = p.new_zeros((0, *p.shape))
            self.optimizer.clip_and_accumulate()
        check_finite("training loss", total)
        self.optimizer.add_noise()
        self.optimizer.scale_grad()
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.names.values()])
        check_finite("gradient norm", float(norm))
        self.optimizer.original_optimizer.step()
        self.steps += 1
        return total / count if count else math.nan

    def privacy_metrics(self) -> dict[str, float]:
        plan = self.plan
        return {"privacy_epsilon": plan.epsilon(self.steps), "privacy_delta": plan.delta,
                "privacy_noise_multiplier": plan.noise_multiplier,
                "privacy_max_grad_norm": plan.max_grad_norm,
                "privacy_sample_rate": plan.sample_rate, "privacy_steps": float(self.steps)}

    def privacy_params(self) -> dict[str, Any]:
        """What the run logs once as MLflow params (``privacy.*``)."""
        return {f"privacy.{k}": v for k, v in asdict(self.plan).items()}

    def save(self, directory: Path, state: TrainState, rank: int) -> bool:
        if rank != 0:
            return False
        torch.save({"model": self.module.model.state_dict(),
                    "optimizer": self.optimizer.original_optimizer.state_dict()},
                   directory / "ddp.pt")
        state.privacy = self.plan.card(self.steps)
        state.write(directory)
        return True

    def load(self, directory: Path) -> TrainState:
        state = TrainState.read(directory)
        blob = torch.load(directory / "ddp.pt", map_location="cpu", weights_only=True)
        if state.privacy is None:
            raise PrivacyError(f"{directory}: a checkpoint without a privacy state cannot "
                               "continue a private run (its steps are not accounted)")
        self.module.model.load_state_dict(blob["model"])
        self.optimizer.original_optimizer.load_state_dict(blob["optimizer"])
        self.steps = int(state.privacy["steps"])
        return state


def make_dp_engine(objective: nn.Module, cfg: TrainJobConfig, shard: Any,
                   platform_ids: dict[str, int]) -> DPEngine:
    """The engine of a private run, from the worker's training shard."""
    rows, platform_id = user_rows_from_shard(shard, platform_ids)
    return DPEngine(objective, cfg, rows, platform_id)
