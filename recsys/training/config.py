"""The typed config of every training job (pretrain, transfer, scratch) and of Tune trials.

One schema; the job's ``mode`` and ``transfer.strategy`` say what is trained. Derived numbers
(DeepSpeed batch sizes) come from :mod:`recsys.training.deepspeed_config`, never from here twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from recsys.config import StrictModel
from recsys.data.examples import DataConfig
from recsys.model.ann import DEFAULT_THRESHOLD as DEFAULT_ANN_THRESHOLD

Strategy = Literal["full", "freeze_encoder", "lora", "adapter_only", "user_tower"]


class ModelConfig(StrictModel):
    """Architecture (maps 1:1 onto the flat arguments of ``Recommender``)."""

    dim: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    num_experts: int = Field(8, ge=1)
    category_depth: int = Field(3, ge=1)
    item_ids: bool = False
    """Add a learned vector per item of each trained platform to its text vector (UniSRec's
    text+ID): better on items with history, zero (text only) for items never trained on."""
    repeat_bias: bool = True
    """A learned score per platform for items already in the user's history (how often people
    take an item again is a property of the shop; see ``Recommender``). Starts at 0."""

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads "
                             f"({self.num_heads})")
        return self


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    lr: float = Field(5e-4, gt=0)
    """Learning rate of the LoRA adapters (``transfer.strategy=lora``); fresh low-rank weights
    take a larger step than a pretrained encoder's own (``encoder.lr``)."""


class EncoderConfig(StrictModel):
    """The text encoder is ``data.text.encoder``; this says how it is used."""

    cache_dir: str = "runs/cache/encoder"
    """Frozen-encoder vectors, keyed by encoder + text hash (each text encoded once, ever)."""
    lora: LoraConfig = LoraConfig()
    encode_batch_size: int = Field(64, ge=1)
    refresh_every_steps: int = Field(0, ge=0)
    """Full softmax with the encoder in the step (``full``/``lora``): encode only each step's
    items and take the rest of the catalog from text vectors re-encoded every this many steps
    (``recsys.training.stale_text``); 0: encode the whole catalog every step. The sampled
    softmax encodes only its candidates either way; evaluation always encodes afresh."""
    lr: float = Field(5e-5, gt=0)
    """Learning rate of the pretrained encoder's weights under ``transfer.strategy=full``. The
    towers' ``optim.lr`` (1e-3 and up) wrecks a pretrained BERT in a few hundred steps; BERT
    fine-tuning uses 1e-5..1e-4. ``optim.lr_decay`` scales both rates alike."""


class LossConfig(StrictModel):
    kind: Literal["full_softmax", "sampled_softmax"] = "full_softmax"
    """Softmax over the platform's whole catalog, or in-batch + sampled negatives (logQ)."""
    num_negatives: int = Field(512, ge=1)
    negatives: Literal["popularity", "in_batch", "in_batch_uniform"] = "popularity"
    """Sampled softmax candidates besides the batch's own labels: ``num_negatives`` items drawn
    by training popularity; none (``in_batch``); or drawn uniformly (``in_batch_uniform``, mixed
    negative sampling: O(num_negatives) per step at any catalog size). logQ uses the matching
    proposal (``recsys.training.negatives``)."""
    logq_correction: bool = True
    ctr_weight: float = Field(0.1, ge=0)
    """Weight of the CTR head's BCE (positive: next item; negative: the item shown before it and
    not chosen where the logs have impressions, else a popularity-sampled item)."""
    temperature: float = Field(0.07, gt=0)
    """Scores are cosine-like dot products of normalised vectors divided by this."""


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(20, ge=1)
    micro_batch_size: int = Field(256, ge=1)
    """Examples per worker per step (before accumulation)."""
    length_buckets: int = Field(16, ge=1)
    """Batch sequences of similar length: read this many batches' worth of rows at a time, sort
    them by history length and cut them into batches (1 = random batches). Padding is most of a
    random batch when histories are short and long-tailed; see ``recsys.data.feed``."""
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    early_stopping_patience: int = Field(3, ge=1)
    """Epochs without a better validation NDCG@10 before stopping."""
    min_epochs: int = Field(0, ge=0)
    """No early stop before this many epochs: a model that starts from text similarity can dip
    below its epoch-0 score before it climbs past it (seen on small data)."""
    lr_decay: float = Field(1.0, gt=0, le=1)
    """Multiply the learning rate by this after every ``lr_decay_patience`` epochs in a row
    without a better validation score (reduce-on-plateau; 1 = constant rate). A constant rate
    leaves the validation score bouncing around its plateau; a smaller step settles it."""
    lr_decay_patience: int = Field(2, ge=1)
    seed: int = 0
    platform_temperature: Annotated[float, Field(ge=1)] | Literal["uniform"] = 1.0
    """Pooled training over uneven platforms: an epoch draws platform p's rows with share
    ``n_p ** (1 / T)`` (normalised; ``n_p`` its training rows) and keeps its size. 1:
    proportional to size (plain pooling, no resampling); larger: flatter; ``uniform``: every
    platform alike. The draw is seeded (``seed``) and fixed for the run."""


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    bf16: Literal["auto", True, False] = "auto"
    """'auto': bf16 on GPUs that support it, fp32 on CPU."""


