"""The ``pretrain`` stage as federated training (``federated.enabled: true``): the pretrain
platforms are clients, and the run is recorded under the ``pretrain`` key with the pooled run's
output type, so transfer, sweep and register read it unchanged."""

from __future__ import annotations

from recsys.config import load_config
from recsys.pipeline.context import Context, train_output_dir
from recsys.pipeline.outputs import TrainOutput
from recsys.pipeline.state import Recorded


def federated_pretrain(ctx: Context, platforms: list[str]) -> Recorded[TrainOutput]:
    """Run the federated job unless its inputs are unchanged; returns its recorded outputs."""
    from recsys.cluster import init_ray
    from recsys.federated.config import FederatedJobConfig
    from recsys.federated.server import run_dir, run_federated

    f = ctx.cfg.federated
    cfg = load_config(FederatedJobConfig, f.config, values={
        **f.overrides, "name": "pretrain-federated", "data": ctx.cfg.data.model_dump(),
        "platforms": platforms,
        # Local even with RECSYS_STORAGE_PATH: the federated server writes its export itself
        # and keeps no Ray Train storage.
        "output_dir": train_output_dir(ctx, shared=False),
        "tracking.enabled": ctx.cfg.tracking, "tracking.experiment": ctx.cfg.name})
    inputs = {"config": cfg.model_dump(mode="json", exclude={"tracking"}),
              **{f"lake/{p}": ctx.lake_fp(p) for p in platforms}}
    export = run_dir(cfg) / "export"
    if ctx.needed("pretrain", "pretrain", inputs, [export / "export.json"], TrainOutput):
        init_ray(num_cpus=ctx.cfg.ray.num_cpus)
        print(f"--- pretrain: federated {cfg.name} over clients {platforms}", flush=True)
        out = run_federated(cfg)
        ctx.finish("pretrain", TrainOutput.model_validate({
            "export": str(out.export_dir), "best_valid_ndcg@10": max(out.best_metric, 0.0),
            "report": str(out.export_dir.parent / "report" / "report.json"),
            "mlflow_run_id": out.run_id, "model_uri": None, "epochs": len(out.rounds),
            "seconds": out.seconds}), out.seconds)
    return ctx.recorded("pretrain", TrainOutput)
