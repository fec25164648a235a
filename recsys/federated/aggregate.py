"""Server-side aggregation: FedAvg / FedProx (a weighted mean of client updates) and FedAdam
(that mean as a pseudo-gradient of a server Adam), with optional client-level DP.

Pure tensor code on state dicts (no Ray), so that the unit tests check the arithmetic.
FedProx differs from FedAvg on the client (the proximal term, ``recsys.federated.client``), not
here. Updates arrive at full shape (:func:`recsys.federated.payload.densify`); platform-row
tensors have one owner per row, so without DP the owner's row is applied as is (a weighted mean
over clients that do not own the row would shrink it for nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from recsys.federated.config import FederatedConfig
from recsys.federated.payload import PLATFORM_ROWS

State = dict[str, torch.Tensor]


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of an update over all its tensors together."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], bound: float) -> tuple[State, float]:
    """``update`` scaled to L2 norm at most ``bound`` (client-level DP's clip); and its norm
    before clipping."""
    norm = update_norm(update)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                  owner_rows: bool = True) -> State:
    """sum_i w_i u_i / sum_i w_i per tensor; with ``owner_rows`` the platform-row tensors are
    summed instead (each row is non-zero in its owner's update only)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates, {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights sum to {total}")
    out: State = {}
    for k in updates[0]:
        if owner_rows and k in PLATFORM_ROWS:
            out[k] = torch.stack([u[k] for u in updates]).sum(0)
        else:
            out[k] = sum((w / total) * u[k] for u, w in zip(updates, weights, strict=True))
    return out


def gaussian_noise(like: Mapping[str, torch.Tensor], std: float,
                   generator: torch.Generator | None = None) -> State:
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) * std
            for k, v in like.items()}


def client_dp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon at ``delta``) of ``rounds`` Gaussian mechanisms with noise multiplier z on the
    sum of clipped client updates, every client in every round (sample rate 1): Opacus's RDP
    accountant. inf without noise."""
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@dataclass
class Server:
    """The global model's shared parameters and the server optimizer's state."""

    cfg: FederatedConfig
    weights: State
    m: State = field(default_factory=dict)
    v: State = field(default_factory=dict)
    generator: torch.Generator | None = None

    def step(self, updates: Sequence[Mapping[str, torch.Tensor]],
             rows: Sequence[int]) -> dict[str, float]:
        """Aggregate one round's (full-shape) client updates into the global weights; returns
        what the round logs (norms, noise std)."""
        dp = self.cfg.client_dp
        stats: dict[str, float] = {}
        if dp.enabled:
            # Equal weights: row-count weights would depend on the private data, and the sum's
            # sensitivity (one client's clipped update) holds for the plain sum only.
            clipped, norms = zip(*(clip_update(u, dp.clip) for u in updates), strict=True)
            mean = weighted_mean(list(clipped), [1.0] * len(updates), owner_rows=False)
            std = dp.noise_multiplier * dp.clip / len(updates)
            noise = gaussian_noise(mean, std, self.generator)
            mean = {k: mean[k] + noise[k] for k in mean}
            stats.update(dp_noise_std=std, dp_clipped_share=sum(
                n > dp.clip for n in norms) / len(norms), update_norm_max=max(norms))
        else:
            mean = weighted_mean(updates, [float(r) for r in rows])
            stats["update_norm_max"] = max(update_norm(u) for u in updates)
        stats["mean_update_norm"] = update_norm(mean)
        if self.cfg.algorithm == "fedadam":
            self._adam(mean)
        else:
            for k, d in mean.items():
                self.weights[k] = self.weights[k] + self.cfg.server_lr * d
        return stats

    def _adam(self, delta: Mapping[str, torch.Tensor]) -> None:
        """FedAdam (Reddi et al. 2021, Algorithm 2): m, v on the pseudo-gradient, no bias
        correction, ``tau`` in the denominator."""
        b1, b2 = self.cfg.server_betas
        for k, d in delta.items():
            self.m[k] = b1 * self.m.get(k, torch.zeros_like(d)) + (1 - b1) * d
            self.v[k] = b2 * self.v.get(k, torch.zeros_like(d)) + (1 - b2) * d * d
            self.weights[k] = self.weights[k] + self.cfg.server_lr * self.m[k] / (
                self.v[k].sqrt() + self.cfg.server_tau)
