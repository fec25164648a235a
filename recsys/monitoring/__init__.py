"""Drift and quality monitoring of the served platforms (``python -m jobs.monitor``).

``config`` (the schema), ``drift`` (pure statistics), ``windows`` (reference vs current events
and feedback), ``champion`` (the champion and its NDCG@10 on new logs), ``monitor`` (``check``,
``watch``), ``report`` (HTML, PNG, MLflow). The serving endpoint's own metrics (Prometheus) are
``recsys.serving.metrics``: docs/monitoring.md covers both.
"""
