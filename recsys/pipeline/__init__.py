"""The end-to-end job: ingest -> examples -> pretrain -> transfer (+ scratch baselines) ->
evaluate -> sweep -> register -> deploy -> smoke.

Each stage is a function of its config and of what earlier stages recorded. A stage runs only
when the fingerprint of its inputs (its config plus the content of what it reads, see
:mod:`recsys.pipeline.state`) differs from the one recorded at its last success, so a second
run with nothing new does nothing, and new logs for one platform re-run only what reads that
platform. ``stages`` picks stages, ``skip`` leaves some out, ``force`` re-runs them anyway;
a stage run alone takes its inputs from the typed record of the earlier ones.

Layout, read in this order: ``config`` (the schema), ``state`` (fingerprints and
``state.json``), ``outputs`` (what each stage records and a run returns), ``context`` (what
the stages share), ``stages/`` (the stage functions), ``runner`` (``run_pipeline`` and the
summary). Stage modules import Ray, MLflow and the trainer inside their functions, so
importing this package stays light (the docs generator and config tests do).
"""

from recsys.pipeline.config import PipelineConfig
from recsys.pipeline.runner import load_pipeline_config, run_pipeline

__all__ = ["PipelineConfig", "load_pipeline_config", "run_pipeline"]
