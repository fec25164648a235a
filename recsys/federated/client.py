"""A federated client: one platform's logs, trained locally, only a weight delta sent back.

:class:`PlatformClient` is a plain class (testable without Ray); the server wraps it with
``ray.remote`` so each platform's rows are read and held inside its own actor process. The
rows are read there from the example set and filtered to that platform: the server process
never holds them. A round (:meth:`PlatformClient.fit`) loads the global weights, trains
``local_epochs`` passes (or ``local_steps`` steps) with the pooled job's objective
(:class:`recsys.training.objective.RecommenderObjective`) and optimizer (AdamW over the same
parameter groups), adds FedProx's proximal term if asked, clips the update under client-level
DP, and returns a :class:`ClientUpdate`: safetensors bytes of the delta of the shared
parameters (own platform row only for per-platform tensors), plus the row count the server
weights by. No event, id, text or per-user value leaves :meth:`fit`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recsys.federated.aggregate import clip_update
from recsys.federated.config import FederatedJobConfig
from recsys.federated.payload import deserialize, own_rows, serialize, shared_names

BATCH_COLUMNS = ("history", "target", "platform", "shown")
"""What the training step reads; user ids and timestamps are dropped when the rows are read."""


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns from a round: the update and the weight FedAvg gives it."""

    payload: bytes
    """safetensors bytes of the shared parameters' delta (see ``recsys.federated.payload``)."""
    num_rows: int
    """Training rows this round's delta was fitted on (FedAvg's weight; unused under DP)."""
    train_loss: float
    """Mean local training loss (a scalar, for the round's log line)."""
    steps: int
    seconds: float


