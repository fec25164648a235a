"""``build_trainer(cfg)``: the one place a Ray ``TorchTrainer`` is assembled (jobs and Tune).

The driver resolves everything a worker needs (example datasets, item inputs with cached text
vectors, the transfer initialisation) and passes it by value or object reference; the worker
function re-validates the config and reads no module globals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.data.examples import ExampleSet, load_example_set
from recsys.training.config import TrainJobConfig
from recsys.training.items import ItemInputs, prepare_item_inputs

if TYPE_CHECKING:
    from recsys.tracking.runs import RunRef

log = logging.getLogger(__name__)


@dataclass
class TrainSetup:
    """What ``build_trainer`` resolved, kept for export and reporting after ``fit``."""

    cfg: TrainJobConfig
    example_set: ExampleSet
    train_platforms: list[str]
    eval_platforms: list[str]
    model_platforms: list[str]
    inputs: ItemInputs
    init: dict[str, Any] | None
    datasets: dict[str, Any] | None = None
    """Ray datasets (train, valid) read once and reused by every trainer built from this setup
    (a sweep's trials); None: ``build_trainer`` reads them."""


def training_datasets(setup: TrainSetup) -> dict[str, Any]:
    """The train split of the train platforms and the valid split of the eval platforms, as Ray
    datasets (materialised into the object store unless ``materialize_datasets`` is off)."""
    from ray.data import DataContext

    from recsys.data.feed import example_datasets
    from recsys.training.loop import _filter_users

    cfg = setup.cfg
    # One line per epoch from rank 0 is the progress display; Ray Data's per-operator bars
    # from the split coordinator would drown it (the context travels with the datasets).
    data_context = DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    datasets = example_datasets(setup.example_set, splits=("train",),
                                platforms=setup.train_platforms)
    datasets.update(example_datasets(setup.example_set, splits=("valid",),
                                     platforms=setup.eval_platforms))
    if cfg.user_fraction < 1:
        datasets["train"] = datasets["train"].map_batches(
            _filter_users, batch_format="pyarrow",
            fn_kwargs={"fraction": cfg.user_fraction, "seed": cfg.optim.seed})
    rates = platform_sampling(setup)
    if rates is not None:
        from recsys.data.feed import sample_platforms

        datasets["train"] = datasets["train"].map_batches(
            sample_platforms, batch_format="pyarrow",
            fn_kwargs={"rates": rates, "seed": cfg.optim.seed})
    if cfg.materialize_datasets:
        # Read and filter once into the object store; otherwise every epoch re-executes the
        # read (seconds per epoch on 2 cores, more than the training step on small data).
        datasets = {k: v.materialize() for k, v in datasets.items()}
    return datasets


def platform_sampling(setup: TrainSetup) -> dict[str, float] | None:
    """Copies per training row of each platform under ``optim.platform_temperature`` (None:
    no resampling, i.e. T = 1 or a single train platform)."""
    from recsys.data.feed import platform_rates, platform_shares

    temperature = setup.cfg.optim.platform_temperature
    rows = {p: setup.inputs.train_rows.get(p, 0) for p in setup.train_platforms}
    if temperature == 1 or len(rows) < 2:
        return None
    log.info("platform temperature %s: shares %s (rows %s)", temperature,
             {p: round(q, 3) for p, q in platform_shares(rows, temperature).items()}, rows)
    return platform_rates(rows, temperature)


def history_platforms(es: ExampleSet) -> list[str]:
    """Platforms whose items a history of the example set may hold: every platform of a
    cross-platform set (``data.sequences.cross_platform``), else none beyond the row's own."""
    return list(es.manifest.platforms) if es.manifest.config.sequences.cross_platform else []


def resolve_platforms(cfg: TrainJobConfig, es: ExampleSet,
                      init: dict[str, Any] | None) -> tuple[list[str], list[str], list[str]]:
    """Train, eval and model platforms. The model also knows the platforms that histories
    draw from (a cross-platform example set): their items are embedded with their own tables."""
    available = list(es.manifest.platforms)
    train = cfg.train_platforms or available
    evals = cfg.eval_platforms or train
    missing = sorted(set(train + evals) - set(available))
    if missing:
        raise ValueError(f"platform(s) {missing} are not in the example set {es.path} "
                         f"(it has {available})")
    known = list(init["platforms"]) if init else []
    wanted = dict.fromkeys(train + evals + history_platforms(es))
    model_platforms = known + [p for p in wanted if p not in known]
    return train, evals, model_platforms


def load_init(path: str | Path) -> dict[str, Any]:
    """An export to start from: config, platforms, vocabulary, weights. A pretrain export, or
    a transfer export (a champion: ``transfer.warm_start: champion`` in the pipeline), whose
    per-platform tables, item ids and repeat bias come along; only a fine-tuned text encoder
    does not (the run loads ``data.text.encoder``, and says so)."""
    from safetensors.torch import load_file

    from recsys.model.export import read_meta
    from recsys.model.features import FeatureVocab

    path = Path(path)
    meta = read_meta(path)
    if meta.vocab is None:
        raise ValueError(f"{path}: the export has no feature vocabulary to transfer from")
    if meta.has_encoder:
        log.warning("%s: its fine-tuned text encoder is not carried over; the run starts from "
                    "data.text.encoder (towers and tables are carried over)", path)
    return {
        "config": meta.architecture,
        "platforms": meta.platforms,
        "vocab": FeatureVocab.from_dict(meta.vocab),
        "state_dict": load_file(str(path / "model.safetensors")),
    }


def prepare(cfg: TrainJobConfig) -> TrainSetup:
    es = load_example_set(cfg.data.examples)
    init = load_init(cfg.transfer.init_from) if cfg.mode == "transfer" else None
    train, evals, model_platforms = resolve_platforms(cfg, es, init)
    platforms = list(dict.fromkeys(train + evals + history_platforms(es)))
    inputs = prepare_item_inputs(
        es, platforms, platform_ids={p: model_platforms.index(p) for p in platforms},
        encoder=cfg.data.text.encoder, max_tokens=cfg.data.text.max_tokens,
        cache_dir=cfg.encoder.cache_dir, with_vectors=not cfg.finetunes_encoder,
        with_tokens=cfg.finetunes_encoder,
        vocab=init["vocab"] if init else None,
        user_fraction=cfg.user_fraction, seed=cfg.optim.seed)
    return TrainSetup(cfg, es, train, evals, model_platforms, inputs, init)


def check_private(setup: TrainSetup) -> None:
    """Refuse, on the driver and before any worker starts, a private run whose guarantee would
    not hold: several platforms, cross-platform histories, or a model that trains parameters
    outside the per-user computation (``recsys.training.privacy``)."""
    from recsys.training.model_setup import build_model
    from recsys.training.privacy import check_per_user_model, check_private_setup

    check_private_setup(setup.train_platforms, bool(history_platforms(setup.example_set)))
    check_per_user_model(build_model(setup.cfg, setup.inputs, setup.init,
                                     setup.model_platforms))


def controller_env() -> None:
    """Ray Train V2 settings for the controller this process is about to start (Train copies
    them from this process's environment; an explicit setting wins). The controller polls its
    workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (default 2 s), which is also how late it
    notices that training ended: ~2 s per run, per sweep trial. On the private loopback cluster
    (one machine, no spot nodes) the preemption watcher is one more actor process per run for
    nothing; on a real cluster it stays on."""
    import os

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized() and ray.util.get_node_ip_address() == "127.0.0.1":
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def build_trainer(cfg: TrainJobConfig, setup: TrainSetup | None = None,
                  tracking: RunRef | Mapping[str, str] | None = None, resume: bool = True,
                  callbacks: list[Any] | None = None) -> Any:
    """A ``TorchTrainer`` for this config. ``tracking``: the run rank 0 logs epochs to (a
    ``{"uri", "run_id"}`` mapping is still accepted); ``callbacks``: Ray Train user callbacks
    (a Tune trial passes ``TuneReportCallback``)."""
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys.data.feed import SPLIT_DATASETS
    from recsys.training.loop import METRIC, WorkerConfig, train_loop_per_worker

    controller_env()
    setup = setup or prepare(cfg)
    if cfg.privacy.enabled:
        check_private(setup)
    datasets = setup.datasets if setup.datasets is not None else training_datasets(setup)
    if tracking is not None:
        from recsys.tracking.runs import RunRef

        if not isinstance(tracking, RunRef):
            tracking = RunRef(**tracking)
    loop_config = WorkerConfig(
        cfg=cfg, items_ref=ray.put(setup.inputs),
        platform_ids={p: setup.model_platforms.index(p) for p in setup.inputs.items},
        model_platforms=setup.model_platforms,
        init_state=({"config": setup.init["config"], "state_dict": setup.init["state_dict"]}
                    if setup.init else None),
        tracking=tracking).to_loop_config()
    on_gpu = cfg.scaling.use_gpu
    storage = Path(cfg.output_dir).resolve() if "://" not in cfg.output_dir else cfg.output_dir
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=on_gpu,
            resources_per_worker=None if on_gpu else {"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(SPLIT_DATASETS)),
        run_config=RunConfig(
            name=cfg.name, storage_path=str(storage), callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max")),
    )
