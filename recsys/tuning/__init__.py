"""Hyperparameter sweeps with Ray Tune over the training job (``recsys tune``, ``jobs.tune``).

``config`` (the sweep schema), ``trial`` (one trial = one ``build_trainer`` run), ``sweep``
(``run_sweep`` -> ``SweepOutcome``: Tune, MLflow parent/child runs, results, registry), ``plots``.
"""
