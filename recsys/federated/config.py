"""The typed config of ``jobs.federated`` (federated cross-platform pretraining).

Model, loss and optimizer sections are the training job's own (``recsys.training.config``), so a
federated model is built exactly as a pooled one; :meth:`FederatedJobConfig.train_config` is the
equivalent pooled ``TrainJobConfig`` that clients and the export use.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recsys.config import StrictModel
from recsys.data.examples import DataConfig
from recsys.model.ann import DEFAULT_THRESHOLD as DEFAULT_ANN_THRESHOLD
from recsys.training.config import (
    EncoderConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainJobConfig,
)

Algorithm = Literal["fedavg", "fedprox", "fedadam"]


class ClientDPConfig(StrictModel):
    """Client-level DP (DP-FedAvg, McMahan et al. 2018): each client's update is clipped to
    ``clip`` (L2 over every sent tensor), the server averages the clipped updates with equal
    weights and adds Gaussian noise of std ``noise_multiplier * clip / clients``. The unit is a
    whole client (a shop's entire logs); see docs/privacy.md for what it does not cover."""

    enabled: bool = False
    clip: float = Field(1.0, gt=0, allow_inf_nan=False)
    """L2 bound of one client's update (all sent tensors together)."""
    noise_multiplier: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Noise std / ``clip`` on the sum of the clipped updates (0: clipping only, no guarantee)."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta of the reported (epsilon, delta) (RDP accountant, every client every round)."""


class FederatedConfig(StrictModel):
    """Rounds, local work and the server's aggregation."""

    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    """Passes of a client over its own training rows per round (E)."""
    local_steps: int | None = Field(None, ge=1)
    """Cap on a client's optimizer steps per round (None: ``local_epochs`` full passes)."""
    algorithm: Algorithm = "fedavg"
    """``fedavg``: the server adds the row-weighted mean update; ``fedprox``: the same, with the
    proximal term ``proximal_mu / 2 * ||w - w_global||^2`` in each client's loss (keeps uneven
    clients near the global model); ``fedadam``: the mean update is a pseudo-gradient for a
    server-side Adam (Reddi et al., 2021)."""
    proximal_mu: float = Field(0.01, ge=0)
    """FedProx's mu (only ``algorithm=fedprox``)."""
    server_lr: float = Field(1.0, gt=0)
    """Server step on the mean update (FedAvg/FedProx: 1 = plain averaging; FedAdam: its eta,
    e.g. 0.01)."""
    server_betas: tuple[float, float] = (0.9, 0.99)
    server_tau: float = Field(1e-3, gt=0)
    """FedAdam's adaptivity epsilon (tau in Reddi et al.)."""
    validate_every: int = Field(1, ge=0)
    """Every this many rounds, each client scores the global model on its own validation users
    and returns only (users, mean NDCG@10); the best round is exported (0: the last round)."""
    client_dp: ClientDPConfig = ClientDPConfig()
    cpus_per_client: float = Field(0.5, gt=0)
    """Ray CPUs of each client actor (fractional on a 2-core machine)."""
    evaluate_test: bool = True
    """Evaluate the export on the test split of the clients' platforms (the simulation's
    report; in a real federation each shop would evaluate on its own)."""


class FederatedJobConfig(StrictModel):
    """Config of ``jobs.federated``: one client per platform of ``platforms``."""

    name: str = "federated"
    data: DataConfig = DataConfig()
    platforms: list[str] | None = None
    """The clients (None: every platform of the example set)."""
    user_fraction: float = Field(1.0, gt=0, le=1)
    """Each client keeps this share of its users (seeded, as in ``TrainJobConfig``)."""
    model: ModelConfig = ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    """The clients' local optimizer (AdamW: ``lr``, ``weight_decay``, ``grad_clip``,
    ``micro_batch_size``, ``length_buckets``, ``seed``); ``epochs`` and early stopping are
    unused (``federated.rounds`` and ``federated.local_epochs`` say how long)."""
    federated: FederatedConfig = FederatedConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/federated"
    """The export goes to ``output_dir/name/export`` (the format of a pretrain export)."""
    ann_threshold: int = Field(DEFAULT_ANN_THRESHOLD, ge=0)
    """The export gets an approximate index of each catalog of more items than this (as
    ``TrainJobConfig.ann_threshold``; 0: never)."""

    @model_validator(mode="after")
    def _check(self) -> FederatedJobConfig:
        problems = []
        if self.model.item_ids:
            problems.append("model.item_ids=true: per-item vectors are catalog-specific and "
                            "their updates reveal per-item training counts; federated runs "
                            "share text-based towers only (set model.item_ids=false)")
        f = self.federated
        if f.algorithm == "fedprox" and f.proximal_mu == 0:
            problems.append("federated.algorithm=fedprox needs federated.proximal_mu > 0")
        if self.platforms is not None and len(self.platforms) < 2:
            problems.append("platforms: a federation needs at least two clients")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def train_config(self) -> TrainJobConfig:
        """The pooled pretraining config with the same model: what clients build their model
        from and what the export records as its ``train_config``."""
        return TrainJobConfig(
            name=self.name, mode="pretrain", data=self.data, train_platforms=self.platforms,
            user_fraction=self.user_fraction, model=self.model, encoder=self.encoder,
            loss=self.loss, optim=self.optim, tracking=self.tracking,
            output_dir=self.output_dir, ann_threshold=self.ann_threshold)
