"""A training job from the driver's side: track, fit, export, evaluate, log.

Rank-dependent side effects live here (the driver) and in ``loop._rank0_log`` (rank 0); the
registry is written by the driver from the result's checkpoint, never by a worker.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recsys.evaluation.offline import evaluate_export
from recsys.evaluation.report import EvalReport, write_report
from recsys.model.encoder import merge_lora
from recsys.model.encoder_cache import encode_device
from recsys.model.export import ExportedItems, ExportInfo, load_export, save_export
from recsys.model.features import token_batch
from recsys.model.recommender import Recommender
from recsys.settings import get_settings
from recsys.training.checkpoints import CHECKPOINT_ERRORS
from recsys.training.config import TrainJobConfig
from recsys.training.engine import TrainState, consolidated_state_dict
from recsys.training.loop import METRIC
from recsys.training.model_setup import build_model
from recsys.training.trainer import TrainSetup, build_trainer, prepare

if TYPE_CHECKING:
    from recsys.tracking.runs import RunRef

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    export_dir: Path
    report: EvalReport
    best_metric: float
    curve: list[dict[str, float]]
    run_id: str | None
    tracking_uri: str | None
    seconds: float
    model_uri: str | None = None
    """The MLflow model logged by the run (``models:/<id>``), to register it later."""


def run_dir(cfg: TrainJobConfig) -> Path:
    """The run's local directory (export, report): ``output_dir/name``, or for a URI
    ``output_dir`` (``s3://bucket/path``, where Ray Train keeps the checkpoints) the URI's
    mirror ``<work_dir>/train/s3/bucket/path/name`` (two runs of one name under different
    URIs, e.g. two pipelines, keep apart)."""
    if "://" in cfg.output_dir:
        scheme, rest = cfg.output_dir.split("://", 1)
        return Path(get_settings().work_dir) / "train" / scheme / rest.strip("/") / cfg.name
    return Path(cfg.output_dir) / cfg.name


def export_checkpoint(setup: TrainSetup, checkpoint_dir: Path, out: Path,
                      metrics: dict[str, Any],
                      state: dict[str, torch.Tensor] | None = None,
                      privacy: dict[str, Any] | None = None) -> Path:
    """Consolidate a (DDP or DeepSpeed) checkpoint into a serving export (``state``: its
    weights, when the caller has loaded them already; ``privacy``: a private run's card)."""
    cfg = setup.cfg
    state = consolidated_state_dict(checkpoint_dir) if state is None else state
    # Rebuilt exactly as the workers built it (a transfer model is grown from its init).
    init = ({"config": setup.init["config"], "state_dict": setup.init["state_dict"]}
            if setup.init else None)
    model: Recommender = build_model(cfg, setup.inputs, init, setup.model_platforms)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint_dir}: checkpoint does not match the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    if model.text_encoder is not None and cfg.transfer.strategy == "lora":
        model.text_encoder = merge_lora(model.text_encoder)
    inputs = {**setup.inputs.items, **_source_platform_items(setup)}
    items = {name: ExportedItems(platform=name, platform_id=pi.platform_id,
                                 item_ids=_item_ids(setup, name), brand_ids=pi.brand_ids,
                                 category_ids=pi.category_ids,
                                 text_vecs=pi.text_vecs if pi.text_vecs is not None
                                 else _encode_catalog(model, pi.token_ids, cfg))
             for name, pi in inputs.items()}
    meta = ExportInfo(
        platforms=setup.model_platforms,
        platforms_with_items=list(items),
        vocab=setup.inputs.vocab.to_dict(),
        encoder=cfg.data.text.encoder,
        max_tokens=cfg.data.text.max_tokens,
        train_config=cfg.model_dump(mode="json"),
        mode=cfg.mode,
        strategy=cfg.transfer.strategy,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        example_set=str(setup.example_set.path),
        input_fingerprint=setup.example_set.manifest.input_fingerprint,
        data_until={p: c.last_event for p, c in setup.example_set.manifest.platforms.items()
                    if c.last_event is not None},
        privacy=privacy,
    )
    catalogs = {p: setup.example_set.path / "catalog" / f"{p}.parquet" for p in items}
    return save_export(out, model, model.state_dict() | state, meta, items, catalogs,
                       ann_threshold=cfg.ann_threshold)


def _source_platform_items(setup: TrainSetup) -> dict[str, Any]:
    """Item inputs of the model's other platforms (a transfer model's pretrain platforms) that
    the example set has: exported beside the target's so that serving can embed a user's history
    from those platforms (a user new here but known there). The vocabulary is frozen: those
    catalogs were in it when the model was pretrained."""
    from recsys.training.items import prepare_item_inputs

    cfg = setup.cfg
    available = setup.example_set.manifest.platforms
    extra = [p for p in setup.model_platforms if p not in setup.inputs.items and p in available]
    if not extra:
        return {}
    return prepare_item_inputs(
        setup.example_set, extra,
        platform_ids={p: setup.model_platforms.index(p) for p in extra},
        encoder=cfg.data.text.encoder, max_tokens=cfg.data.text.max_tokens,
        cache_dir=cfg.encoder.cache_dir, with_vectors=not cfg.finetunes_encoder,
        with_tokens=cfg.finetunes_encoder,
        vocab=setup.inputs.vocab.freeze()).items


@torch.inference_mode()
def _encode_catalog(model: Recommender, token_ids: list[np.ndarray] | None,
                    cfg: TrainJobConfig) -> np.ndarray:
    """Text vectors (N+1, H) of a catalog through the fine-tuned encoder, once, at export:
    serving then never runs the encoder for recommendations."""
    if model.text_encoder is None or token_ids is None:
        raise ValueError("no cached text vectors and no fine-tuned encoder to compute them")
    model.eval()
    device = encode_device()
    encoder = model.text_encoder.to(device)
    bs = cfg.encoder.encode_batch_size
    chunks = []
    try:
        for i in range(1, len(token_ids), bs):
            input_ids, mask = token_batch(token_ids[i:i + bs])
            chunks.append(encoder(input_ids.to(device), mask.to(device)).float().cpu().numpy())
    finally:
        model.text_encoder.to("cpu")
    vecs = np.concatenate(chunks) if chunks else np.zeros((0, model.config["text_dim"]))
    return np.concatenate([np.zeros((1, vecs.shape[1]), np.float32), vecs.astype(np.float32)])


def _item_ids(setup: TrainSetup, platform: str) -> list[str]:
    import pyarrow.parquet as pq

    cat = pq.read_table(setup.example_set.path / "catalog" / f"{platform}.parquet",
                        columns=["item_id"])
    return cat["item_id"].to_pylist()


def run_training(cfg: TrainJobConfig) -> TrainOutcome:
    """Fit with Ray Train, export the best checkpoint, evaluate it on the test split. With
    tracking, all of it happens inside one MLflow run, which ends FAILED if any step raises."""
    started = time.perf_counter()
    if not cfg.resume:
        _start_over(cfg)
    check_resume_config(cfg)
    setup = prepare(cfg)
    log.info("platforms: train %s, eval %s; encoder cache %s", setup.train_platforms,
             setup.eval_platforms, setup.inputs.cache_stats)
    model_uri = None
    with _tracked(cfg) as run:
        result = build_trainer(cfg, setup, run).fit()
        export = _export_best(setup, result, run_dir(cfg) / "export")
        curve = _curve(result)
        report = evaluate_export(load_export(export), setup.example_set, split="test",
                                 platforms=setup.eval_platforms, run=cfg.name,
                                 user_fraction=cfg.user_fraction, seed=cfg.optim.seed,
                                 curves=curve,
                                 meta={"mode": cfg.mode, "strategy": cfg.transfer.strategy})
        files = write_report(report, run_dir(cfg) / "report")
        if run is not None:
            from recsys.tracking import runs

            # The model first, at its best epoch (MLflow copies that epoch's metrics onto it),
            # then the test metrics, on the run and on the model.
            model_uri = _log_model(run.uri, run.run_id, export)
            runs.log_metrics(run.uri, run.run_id, flat_test_metrics(report), step=len(curve),
                             model_id=runs.logged_model_id(model_uri))
            runs.log_artifacts(run.uri, run.run_id, files["json"].parent, "report")
    best_metric = max((p.get(METRIC, 0.0) for p in curve), default=float("nan"))
    return TrainOutcome(export, report, best_metric, curve,
                        None if run is None else run.run_id, None if run is None else run.uri,
                        time.perf_counter() - started, model_uri)


@contextmanager
def _tracked(cfg: TrainJobConfig) -> Iterator[RunRef | None]:
    """The job's MLflow run with its config and system tags (None: tracking is off, and MLflow
    is not even imported)."""
    if not cfg.tracking.enabled:
        yield None
        return
    from recsys.tracking import runs
    from recsys.tracking.server import ensure_experiment, ensure_tracking

    uri = ensure_tracking(get_settings())
    ensure_experiment(uri, cfg.tracking.experiment)
    tags = {"mode": cfg.mode, "strategy": cfg.transfer.strategy, "engine": cfg.scaling.engine,
            "privacy": "dp-sgd" if cfg.privacy.enabled else "none"}
    with runs.tracked_run(uri, cfg.tracking.experiment, cfg.name, tags=tags) as run:
        runs.log_config(uri, run.run_id, cfg.model_dump(mode="json"))
        runs.log_system_info(uri, run.run_id)
        yield run


def _start_over(cfg: TrainJobConfig) -> None:
    """Ray Train resumes a run of the same name and storage; remove it to start fresh (for a
    URI ``output_dir``, its ``<output_dir>/<name>`` there too, through pyarrow)."""
    if "://" in cfg.output_dir:
        from pyarrow import fs

        uri = f"{cfg.output_dir.rstrip('/')}/{cfg.name}"
        store, where = fs.FileSystem.from_uri(uri)
        if store.get_file_info(where).type != fs.FileType.NotFound:
            log.warning("resume=false: removing the previous run at %s", uri)
            store.delete_dir(where)
    path = run_dir(cfg)
    if path.exists():
        log.warning("resume=false: removing the previous run at %s", path)
        shutil.rmtree(path)


RESUME_CONFIG = "resume_config.json"
RESUMABLE = ("name", "resume", "output_dir", "optim.epochs", "optim.early_stopping_patience",
             "optim.min_epochs", "tracking", "fault_injection", "scaling.max_failures",
             "scaling.cpus_per_worker", "scaling.placement_strategy", "materialize_datasets",
             "encoder.cache_dir", "encoder.encode_batch_size")
"""Config keys (and sections) a resumed run may change: how long it trains and when it stops
early, where it logs, its cluster placement and caches. Any other change (data, platforms,
model, loss, learning rates, seed, engine, worker count, GPU or not) would continue the
checkpoint's weights, optimizer state and data order under settings they were not made with,
and mix two configs in one learning curve."""


def resume_fingerprint(cfg: TrainJobConfig) -> dict[str, Any]:
    """The config values a resumed run must keep, as flat ``section.key`` entries."""
    flat = _flatten(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items()
            if not any(k == r or k.startswith(f"{r}.") for r in RESUMABLE)}


def check_resume_config(cfg: TrainJobConfig) -> None:
    """Refuse to resume a run from checkpoints made under another config (naming the keys that
    differ); otherwise record this config in the run directory (``resume_config.json``) for the
    next resume to check."""
    from pyarrow.fs import FileSelector, FileType

    fs, run = _run_storage(cfg)
    entries = fs.get_file_info(FileSelector(run, allow_not_found=True))
    has_checkpoint = any(e.type == FileType.Directory and e.base_name.startswith("checkpoint_")
                         for e in entries)
    current = resume_fingerprint(cfg)
    path = f"{run}/{RESUME_CONFIG}"
    if has_checkpoint and fs.get_file_info(path).type == FileType.File:
        with fs.open_input_stream(path) as f:
            recorded = json.loads(f.read())
        changed = sorted(k for k in recorded.keys() | current.keys()
                         if recorded.get(k) != current.get(k))
        if changed:
            what = "; ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}"
                             for k in changed[:20])
            raise ValueError(
                f"run {cfg.name!r} at {run} has checkpoints made under another config "
                f"({what}); resuming would continue them under settings they were not made "
                f"with. Start over with resume=false (deletes that run's checkpoints), or train "
                f"under a new name=...; a resume may change only {', '.join(RESUMABLE)}")
    fs.create_dir(run, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(current, indent=1, sort_keys=True).encode())


