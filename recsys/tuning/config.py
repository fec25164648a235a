"""The typed schema of a sweep (``tune/sweeps/*.yaml``) and the trial configs it produces.

A sweep names a base training config, a search space over dotted ``TrainJobConfig`` keys, the
metric, the scheduler and search algorithm, and the per-trial resources. Everything is checked
when the file is loaded: an unknown key, an empty range or a value the training schema rejects
fails before Ray starts, with the sweep file and the key in the message.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

# set_dotted (the one dotted-key helper) is also importable from here, as it used to be.
from recsys.config import ConfigError, StrictModel, load_config, set_dotted
from recsys.training.config import TrainJobConfig, with_absolute_paths

METRIC_NAMES = ("ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr")


class ParamSpec(StrictModel):
    """One dimension of the search space."""

    kind: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    """randint: exclusive upper bound (as ``tune.randint``)."""
    values: list[Any] | None = None
    """choice / grid: the candidate values."""

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"kind={self.kind} needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"kind={self.kind} takes `values`, not `low`/`high`")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"kind={self.kind} needs `low` and `high`")
        if self.values is not None:
            raise ValueError(f"kind={self.kind} takes `low`/`high`, not `values`")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"kind=loguniform needs low > 0, got {self.low}")
        if self.kind == "randint" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("kind=randint needs integer low and high")
        return self

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole range when validating against the training schema."""
        if self.values is not None:
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


class MetricConfig(StrictModel):
    """What the sweep maximises: a validation ranking metric, per platform or the mean."""

    name: Literal["ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr"] = "ndcg@10"
    platform: str | None = None
    """None: the user-weighted mean over the eval platforms (as the training loop reports it)."""

    @property
    def key(self) -> str:
        """The name in the training loop's per-epoch report (and in Tune's results)."""
        return f"valid_{self.name}" + (f"/{self.platform}" if self.platform else "")


class SchedulerConfig(StrictModel):
    kind: Literal["asha", "fifo"] = "asha"
    """asha: stop a trial at a rung when it is below the rung's cut-off; fifo: run all to end."""
    grace_period: int = Field(1, ge=1)
    """Epochs before a trial can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)


class SearchConfig(StrictModel):
    algorithm: Literal["random", "optuna"] = "random"
    """random: Tune's variant generator (also does `grid`); optuna: TPE (`pip install optuna`)."""
    seed: int | None = 0