class TableShard:
    """An in-memory stand-in for a Ray Data shard: ``iter_batches`` as ``feed.iter_batches``
    calls it, over one platform's rows converted to numpy once."""

    def __init__(self, table: pa.Table) -> None:
        self.columns = {name: _numpy_column(table[name]) for name in BATCH_COLUMNS
                        if name in table.column_names}
        self.num_rows = table.num_rows

    def iter_batches(self, batch_size: int, batch_format: str = "numpy",
                     local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        order = (np.random.default_rng(local_shuffle_seed).permutation(self.num_rows)
                 if local_shuffle_buffer_size else np.arange(self.num_rows))
        for i in range(0, self.num_rows, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in self.columns.items()}


def _numpy_column(col: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy; list columns as an object array of per-row arrays (Ray's layout)."""
    arr = col.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = arr.offsets.to_numpy()
        values = arr.values.to_numpy(zero_copy_only=False)
        out = np.empty(len(arr), dtype=object)
        for i in range(len(arr)):
            out[i] = values[offsets[i]:offsets[i + 1]]
        return out
    return arr.to_numpy(zero_copy_only=False)


def platform_rows(example_set: Any, split: str, platform: str, user_fraction: float,
                  seed: int) -> pa.Table:
    """One platform's rows of a split (the seeded user subsample for training)."""
    from recsys.data.examples import read_split
    from recsys.training.items import keep_user

    table = read_split(example_set, split)
    table = table.filter(pc.equal(table["platform"], platform))
    if user_fraction < 1 and split == "train":
        table = table.filter(keep_user(table["user_id"].to_pylist(), user_fraction, seed))
    return table


class PlatformClient:
    """One platform's client: its rows, its item inputs, a model built like the trainer's."""

    def __init__(self, job: dict[str, Any], platform: str, model_platforms: list[str],
                 vocab: dict[str, Any]) -> None:
        from recsys.data.examples import load_example_set
        from recsys.model.features import FeatureVocab
        from recsys.training.items import prepare_item_inputs
        from recsys.training.loop import seed_everything
        from recsys.training.model_setup import build_model
        from recsys.training.objective import PlatformTensors, RecommenderObjective

        self.cfg = FederatedJobConfig.model_validate(job)
        self.train_cfg = self.cfg.train_config()
        self.platform = platform
        self.platform_id = model_platforms.index(platform)
        seed_everything(self.cfg.optim.seed + self.platform_id)
        es = load_example_set(self.cfg.data.examples)
        inputs = prepare_item_inputs(
            es, [platform], {platform: self.platform_id}, encoder=self.cfg.data.text.encoder,
            max_tokens=self.cfg.data.text.max_tokens, cache_dir=self.cfg.encoder.cache_dir,
            vocab=FeatureVocab.from_dict(vocab).freeze(), user_fraction=self.cfg.user_fraction,
            seed=self.cfg.optim.seed)
        self.train = TableShard(platform_rows(es, "train", platform, self.cfg.user_fraction,
                                              self.cfg.optim.seed))
        self.valid = TableShard(platform_rows(es, "valid", platform, 1.0, 0))
        self.model = build_model(self.train_cfg, inputs, None, model_platforms)
        self.tensors = {self.platform_id: PlatformTensors.from_items(inputs.items[platform],
                                                                     torch.device("cpu"))}
        self.objective = RecommenderObjective(self.model, self.cfg.loss, self.tensors)
        self.shared = shared_names(self.model.state_dict())

    def num_rows(self) -> int:
        return self.train.num_rows

    def _load(self, global_payload: bytes) -> dict[str, torch.Tensor]:
        weights = deserialize(global_payload)
        missing = set(self.shared) - set(weights)
        if missing:
            raise ValueError(f"global weights lack {sorted(missing)[:5]}")
        self.model.load_state_dict(weights, strict=False)
        return {k: v.clone() for k, v in weights.items()}

    def _batches(self, epoch: int, round_: int) -> Iterator[dict[str, torch.Tensor]]:
        from recsys.data.feed import iter_batches

        o = self.cfg.optim
        return iter_batches(self.train, o.micro_batch_size, self.cfg.data.sequences.max_seq_len,
                            shuffle_buffer=1, seed=o.seed + 1000 * round_ + epoch,
                            platform_ids={self.platform: self.platform_id},
                            length_buckets=o.length_buckets)

    def fit(self, global_payload: bytes, round_: int) -> ClientUpdate:
        """One round of local training from the global weights; returns only the delta."""
        from recsys.training.engine import param_groups

        t0 = time.perf_counter()
        anchor = self._load(global_payload)
        f, o = self.cfg.federated, self.cfg.optim
        opt = torch.optim.AdamW(param_groups(self.objective, self.train_cfg), lr=o.lr,
                                weight_decay=o.weight_decay)
        params = dict(self.model.named_parameters())
        mu = f.proximal_mu if f.algorithm == "fedprox" else 0.0
        self.model.train()
        losses: list[float] = []
        steps = 0
        for epoch in range(f.local_epochs):
            for batch in self._batches(epoch, round_):
                loss, stats = self.objective(batch["history"], batch["target"],
                                             batch["platform"], None, batch.get("shown"))
                if mu > 0:  # FedProx: stay near the global weights
                    loss = loss + mu / 2 * sum(((params[k] - anchor[k]) ** 2).sum()
                                               for k in self.shared if params[k].requires_grad)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if o.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                opt.step()
                losses.append(stats["loss"])
                steps += 1
                if f.local_steps is not None and steps >= f.local_steps:
                    break
            if f.local_steps is not None and steps >= f.local_steps:
                break
        if losses and not np.isfinite(losses).all():
            raise FloatingPointError(f"client {self.platform}, round {round_}: non-finite loss")
        state = self.model.state_dict()
        delta = own_rows({k: state[k].detach() - anchor[k] for k in self.shared},
                         self.platform_id)
        if f.client_dp.enabled:  # the clip is the client's; the noise is the server's
            delta, _ = clip_update(delta, f.client_dp.clip)
        return ClientUpdate(payload=serialize(delta), num_rows=self.train.num_rows,
                            train_loss=float(np.mean(losses)) if losses else float("nan"),
                            steps=steps, seconds=time.perf_counter() - t0)

    def evaluate(self, global_payload: bytes) -> tuple[int, float]:
        """(validation users, mean NDCG@10) of the global model on this platform's own
        validation rows: two numbers leave the client, no rank or id."""
        from recsys.data.feed import iter_batches
        from recsys.evaluation.metrics import ranking_metrics
        from recsys.evaluation.ranking import rank_batches

        self._load(global_payload)
        batches = iter_batches(self.valid, 512, self.cfg.data.sequences.max_seq_len,
                               platform_ids={self.platform: self.platform_id})
        ranks = rank_batches(self.model, self.tensors, batches)
        if self.platform_id not in ranks:
            return 0, 0.0
        r = ranks[self.platform_id]["rank"]
        return len(r), float(ranking_metrics(r, ks=(10,))["ndcg@10"])
