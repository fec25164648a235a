"""The MLflow pyfunc flavour of an export: ``mlflow.pyfunc.load_model(uri).predict(df)``.

Input: a DataFrame with ``platform`` (str), ``history`` (list of item ids, oldest first),
optional ``history_platform`` (list of str, the platform of each history item: a user's merged
history across platforms, as serving builds it; default: all the row's platform) and optional
``k`` (int, default 10). Output: one row per input with ``items`` (top-k item ids) and
``scores``. Item vectors of each platform are computed once at load time; a call runs only the
user tower and one top-k per platform.

Logged with MLflow's models-from-code (``CODE_FILE``), with ``SIGNATURE`` and an input example
from the export itself (``input_example``): loading a version never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from recsys.model.export import Exported, item_ids, load_export, read_meta

CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "platform"), ColSpec(Array("string"), "history"),
                   ColSpec(Array("string"), "history_platform", required=False),
                   ColSpec("long", "k", required=False)]),
    outputs=Schema([ColSpec(Array("string"), "items"), ColSpec(Array("double"), "scores")]))


def input_example(export: Path) -> pd.DataFrame:
    """One request on the export's first platform: its first three items as the history."""
    platform = read_meta(export).platforms_with_items[0]
    return pd.DataFrame({"platform": [platform],
                         "history": [(item_ids(export, platform) or [])[:3]], "k": [5]})


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps the safetensors weights, item index and (if fine-tuned) the text encoder."""

    def load_context(self, context: Any) -> None:
        self._load(context.artifacts["export"])

    def _load(self, path: str) -> None:
        """Load the export and compute every platform's item table once."""
        self.exported: Exported = load_export(path)
        self.tables: dict[str, torch.Tensor] = {}
        self.index: dict[str, dict[str, int]] = {}
        with torch.inference_mode():
            for name, it in self.exported.items.items():
                self.tables[name] = self.exported.item_table(name)  # (N+1, D)
                self.index[name] = {item: i + 1 for i, item in enumerate(it.item_ids)}

    @torch.inference_mode()
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Top-k item ids and scores per input row (see the module docstring)."""
        model = self.exported.model
        max_len = model.config["max_len"]
        out_items: list[list[str]] = [[] for _ in range(len(model_input))]
        out_scores: list[list[float]] = [[] for _ in range(len(model_input))]
        df = model_input.reset_index(drop=True)
        for name, rows in df.groupby("platform", sort=False):
            if name not in self.tables:
                raise KeyError(f"unknown platform {name!r}; known: {sorted(self.tables)}")
            table, own = self.tables[name], self.exported.items[name].platform_id
            hist = torch.zeros((len(rows), max_len), dtype=torch.long)
            hp = torch.full((len(rows), max_len), own, dtype=torch.long)  # (B, L) item platforms
            places = (rows["history_platform"] if "history_platform" in rows
                      else [None] * len(rows))
            for r, (h, where) in enumerate(zip(rows["history"], places)):
                where = [name] * len(h) if where is None else list(where)
                if len(where) != len(h):
                    raise ValueError(f"row {rows.index[r]}: history_platform has {len(where)} "
                                     f"entries for {len(h)} history items")
                pairs = [(self.index[q][i], self.exported.items[q].platform_id)
                         for i, q in zip(h, where) if q in self.index and i in self.index[q]]
                pairs = pairs[-max_len:]
                if pairs:
                    hist[r, max_len - len(pairs):] = torch.as_tensor([i for i, _ in pairs])
                    hp[r, max_len - len(pairs):] = torch.as_tensor([q for _, q in pairs])
            pid = torch.full((len(rows),), own)
            elsewhere = (hp != own).any()
            tables = {it.platform_id: self.tables[q] for q, it in self.exported.items.items()}
            scores = model.score(hist, pid, table, history_platforms=hp if elsewhere else None,
                                 item_tables=tables if elsewhere else None)  # (B, N+1)
            ks = rows["k"].astype(int).tolist() if "k" in rows else [10] * len(rows)
            top = torch.topk(scores, k=min(max(ks), table.shape[0] - 1), dim=1)
            item_ids = self.exported.items[name].item_ids
            for r, row_id in enumerate(rows.index):
                k = ks[r]
                out_items[row_id] = [item_ids[i - 1] for i in top.indices[r, :k].tolist()]
                out_scores[row_id] = top.values[r, :k].tolist()
        return pd.DataFrame({"items": out_items, "scores": out_scores})