class ScalingConfig(StrictModel):
    engine: Literal["ddp", "deepspeed"] = "ddp"
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    """Fractional on a 2-core machine so Ray Data keeps a CPU (STACK_NOTES)."""
    use_gpu: bool = False
    max_failures: int = Field(1, ge=0)
    """Worker failures survived by restarting from the last checkpoint."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on the cluster's nodes (its placement-group strategy):
    ``PACK`` fills as few nodes as possible, ``SPREAD`` spreads them where it can,
    ``STRICT_SPREAD`` puts each worker on a different node (or waits for nodes), ``STRICT_PACK``
    puts all on one node."""


class TransferConfig(StrictModel):
    init_from: str | None = None
    """Export or checkpoint directory of a pretrain run (required for mode=transfer)."""
    strategy: Strategy = "freeze_encoder"
    shrink: float = Field(1.0, gt=0, le=1)
    """Shrink-and-perturb (Ash & Adams, 2020): start from ``shrink * pretrained + perturb *
    fresh initialisation`` of the towers and head. Warm-started networks fit the new data
    faster but generalise worse than fresh ones; shrinking restores some of that. 1 = as is."""
    perturb: float = Field(0.0, ge=0, le=1)


class PrivacyConfig(StrictModel):
    """User-level DP-SGD (``recsys.training.privacy``): one user's rows are one privacy unit.

    Each step takes every training user independently with probability ``sample_rate``
    (Poisson sampling), clips the sum of that user's gradients to ``max_grad_norm``, adds
    Gaussian noise of std ``noise_multiplier * max_grad_norm``; Opacus's accountant turns the
    steps into (epsilon, delta). Give ``target_epsilon`` (the noise is calibrated to spend it
    over ``optim.epochs``) or ``noise_multiplier``, and ``sample_rate`` or
    ``expected_users_per_step``."""

    enabled: bool = False
    target_epsilon: float | None = Field(None, gt=0)
    """Budget for the whole run (``optim.epochs``); an early stop spends less."""
    noise_multiplier: float | None = Field(None, gt=0)
    """Noise std / ``max_grad_norm``, fixed instead of ``target_epsilon``."""
    delta: float | None = Field(None, gt=0, lt=1)
    """None: 1 / the number of training users (a guarantee that fails with probability
    delta must not be one user's worth)."""
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Clip of each user's gradient (the sum over all of that user's rows)."""
    sample_rate: float | None = Field(None, gt=0, le=1)
    """Probability that a user is in a step; an epoch is ``round(1 / sample_rate)`` steps."""
    expected_users_per_step: int | None = Field(None, ge=1)
    """Instead of ``sample_rate``: ``sample_rate = this / training users``."""
    sampling: Literal["poisson", "shuffle"] = "poisson"
    """``shuffle`` (fixed-size shuffled batches, the non-private loop's) is refused: the
    accountant's amplification by sampling assumes Poisson sampling."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus's RDP accountant (an upper bound) or PRV (numerically tighter)."""
    chunk_users: int = Field(64, ge=1)
    """Users whose gradients are computed in one vectorised call (memory, not privacy)."""


class FaultInjection(StrictModel):
    """Kill one worker once, after an epoch's checkpoint (tests of ``scaling.max_failures``)."""

    after_epoch: int = Field(ge=0)
    rank: int = Field(1, ge=0)
    marker: str
    """File created when the fault fires, so that the restarted worker does not fire again."""


class TrackingConfig(StrictModel):
    experiment: str = "recsys"
    enabled: bool = True


class TrainJobConfig(StrictModel):
    """Config of ``jobs.pretrain``, ``jobs.transfer`` and ``jobs.scratch``."""

    name: str = "run"
    mode: Literal["pretrain", "transfer", "scratch"] = "pretrain"
    data: DataConfig = DataConfig()
    train_platforms: list[str] | None = None
    """Platforms trained on (None: all platforms of the example set)."""
    eval_platforms: list[str] | None = None
    """Platforms evaluated (None: the train platforms)."""
    user_fraction: float = Field(1.0, gt=0, le=1)
    """Keep this share of users for training (seeded): the low-data transfer setting."""
    model: ModelConfig = ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    transfer: TransferConfig = TransferConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/train"
    """Ray Train storage and exports go under ``output_dir/name``. A URI (``s3://bucket/path``,
    what every node of a multi-node cluster can reach) holds the checkpoints; the export and
    the report, which serving and evaluation read locally, then go under
    ``<RECSYS_WORK_DIR>/train/<scheme>/<bucket>/<path>/<name>``."""
    ann_threshold: int = Field(DEFAULT_ANN_THRESHOLD, ge=0)
    """The export gets an approximate (faiss IVF) index of each catalog of more items than this,
    used by serving instead of scoring every item (0: never build one)."""
    materialize_datasets: bool = True
    """Hold the example datasets in the object store (read once, not once per epoch)."""
    fault_injection: FaultInjection | None = None
    privacy: PrivacyConfig = PrivacyConfig()
    resume: bool = True
    """Continue a run of the same name from its latest checkpoint (Ray Train restores it);
    false starts over, deleting that run's previous checkpoints."""

    @model_validator(mode="after")
    def _check(self) -> TrainJobConfig:
        problems = []
        if self.mode == "transfer" and not self.transfer.init_from:
            problems.append("mode=transfer needs transfer.init_from (a pretrain export dir)")
        if self.mode != "transfer" and self.transfer.strategy not in ("freeze_encoder", "full"):
            problems.append(f"transfer.strategy={self.transfer.strategy!r} only applies to "
                            "mode=transfer")
        if self.mode == "scratch" and self.train_platforms and len(self.train_platforms) != 1:
            problems.append("mode=scratch trains on exactly one platform (train_platforms)")
        problems += privacy_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def finetunes_encoder(self) -> bool:
        """Whether the transformer runs in the training step (else cached vectors are used)."""
        return self.transfer.strategy in ("full", "lora")


def privacy_problems(cfg: TrainJobConfig) -> list[str]:
    """Why ``privacy.enabled`` cannot hold its guarantee under this config (each names the key
    to change); empty when it can, or when privacy is off."""
    p = cfg.privacy
    if not p.enabled:
        return []
    out = []
    if (p.target_epsilon is None) == (p.noise_multiplier is None):
        out.append("privacy: give exactly one of privacy.target_epsilon and "
                   "privacy.noise_multiplier")
    if (p.sample_rate is None) == (p.expected_users_per_step is None):
        out.append("privacy: give exactly one of privacy.sample_rate and "
                   "privacy.expected_users_per_step")
    if p.sampling != "poisson":
        out.append("privacy.sampling=shuffle: fixed-size shuffled batches are not covered by "
                   "the accountant, whose amplification by sampling assumes each user is in a "
                   "step independently (Poisson); use privacy.sampling=poisson")
    if cfg.scaling.engine == "deepspeed":
        out.append("privacy with scaling.engine=deepspeed: ZeRO partitions and reduces the "
                   "batch's summed gradients itself, so per-user clipping and the noise "
                   "cannot be applied before its step; use scaling.engine=ddp")
    if cfg.scaling.num_workers != 1:
        out.append(f"privacy with scaling.num_workers={cfg.scaling.num_workers}: workers split "
                   "rows, not users, so a user's rows on two workers would be clipped twice "
                   "(twice the sensitivity) and each worker would add its own noise; use "
                   "scaling.num_workers=1")
    if cfg.optim.grad_accum != 1:
        out.append("privacy with optim.grad_accum > 1: a step must be one Poisson draw of "
                   "users; raise privacy.expected_users_per_step instead")
    if cfg.mode != "transfer" or cfg.transfer.strategy != "user_tower":
        out.append(f"privacy with mode={cfg.mode}, transfer.strategy={cfg.transfer.strategy}: "
                   "DP-SGD here fine-tunes the per-user part of a transferred model "
                   "(mode=transfer, transfer.strategy=user_tower); a trained item tower or "
                   "encoder runs over the whole catalog once per step, shared by every user, "
                   "so its per-user gradient is not computed and its clipping would not hold")
    if cfg.train_platforms is not None and len(cfg.train_platforms) != 1:
        out.append("privacy trains exactly one platform (train_platforms)")
    return out


def _absolute(path: str | None) -> str | None:
    """A local relative path made absolute against the current directory; URIs (``s3://``),
    ``bundled:`` encoder names and absolute paths unchanged."""
    if path is None or "://" in path or path.startswith("bundled:") or Path(path).is_absolute():
        return path
    return str(Path(path).resolve())


def with_absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """The same config with its local paths absolute, for processes that run elsewhere: a Tune
    trial runs in its own trial directory, where ``runs/demo/examples`` means nothing."""
    encoder = cfg.data.text.encoder
    if Path(encoder).exists():  # a local model directory (hub names stay as they are)
        encoder = _absolute(encoder) or encoder
    data = cfg.data.model_copy(update={
        "lake": _absolute(cfg.data.lake), "examples": _absolute(cfg.data.examples),
        "text": cfg.data.text.model_copy(update={"encoder": encoder})})
    return cfg.model_copy(update={
        "data": data, "output_dir": _absolute(cfg.output_dir),
        "encoder": cfg.encoder.model_copy(update={"cache_dir": _absolute(cfg.encoder.cache_dir)}),
        "transfer": cfg.transfer.model_copy(update={
            "init_from": _absolute(cfg.transfer.init_from)})})
