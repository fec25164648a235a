"""User-level DP-SGD: the parts that do not depend on Ray or the job config.

The privacy unit is a user: all of one user's training rows (several with
``data.sequences.train_windows``) are grouped (:class:`UserRows`), a step takes each user
independently with probability q (:func:`poisson_sample`), the gradient of each user's loss over
all of that user's rows is computed (:func:`per_user_gradients`), clipped to ``max_grad_norm``,
summed, and Gaussian noise is added (Opacus's ``DPOptimizer``, in ``dp_engine``); Opacus's
accountant turns (noise multiplier, q, steps) into (epsilon, delta) (:func:`spent_epsilon`).

Why per-user gradients come from ``torch.func`` (``vmap(grad_and_value(functional_call))`` over
users) and not from Opacus's ``GradSampleModule``: its hooks take the batch dimension as the
privacy unit (a row, not a user), they do not cover ``nn.MultiheadAttention`` without swapping
the model's layers (the model file stays as it is), and every row's loss reads the whole item
table. ``vmap`` computes each user's gradient over all of that user's rows, with any module,
in one batched call per chunk of users; Opacus's ``DPOptimizer`` then clips, sums and noises
them from ``p.grad_sample`` exactly as it would its own.

Only the per-user part trains (``transfer.strategy=user_tower``): the user tower, the repeat
bias and the CTR head. The item table is computed once per step without gradients: a trained
item tower's per-user gradient would need a backward pass over the whole catalog per user
(~1.7 GMAC each on Scientific), so configs that train it are refused (:func:`check_per_user_model`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from recsys.model.recommender import mask_padding

PER_USER_PARTS = ("user_tower", "repeat", "ctr_head")
"""Top-level modules of ``Recommender`` whose every use in a user's loss reads that user's
rows only: the parameters DP-SGD may train."""


class PrivacyError(ValueError):
    """The configured training would not hold its differential-privacy guarantee."""


# -- refusals --------------------------------------------------------------------------------


def check_per_user_model(model: nn.Module, per_user: Iterable[str] = PER_USER_PARTS) -> None:
    """Refuse a model whose per-user gradients are not what the clip bounds: trainable
    parameters outside ``per_user`` (their gradient mixes every user, e.g. the item tower run
    over the catalog once per step), or batch-norm layers (a row's output depends on the other
    rows of its batch, so one user changes everyone's gradient)."""
    parts = set(per_user)
    problems = []
    outside = [n for n, p in model.named_parameters()
               if p.requires_grad and n.split(".")[0] not in parts]
    if outside:
        problems.append(
            f"trainable parameters outside the per-user computation ({', '.join(outside[:4])}"
            f"{', ...' if len(outside) > 4 else ''}; per-user parts: {sorted(parts)}): their "
            "gradient is shared by every user of a step, so clipping each user's gradient "
            "would not bound it; freeze them (transfer.strategy=user_tower)")
    mixing = [n or type(model).__name__ for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mixing:
        problems.append(f"batch-norm layers ({', '.join(mixing[:4])}) mix the users of a batch: "
                        "a per-user gradient is not defined; use LayerNorm")
    if problems:
        raise PrivacyError("DP-SGD refused: " + "; ".join(problems))


def check_private_setup(train_platforms: list[str], cross_platform: bool) -> None:
    """Refuse data layouts the per-user step does not cover (known once the example set is)."""
    problems = []
    if len(train_platforms) != 1:
        problems.append(f"privacy trains one platform, got {train_platforms} (train_platforms)")
    if cross_platform:
        problems.append("cross-platform histories (data.sequences.cross_platform) read other "
                        "platforms' item tables, which the per-user step does not build")
    if problems:
        raise PrivacyError("DP-SGD refused: " + "; ".join(problems))


# -- sampling and accounting -----------------------------------------------------------------


def poisson_sample(num_users: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the users in one step: each independently with probability ``sample_rate``
    (the sampling that the accountant's amplification bound assumes; the batch size varies)."""
    return np.flatnonzero(rng.random(num_users) < sample_rate)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps of an epoch: each user is seen once per epoch in expectation."""
    return max(1, round(1.0 / sample_rate))


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon after ``steps`` steps of the subsampled Gaussian mechanism, by Opacus's
    accountant (``rdp`` or ``prv``); 0 before the first step."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]  # what acc.step() builds, at once
    return float(acc.get_epsilon(delta=delta))


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``target_epsilon`` in ``steps`` steps (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


# -- users' rows -----------------------------------------------------------------------------


@dataclass
class UserRows:
    """A worker's training rows grouped by user: ``rows[u]`` are user u's row indices."""

    histories: list[np.ndarray]  # one per row, oldest item first
    targets: np.ndarray  # (rows,)
    rows: list[np.ndarray]  # one per user
    longest: np.ndarray  # (users,) longest history of each user

    @classmethod
    def from_columns(cls, user_ids: Iterable[Any], histories: Iterable[Any],
                     targets: Iterable[int]) -> UserRows:
        hists = [np.asarray(h, np.int64) for h in histories]
        users = np.asarray([str(u) for u in user_ids], dtype=object)
        _, inverse = np.unique(users, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        cuts = np.flatnonzero(np.diff(inverse[order])) + 1
        rows = np.split(order, cuts) if len(order) else []
        longest = np.array([max(len(hists[i]) for i in r) for r in rows], np.int64)
        return cls(hists, np.asarray(list(targets), np.int64), rows, longest)

    @property
    def num_users(self) -> int:
        return len(self.rows)

    @property
    def num_rows(self) -> int:
        return len(self.targets)

    def chunks(self, users: np.ndarray, size: int,
               max_len: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """``(history (U, R, T), target (U, R))`` for chunks of ``users`` of similar history
        length, left-padded (R: most rows of a user in the chunk; empty rows are all padding
        and have no loss)."""
        users = users[np.argsort(self.longest[users], kind="stable")]
        for start in range(0, len(users), size):
            chunk = users[start:start + size]
            r = max(len(self.rows[u]) for u in chunk)
            t = max(1, min(max_len, int(self.longest[chunk].max())))
            hist = np.zeros((len(chunk), r, t), np.int64)
            target = np.zeros((len(chunk), r), np.int64)
            for i, u in enumerate(chunk):
                for j, row in enumerate(self.rows[u]):
                    h = self.histories[row][-t:]
                    if len(h):
                        hist[i, j, t - len(h):] = h
                    target[i, j] = self.targets[row]
            yield torch.from_numpy(hist), torch.from_numpy(target)


# -- per-user gradients ----------------------------------------------------------------------


class PerUserLoss(nn.Module):
    """One user's loss over all of that user's rows, written for ``vmap`` (masks, no
    data-dependent shapes): the next-item softmax over the whole catalog at every position, as
    ``RecommenderObjective``'s ``full_softmax``, plus the CTR head's BCE against a negative
    drawn uniformly from the catalog (the non-private objective draws by training popularity,
    a statistic of the private data). Averaged over the user's positions, so every user's
    gradient has the same scale before clipping."""

    def __init__(self, model: nn.Module, temperature: float, ctr_weight: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.ctr_weight = ctr_weight

    def forward(self, history: torch.Tensor, target: torch.Tensor, negative: torch.Tensor,
                table: torch.Tensor, platform: torch.Tensor) -> torch.Tensor:
        """``history`` (R, T) left-padded, ``target`` (R,), ``negative`` (R, T) item ids,
        ``table`` (N+1, D) the platform's item vectors, ``platform`` () its model id."""
        R, T = history.shape
        labels = torch.cat([history[:, 1:], target[:, None]], dim=1)          # (R, T)
        # Positions without an input item have no loss; a real label keeps their (unused)
        # cross-entropy finite, so that no inf * 0 turns the gradient into NaN.
        labels = torch.where(history > 0, labels, torch.ones_like(labels))
        valid = (history > 0).to(table.dtype)                                 # (R, T)
        pids = platform.expand(R)                                             # (R,)
        states = self.model.user_states(history, table, pids)                 # (R, T, D)
        seen = torch.zeros(R, T, table.shape[0], dtype=table.dtype, device=table.device)
        seen = seen.scatter(2, history[..., None], 1.0).cumsum(1) > 0         # (R, T, N+1)
        seen = seen & (torch.arange(table.shape[0], device=table.device) > 0)
        u = states.reshape(R * T, -1)                                         # (R*T, D)
        logits = mask_padding(self.model.score_items(
            u, table, seen.reshape(R * T, -1), platform.expand(R * T))) / self.temperature
        ce = F.cross_entropy(logits, labels.reshape(-1), reduction="none")    # (R*T,)
        n = valid.sum().clamp(min=1.0)
        loss = (ce * valid.reshape(-1)).sum() / n
        if self.ctr_weight > 0:
            pos = self.model.ctr_logit(u, table[labels.reshape(-1)])
            neg = self.model.ctr_logit(u, table[negative.reshape(-1)])
            bce = (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none")
                   + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg),
                                                        reduction="none"))
            loss = loss + self.ctr_weight * (bce * valid.reshape(-1)).sum() / (2 * n)
        return loss


def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``module`` by name, detached (``functional_call`` inputs)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def per_user_gradients(loss: PerUserLoss, params: Mapping[str, torch.Tensor],
                       history: torch.Tensor, target: torch.Tensor, negative: torch.Tensor,
                       table: torch.Tensor, platform: torch.Tensor
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each user's gradient (``{name: (U, *shape)}``) and loss (U,) for ``history`` (U, R, T),
    ``target`` (U, R), ``negative`` (U, R, T): one ``vmap`` over users. Dropout draws
    differently for every user, as in a batch."""
    buffers = dict(loss.named_buffers())
    frozen = {n: p for n, p in loss.named_parameters() if n not in params}

    def one(p: dict[str, torch.Tensor], h: torch.Tensor, t: torch.Tensor,
            neg: torch.Tensor) -> torch.Tensor:
        return functional_call(loss, ({**frozen, **p}, buffers), (h, t, neg, table, platform))

    # The math attention kernel is made of ops that vmap batches; the fused CPU kernel has no
    # batching rule and would run once per user.
    with sdpa_kernel(SDPBackend.MATH):
        grads, values = vmap(grad_and_value(one), in_dims=(None, 0, 0, 0),
                             randomness="different")(dict(params), history, target, negative)
    return grads, values