def _run_storage(cfg: TrainJobConfig) -> tuple[Any, str]:
    """The filesystem and path of the run's Ray Train storage (``output_dir/name``; local or a
    URI such as ``s3://``), as ``pyarrow.fs`` sees it: the same storage Ray Train writes."""
    from pyarrow import fs

    if "://" in cfg.output_dir:
        filesystem, root = fs.FileSystem.from_uri(cfg.output_dir)
    else:
        filesystem, root = fs.LocalFileSystem(), str(Path(cfg.output_dir).resolve())
    return filesystem, f"{root.rstrip('/')}/{cfg.name}"


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _export_best(setup: TrainSetup, result: Any, out: Path) -> Path:
    """Export the best-scoring checkpoint that loads; one that does not (truncated, corrupt) is
    passed over with a warning for the next best, as a resume passes over a broken latest one."""
    failed: list[str] = []
    for checkpoint in _checkpoints_by_score(result):
        with checkpoint.as_directory() as d:
            try:
                state = consolidated_state_dict(Path(d))
            except CHECKPOINT_ERRORS as e:
                failed.append(f"{checkpoint.path}: {type(e).__name__}: {e}")
                log.warning("checkpoint does not load, exporting the next best: %s", failed[-1])
                continue
            # The metrics reported with this checkpoint (its epoch), not the last epoch's.
            metrics = next((m for c, m in result.best_checkpoints or [] if c is checkpoint),
                           result.metrics or {})
            # Only a private run has accounting to carry (reading it opens the latest one).
            privacy = _final_privacy(result) if setup.cfg.privacy.enabled else None
            return export_checkpoint(setup, Path(d), out, metrics, state=state,
                                     privacy=privacy)
    raise RuntimeError("no checkpoint of this run loads: " + "; ".join(failed))


