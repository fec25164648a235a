"""What a registered model and its versions say about themselves on their MLflow pages.

Why: a data scientist opening ``recsys-shop_c`` in the registry should read what the model is,
what it was trained on and how, and how well it ranks, without digging through runs. A version
gets a Markdown description (platforms, data, training, best epoch, test metrics) and its test
metrics as tags (``test_ndcg_at_10/shop_c``, the spelling of ``recsys.tracking.metric_names``),
so whichever version serves as ``@champion`` shows its test metrics on its own page. The numbers
come from the version's LoggedModel (best-epoch validation and test metrics, logged by
``recsys.training.run``) and from the export it serves (``export.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from recsys.tracking.metric_names import mlflow_key
from recsys.tracking.runs import client as _client
from recsys.tracking.runs import logged_model_id

CARD_MARK = "<!-- recsys model card -->"
"""Starts every description written here: one a person wrote by hand is never overwritten."""
TEST_PREFIX = "test_"
BEST_EPOCH_TAG = "best_epoch"


def model_metrics(c: MlflowClient, source: str) -> dict[str, float]:
    """The latest value of each metric of the LoggedModel behind a version's ``source``
    (``models:/<model_id>``); empty for a version registered from elsewhere."""
    model_id = logged_model_id(source)
    if model_id is None:
        return {}
    latest: dict[str, Any] = {}
    for m in c.get_logged_model(model_id).metrics or []:
        if m.key not in latest or (m.step, m.timestamp) >= (latest[m.key].step,
                                                            latest[m.key].timestamp):
            latest[m.key] = m
    return {k: float(m.value) for k, m in latest.items()}


def version_description(name: str, version: str, meta: Any, metrics: Mapping[str, float],
                        run_id: str | None) -> str:
    """The Markdown description of a version: what it is, its data, training and metrics."""
    cfg = meta.train_config or {}
    optim, scaling = cfg.get("optim", {}), cfg.get("scaling", {})
    epoch = meta.metrics.get("epoch")
    lines = [CARD_MARK, f"**{name} v{version}**: a {meta.mode or 'recsys'} sequential "
             f"recommender" + (f" (transfer strategy `{meta.strategy}`)"
                               if meta.mode == "transfer" else "") + ".", "",
             f"- Platforms of the model: {', '.join(meta.platforms)}; ranks the catalogs of "
             f"{', '.join(meta.platforms_with_items)}",
             f"- Data: example set `{meta.example_set}` (input fingerprint "
             f"`{(meta.input_fingerprint or '?')[:12]}`), user fraction {meta.user_fraction:g}",
             f"- Training: {scaling.get('engine', '?')}, {scaling.get('num_workers', '?')} "
             f"worker(s), lr {optim.get('lr', '?')}, up to {optim.get('epochs', '?')} epochs; "
             f"exported the best epoch ({'?' if epoch is None else int(epoch)}) by "
             f"`valid_ndcg_at_10`",
             f"- Text encoder: `{meta.encoder}`" if meta.encoder else "",
             (f"- Privacy: user-level DP-SGD, epsilon {meta.privacy.epsilon:.3g}, delta "
              f"{meta.privacy.delta:.2g}" if meta.privacy else "- Privacy: no formal guarantee"),
             f"- Training run: `{run_id}`" if run_id else ""]
    lines = [line for line in lines if line != ""] + [""]
    shown = sorted(k for k in metrics if k.startswith((TEST_PREFIX, "valid_", "best_valid_")))
    if shown:
        lines += ["| metric (best epoch; test: the exported model) | value |", "|---|---|"]
        lines += [f"| `{k}` | {metrics[k]:.4f} |" for k in shown]
    else:
        lines.append("No metrics were logged with this version's model.")
    return "\n".join(lines)


def model_description(name: str, platform: str | None) -> str:
    """The registered model's description: what it is and what its aliases mean."""
    what = f" for platform `{platform}`" if platform else ""
    return "\n".join([
        CARD_MARK, f"**{name}**: the recsys cross-platform recommender{what} (a sequential "
        "model over a user's recent items, items understood through their text).", "",
        "- `@champion`: the version serving loads; it moved only by beating the previous "
        "champion on the same validation data (`recsys.tracking.registry.promote_if_better`)",
        "- `@challenger`: a version being evaluated against `@champion` right now (or waiting "
        "for a person when the two could not be compared)",
        "- `@previous_champion`: what `recsys registry rollback` returns to",
        "", "Each version's description and `test_*` tags give its data, training and test "
        "metrics; its model page (source) has the metrics of its best epoch."])


def write_card(uri: str, name: str, version: str, export: Path,
               platform: str | None = None) -> dict[str, float]:
    """Describe ``version`` (and the registered model, unless a person described it) and tag the
    version with its test metrics and best epoch; returns the metrics written."""
    from recsys.model.export import read_meta

    c = _client(uri)
    mv = c.get_model_version(name, version)
    meta = read_meta(export)
    metrics = model_metrics(c, str(mv.source))
    if not any(k.startswith(TEST_PREFIX) for k in metrics):  # e.g. logged before test ran
        run_metrics = c.get_run(mv.run_id).data.metrics if mv.run_id else {}
        metrics.update({k: v for k, v in run_metrics.items() if k.startswith(TEST_PREFIX)})
    c.update_model_version(name, version, description=version_description(
        name, version, meta, metrics, mv.run_id))
    tags = {k: f"{v:.6f}" for k, v in metrics.items() if k.startswith(TEST_PREFIX)}
    if "epoch" in meta.metrics:
        tags[BEST_EPOCH_TAG] = str(int(meta.metrics["epoch"]))
    for k, v in tags.items():
        c.set_model_version_tag(name, version, mlflow_key(k), v)
    current = c.get_registered_model(name).description or ""
    if not current or current.startswith(CARD_MARK):
        c.update_registered_model(name, description=model_description(name, platform))
    return metrics