class ResourcesConfig(StrictModel):
    """Per-trial resources; None keeps the base config's ``scaling`` value. GPUs by config alone:
    ``use_gpu: true`` (one GPU per worker)."""

    num_workers: int | None = Field(None, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool | None = None
    trial_cpu: float = Field(0.01, gt=0)
    """The trial function only drives a TorchTrainer; it must not hold a whole CPU (STACK_NOTES)."""
    cpu_reserve: float = Field(0.0, ge=0)
    """CPUs to keep free beside the concurrent trials when checking that they fit (e.g. for Ray
    Data reads when ``materialize_datasets`` is false; materialized datasets need none)."""


class RegistryConfig(StrictModel):
    enabled: bool = True
    platform: str | None = None
    """Platform whose registered model gets the best trial (None: the metric's platform, or the
    single eval platform)."""
    model_name: str | None = None
    """Registered model name (None: ``recsys-<platform>``)."""
    min_improvement: float = Field(0.0, ge=0)
    """The challenger must beat the champion's validation score by more than this."""


class SweepFaultInjection(StrictModel):
    """Tests of resume: end the driver abruptly once this many trials have completed."""

    kill_driver_after_trials: int = Field(ge=1)


class SweepConfig(StrictModel):
    """Config of ``recsys tune`` / ``jobs.tune``."""

    name: str = Field(min_length=1)
    base_config: str
    """TrainJobConfig YAML every trial starts from."""
    base_overrides: list[str] = []
    """Dotted overrides applied to the base config before the sampled values."""
    base_values: dict[str, Any] = {}
    """Dotted base-config keys set to already-typed values after ``base_overrides`` (the
    pipeline gives its sweep its data, target platform and pretrained model here)."""
    search_space: dict[str, ParamSpec] = Field(min_length=1)
    """Dotted TrainJobConfig key -> spec, e.g. ``optim.lr: {kind: loguniform, low: 1e-4, ...}``."""
    metric: MetricConfig = MetricConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    search: SearchConfig = SearchConfig()
    num_samples: int = Field(4, ge=1)
    """Trials (with `grid` keys: repetitions of the whole grid, as in Tune)."""
    max_concurrent_trials: int = Field(1, ge=1)
    resources: ResourcesConfig = ResourcesConfig()
    registry: RegistryConfig = RegistryConfig()
    experiment: str = "recsys-tune"
    """MLflow experiment of the sweep's parent run and its trials' child runs."""
    output_dir: str = "runs/tune"
    """Tune state, trial runs, the result table and the best export go under output_dir/name."""
    resume: bool = True
    """Continue an interrupted sweep of the same name (Tuner.restore); false starts over."""
    fault_injection: SweepFaultInjection | None = None

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        problems = []
        for key in self.search_space:
            problem = check_key(key)
            if problem:
                problems.append(problem)
            if key in ("name", "output_dir", "resume", "mode"):
                problems.append(f"search_space.{key}: set by the sweep, not searchable")
        grids = [k for k, s in self.search_space.items() if s.kind == "grid"]
        if grids and self.search.algorithm != "random":
            problems.append(f"search_space {grids}: kind=grid needs search.algorithm=random "
                            f"(not {self.search.algorithm})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``Optional[X]``, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def check_key(key: str, root: type[BaseModel] = TrainJobConfig) -> str | None:
    """None if ``key`` (dotted) is a field of the training config, else a message naming it."""
    model: type[BaseModel] | None = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return f"search_space.{key}: '{'.'.join(parts[:i])}' is a value, not a section"
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "the training config"
            return (f"search_space.{key}: unknown key '{part}' in {where} "
                    f"(has: {', '.join(model.model_fields)})")
        model = _model_class(field.annotation)
    if model is not None:
        return f"search_space.{key}: is a section; name one of its fields"
    return None


def load_base(cfg: SweepConfig) -> TrainJobConfig:
    """The base training config (its file and overrides), validated, with absolute local paths
    (each trial runs in its own directory)."""
    try:
        base = load_config(TrainJobConfig, cfg.base_config, cfg.base_overrides,
                           cfg.base_values)
    except ConfigError as exc:
        raise ConfigError(f"sweep {cfg.name!r} base_config: {exc}") from None
    return with_absolute_paths(base)


def trial_config(base: TrainJobConfig, params: dict[str, Any], *, name: str, output_dir: str,
                 resources: ResourcesConfig, resume: bool) -> TrainJobConfig:
    """Base config + sampled values + the sweep's resources -> a validated training config."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        set_dotted(data, key, value)
    data.update(name=name, output_dir=output_dir, resume=resume)
    for field in ("num_workers", "cpus_per_worker", "use_gpu"):
        value = getattr(resources, field)
        if value is not None:
            data["scaling"][field] = value
    return TrainJobConfig.model_validate(data)


def validate_sweep(cfg: SweepConfig, source: str) -> TrainJobConfig:
    """Load the base config and check that every probe value of every key makes a valid training
    config (one key at a time); returns the base. Problems are collected and raised once."""
    base = load_base(cfg)
    problems = []
    for key, spec in cfg.search_space.items():
        for value in spec.probe_values():
            try:
                trial_config(base, {key: value}, name="probe", output_dir=cfg.output_dir,
                             resources=cfg.resources, resume=False)
            except ValidationError as exc:
                msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                problems.append(f"search_space.{key}={value!r}: {msgs}")
    metric_platform = cfg.metric.platform
    if metric_platform and base.eval_platforms and metric_platform not in base.eval_platforms:
        problems.append(f"metric.platform={metric_platform!r} is not in the base config's "
                        f"eval_platforms {base.eval_platforms}")
    if metric_platform and not base.eval_platforms and base.train_platforms \
            and metric_platform not in base.train_platforms:
        problems.append(f"metric.platform={metric_platform!r} is not evaluated: the base config "
                        f"evaluates its train_platforms {base.train_platforms}")
    if problems:
        raise ConfigError(f"invalid sweep {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return base


def load_sweep(path: str | Path, overrides: Iterable[str] | None = None,
               values: Mapping[str, Any] | None = None) -> SweepConfig:
    """Load a sweep YAML (+ dotted overrides: strings, then typed ``values``) and validate it
    with its base config."""
    cfg = load_config(SweepConfig, path, overrides, values)
    validate_sweep(cfg, str(path))
    return cfg
