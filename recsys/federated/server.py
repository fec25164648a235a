"""The federated server: a plain loop of rounds over Ray actor clients, one per platform.

Why Ray actors and not Flower: ``flwr[simulation]`` 1.42 (whose simulation runtime runs on
Ray) pins ``ray==2.55.1`` (and fastapi 0.138 / starlette 1.3), while this project pins Ray 2.60
(Train V2, Serve, Data); installing it would downgrade the cluster under every other job. The
protocol is small enough to own: each round the server puts the global shared weights in the
object store, every client (:class:`recsys.federated.client.PlatformClient`, an actor holding
only its own platform's rows) trains locally and returns safetensors bytes of its delta; the
server checks every payload (:func:`recsys.federated.payload.inspect_payload`), aggregates
(:class:`recsys.federated.aggregate.Server`) and logs the round. The best round by the
clients' own validation scores is exported in pooled pretraining's format.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recsys.federated.aggregate import Server, client_dp_epsilon
from recsys.federated.client import ClientUpdate, PlatformClient
from recsys.federated.config import FederatedJobConfig
from recsys.federated.payload import (
    densify,
    deserialize,
    inspect_payload,
    sent_shapes,
    serialize,
    shared_names,
)
from recsys.logs import WORKER_CONSOLE

if TYPE_CHECKING:
    from recsys.evaluation.report import EvalReport
    from recsys.tracking.runs import RunRef

log = logging.getLogger(__name__)


@dataclass
class FederatedOutcome:
    export_dir: Path
    rounds: list[dict[str, float]]
    """One entry per round: losses, validation, bytes up and down, seconds."""
    best_round: int
    best_metric: float
    report: EvalReport | None
    run_id: str | None
    tracking_uri: str | None
    seconds: float
    bytes_up_per_round: float
    bytes_down_per_round: float
    privacy: dict[str, float] = field(default_factory=dict)


def run_dir(cfg: FederatedJobConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def client_platforms(cfg: FederatedJobConfig, es: Any) -> list[str]:
    available = list(es.manifest.platforms)
    platforms = cfg.platforms or available
    missing = sorted(set(platforms) - set(available))
    if missing:
        raise ValueError(f"platforms {missing} are not in the example set {es.path} "
                         f"(it has {available})")
    if es.manifest.config.sequences.cross_platform:
        raise ValueError(f"{es.path} has cross-platform histories (one shop's rows hold other "
                         "shops' events): not a federated partition; build the example set with "
                         "data.sequences.cross_platform=false")
    return list(platforms)


def start_clients(cfg: FederatedJobConfig, platforms: list[str], vocab: dict[str, Any]
                  ) -> dict[str, Any]:
    """One actor per platform; each reads its own rows inside its process."""
    import ray

    actor = ray.remote(num_cpus=cfg.federated.cpus_per_client)(PlatformClient)
    job = cfg.model_dump(mode="json")
    return {p: actor.remote(job, p, platforms, vocab) for p in platforms}


def run_round(clients: dict[str, Any], global_payload: bytes, round_: int
              ) -> dict[str, ClientUpdate]:
    import ray

    ref = ray.put(global_payload)
    updates = ray.get([c.fit.remote(ref, round_) for c in clients.values()])
    return dict(zip(clients, updates, strict=True))


def validate_round(clients: dict[str, Any], global_payload: bytes) -> dict[str, float]:
    """Mean validation NDCG@10 over all clients' users, from each client's two numbers."""
    import ray

    ref = ray.put(global_payload)
    scores = dict(zip(clients, ray.get([c.evaluate.remote(ref) for c in clients.values()]),
                      strict=True))
    users = sum(n for n, _ in scores.values())
    out = {f"valid_ndcg@10/{p}": s for p, (n, s) in scores.items() if n}
    out["valid_ndcg@10"] = sum(n * s for n, s in scores.values()) / users if users else 0.0
    return out


def run_federated(cfg: FederatedJobConfig) -> FederatedOutcome:
    """Rounds of local training and aggregation; export the best round; evaluate; log."""
    import ray

    from recsys.data.examples import load_example_set
    from recsys.federated.export import catalog_inputs, write_export
    from recsys.training.loop import seed_everything
    from recsys.training.model_setup import build_model

    started = time.perf_counter()
    es = load_example_set(cfg.data.examples)
    platforms = client_platforms(cfg, es)
    inputs = catalog_inputs(es, platforms, cfg)
    seed_everything(cfg.optim.seed)
    model = build_model(cfg.train_config(), inputs, None, platforms)
    state = model.state_dict()
    names = shared_names(state)
    allowed = sent_shapes(state)
    f = cfg.federated
    server = Server(f, {k: state[k].detach().clone() for k in names},
                    generator=torch.Generator().manual_seed(cfg.optim.seed)
                    if not f.client_dp.enabled else None)  # DP noise: OS entropy, not the seed
    clients = start_clients(cfg, platforms, inputs.vocab.to_dict())
    rounds: list[dict[str, float]] = []
    best, best_round, best_weights = -1.0, -1, dict(server.weights)
    privacy: dict[str, float] = {}
    try:
        with _tracked(cfg, platforms) as run:
            for r in range(f.rounds):
                t0 = time.perf_counter()
                down = serialize(server.weights)
                updates = run_round(clients, down, r)
                dense = []
                for p, u in updates.items():
                    problems = inspect_payload(u.payload, allowed)
                    if problems:
                        raise ValueError(f"client {p} sent more than model updates: {problems}")
                    dense.append(densify(deserialize(u.payload), platforms.index(p), state))
                stats = server.step(dense, [u.num_rows for u in updates.values()])
                metrics = _round_metrics(r, updates, len(down), stats)
                if f.client_dp.enabled:
                    privacy = {"client_dp_epsilon": client_dp_epsilon(
                        f.client_dp.noise_multiplier, r + 1, f.client_dp.delta),
                        "client_dp_delta": f.client_dp.delta,
                        "client_dp_noise_multiplier": f.client_dp.noise_multiplier,
                        "client_dp_clip": f.client_dp.clip}
                    metrics.update(privacy)
                last = r == f.rounds - 1
                if f.validate_every and ((r + 1) % f.validate_every == 0 or last):
                    metrics.update(validate_round(clients, serialize(server.weights)))
                score = metrics.get("valid_ndcg@10", float(r))  # none: the last round wins
                if score > best:
                    best, best_round, best_weights = score, r, dict(server.weights)
                metrics["round_seconds"] = time.perf_counter() - t0
                rounds.append(metrics)
                _log_round(cfg, run, metrics)
            model.load_state_dict(best_weights, strict=False)
            summary = {"federated_rounds": float(f.rounds), "federated_best_round": best_round,
                       "federated_clients": float(len(platforms)),
                       "bytes_up_per_round": _mean(rounds, "bytes_up"),
                       "bytes_down_per_round": _mean(rounds, "bytes_down"), **privacy}
            if f.validate_every:
                summary["valid_ndcg@10"] = best
            export = write_export(run_dir(cfg) / "export", cfg, es, inputs, model, summary)
            report = _evaluate(cfg, export, es, platforms, rounds, run) \
                if f.evaluate_test else None
    finally:
        for c in clients.values():
            ray.kill(c)
    return FederatedOutcome(
        export, rounds, best_round, best, report, None if run is None else run.run_id,
        None if run is None else run.uri, time.perf_counter() - started,
        summary["bytes_up_per_round"], summary["bytes_down_per_round"], privacy)


def _round_metrics(r: int, updates: dict[str, ClientUpdate], down_bytes: int,
                   stats: dict[str, float]) -> dict[str, float]:
    rows = sum(u.num_rows for u in updates.values())
    out = {"round": float(r),
           "train_loss": sum(u.train_loss * u.num_rows for u in updates.values()) / rows,
           "bytes_up": float(sum(len(u.payload) for u in updates.values())),
           "bytes_down": float(down_bytes * len(updates)),
           "client_seconds_max": max(u.seconds for u in updates.values()),
           "client_steps": float(sum(u.steps for u in updates.values())), **stats}
    for p, u in updates.items():
        out[f"bytes_up/{p}"] = float(len(u.payload))
        out[f"train_loss/{p}"] = u.train_loss
    return out


def _mean(rounds: list[dict[str, float]], key: str) -> float:
    return sum(m[key] for m in rounds) / max(len(rounds), 1)


def _evaluate(cfg: FederatedJobConfig, export: Path, es: Any, platforms: list[str],
              rounds: list[dict[str, float]], run: RunRef | None) -> EvalReport:
    from recsys.evaluation.offline import evaluate_export
    from recsys.evaluation.report import write_report
    from recsys.model.export import load_export

    curve = [{"epoch": m["round"], "train_loss": m["train_loss"],
              **({"valid_ndcg@10": m["valid_ndcg@10"]} if "valid_ndcg@10" in m else {})}
             for m in rounds]
    report = evaluate_export(load_export(export), es, split="test", platforms=platforms,
                             run=cfg.name, user_fraction=cfg.user_fraction, seed=cfg.optim.seed,
                             curves=curve, meta={"mode": "federated",
                                                 "strategy": cfg.federated.algorithm})
    files = write_report(report, run_dir(cfg) / "report")
    if run is not None:
        from recsys.tracking import runs
        from recsys.training.run import flat_test_metrics

        runs.log_metrics(run.uri, run.run_id, flat_test_metrics(report), step=len(rounds))
        runs.log_artifacts(run.uri, run.run_id, files["json"].parent, "report")
    return report


def _log_round(cfg: FederatedJobConfig, run: RunRef | None, m: dict[str, float]) -> None:
    print(f"{WORKER_CONSOLE}{cfg.name}  round {int(m['round']):3d}  loss {m['train_loss']:.4f}  "
          f"valid_ndcg@10 {m.get('valid_ndcg@10', float('nan')):.4f}  up {m['bytes_up'] / 1e6:.2f}"
          f" MB  down {m['bytes_down'] / 1e6:.2f} MB  {m['round_seconds']:.1f}s",
          file=sys.__stdout__, flush=True)
    if run is not None:
        from recsys.tracking.runs import log_metrics

        log_metrics(run.uri, run.run_id, m, step=int(m["round"]))


@contextmanager
def _tracked(cfg: FederatedJobConfig, platforms: list[str]) -> Iterator[RunRef | None]:
    """The job's MLflow run (None with ``tracking.enabled=false``: MLflow is not imported)."""
    if not cfg.tracking.enabled:
        yield None
        return
    from recsys.settings import get_settings
    from recsys.tracking import runs
    from recsys.tracking.server import ensure_experiment, ensure_tracking

    uri = ensure_tracking(get_settings())
    ensure_experiment(uri, cfg.tracking.experiment)
    f = cfg.federated
    tags = {"mode": "federated", "strategy": f.algorithm, "clients": ",".join(platforms),
            "privacy": "client-dp" if f.client_dp.enabled else "none"}
    with runs.tracked_run(uri, cfg.tracking.experiment, cfg.name, tags=tags) as run:
        runs.log_config(uri, run.run_id, cfg.model_dump(mode="json"))
        runs.log_system_info(uri, run.run_id)
        yield run