def _checkpoints_by_score(result: Any) -> list[Any]:
    """The run's kept checkpoints, best validation score first (the latest alone if none has
    a score)."""
    scored = sorted(((m.get(METRIC, -1.0), c) for c, m in (result.best_checkpoints or [])),
                    key=lambda t: t[0], reverse=True)
    if scored:
        return [c for _, c in scored]
    if result.checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint (error: {result.error})")
    return [result.checkpoint]


def _curve(result: Any) -> list[dict[str, float]]:
    """Per-epoch learning curve, from the latest checkpoint's training state: it spans every
    epoch of the run, including those before a resume or a worker restart."""
    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as d:
        state = TrainState.read(Path(d))
    return [dict(p) for p in state.curve]


def _final_privacy(result: Any) -> dict[str, Any] | None:
    """A private run's accounting after its last epoch (None: not private). The exported
    checkpoint may be an earlier one, but it was chosen by looking at every epoch's model, so
    the whole run's epsilon is the one that holds for it."""
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        return TrainState.read(Path(d)).privacy


def flat_test_metrics(report: EvalReport) -> dict[str, float]:
    """The test metrics under their one MLflow spelling (``test_ndcg_at_10/<platform>``)."""
    from recsys.tracking.metric_names import metric_key

    out = {}
    for name, res in report.platforms.items():
        for k, v in res.metrics.items():
            if v is not None and not (isinstance(v, float) and np.isnan(v)):
                out[metric_key("test", k, name)] = float(v)
        if res.auc is not None:
            out[metric_key("test", "ctr_auc", name)] = float(res.auc)
    return out


def _log_model(uri: str, run_id: str, export: Path) -> str:
    from recsys.tracking import runs

    return runs.log_recommender(uri, run_id, export)
