"""The sweep's picture: the metric against each hyperparameter, and the best-so-far curve."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATUS_COLORS = {"completed": "tab:blue", "early_stopped": "tab:orange", "errored": "tab:red"}


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str,
               out: Path, log_keys: Sequence[str] = ()) -> Path:
    """One panel per hyperparameter (points coloured by trial status) and a last panel with the
    best metric so far in trial order. ``rows``: ``{"params": {...}, "best_metric", "status"}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(keys) + 1
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    scored = [r for r in rows if r.get("best_metric") is not None]
    for ax, key in zip(flat, keys):
        values = [r["params"].get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs: list[Any] = values
        else:  # categories at integer positions, labelled
            cats = sorted({str(v) for v in values})
            xs = [cats.index(str(v)) for v in values]
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        for status, color in STATUS_COLORS.items():
            pts = [(x, r["best_metric"]) for x, r in zip(xs, scored) if r["status"] == status]
            if pts:
                ax.scatter(*zip(*pts), c=color, label=status, s=28)
        if numeric and key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    best_ax = flat[len(keys)]
    best, curve = -math.inf, []
    for r in scored:
        best = max(best, float(r["best_metric"]))
        curve.append(best)
    best_ax.plot(range(1, len(curve) + 1), curve, marker="o")
    best_ax.set_xlabel("trial (in start order)")
    best_ax.set_ylabel(f"best {metric} so far")
    best_ax.grid(alpha=0.3)
    if scored:
        flat[0].legend(fontsize=8)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
