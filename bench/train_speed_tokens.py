"""``bench/train_speed.py``, part 4: encoder tokens per training step, had the encoder run in it.

Counted from ``tokens.parquet`` on sampled training batches, collated as in training: per-item
dedup (what ``objective.item_vectors`` encodes) against naive per-event encoding, and what the
sampled and full softmax really encode; then a timed MiniLM forward(+backward) turns tokens into
CPU seconds. In frozen-cache mode (the default) a step encodes no tokens at all.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from common import SEED, SYNTHETIC_PLATFORMS

if TYPE_CHECKING:
    from recsys.data.examples import ExampleSet
    from recsys.training.config import TrainJobConfig
    from recsys.training.trainer import TrainSetup


@dataclass(frozen=True)
class TokenTables:
    """Token facts of the example set's item texts, per platform by item index (row 0 is the
    padding item). Items with the same text on two shops share one text id."""

    tokens: dict[str, np.ndarray]  # text hash -> token ids (int32)
    lengths: dict[str, np.ndarray]  # platform -> (num_items + 1,) token count per item
    text_ids: dict[str, np.ndarray]  # platform -> (num_items + 1,) global text id, -1 = padding
    hashes: dict[str, list[str]]  # platform -> text hash per item, "" = padding
    lengths_all: np.ndarray  # (distinct texts,) token count of each distinct text


def token_tables(es: ExampleSet, platforms: list[str]) -> TokenTables:
    """Per platform: token length of each item index and a global id of its text."""
    from recsys.model.features import load_item_features, load_token_ids

    tokens = load_token_ids(es.path)
    _, feats = load_item_features(es.path, platforms)
    ids_by_text: dict[str, int] = {}
    lengths, text_ids, hashes = {}, {}, {}
    for p in platforms:
        item_hashes = feats[p].text_hash
        hashes[p] = [""] + list(item_hashes)
        lengths[p] = np.array([0] + [len(tokens[h]) for h in item_hashes], np.int64)
        text_ids[p] = np.array(
            [-1] + [ids_by_text.setdefault(h, len(ids_by_text)) for h in item_hashes], np.int64)
    return TokenTables(tokens=tokens, lengths=lengths, text_ids=text_ids, hashes=hashes,
                       lengths_all=np.array([len(t) for t in tokens.values()], np.int64))


def _batch_tokens(hist: np.ndarray, target: np.ndarray, plat: np.ndarray,
                  names: dict[int, str], tt: TokenTables, setup: TrainSetup, num_neg: int,
                  rng: np.random.Generator) -> dict[str, int]:
    """Texts, tokens and padded tokens one collated batch would encode under each scheme.
    ``hist``: (B, L) item indices, 0 = padding; ``target``, ``plat``: (B,)."""
    r = {"sequences": len(target), "history_positions": int((hist > 0).sum())}
    naive_tok = naive_n = 0
    dedup_tok = dedup_pad = dedup_n = 0
    samp_tok = samp_pad = samp_n = 0
    full_tok = full_pad = full_n = 0
    text_ids_batch: set[int] = set()
    for pid in np.unique(plat):
        name = names[int(pid)]
        lens, tids = tt.lengths[name], tt.text_ids[name]
        rows_p = plat == pid
        h, t = hist[rows_p], target[rows_p]
        events = np.concatenate([h[h > 0], t])
        # naive: every history position and every target encoded on its own
        naive_tok += int(lens[events].sum())
        naive_n += len(events)
        # per-item dedup (objective.item_vectors encodes each distinct item once)
        items = np.unique(events)
        dedup_tok += int(lens[items].sum())
        dedup_pad += len(items) * int(lens[items].max())
        dedup_n += len(items)
        text_ids_batch.update(tids[items].tolist())
        # sampled softmax as implemented: + num_negatives popularity-sampled items
        pop = setup.inputs.items[name].popularity.astype(np.float64) + 1.0
        pop[0] = 0.0
        negs = rng.choice(len(pop), size=num_neg, p=pop / pop.sum())
        needed = np.unique(np.concatenate([items, negs]))
        samp_tok += int(lens[needed].sum())
        samp_pad += len(needed) * int(lens[needed].max())
        samp_n += len(needed)
        # full softmax with the encoder in the step: the platform's whole catalog
        full_tok += int(lens[1:].sum())
        full_pad += (len(lens) - 1) * int(lens[1:].max())
        full_n += len(lens) - 1
    # token_batch pads to the longest sequence of the call; naive would be one call
    all_events = np.concatenate([
        tt.lengths[names[int(pid)]][np.concatenate([
            hist[plat == pid][hist[plat == pid] > 0], target[plat == pid]])]
        for pid in np.unique(plat)])
    naive_pad = len(all_events) * int(all_events.max())
    r.update(naive_texts=naive_n, naive_tokens=naive_tok, naive_padded=naive_pad,
             dedup_items=dedup_n, dedup_tokens=dedup_tok, dedup_padded=dedup_pad,
             dedup_by_text_texts=len(text_ids_batch),
             sampled_softmax_items=samp_n, sampled_softmax_tokens=samp_tok,
             sampled_softmax_padded=samp_pad,
             full_catalog_items=full_n, full_catalog_tokens=full_tok,
             full_catalog_padded=full_pad)
    return r


def _token_batch_seconds(tt: TokenTables, data: dict[str, np.ndarray],
                         rows: np.ndarray) -> dict[str, Any]:
    """Python padding of token lists per step (objective.item_vectors -> token_batch) vs one
    index into a tensor padded once: the cost of rebuilding the token batch every step, for the
    items of the first platform in ``rows``."""
    import torch

    from recsys.model.features import token_batch

    name = SYNTHETIC_PLATFORMS[0]
    toks = [np.zeros(0, np.int32)] + [tt.tokens[h] for h in tt.hashes[name][1:]]
    ids = np.unique(np.concatenate([np.asarray(data["history"][i]) for i in rows
                                    if data["platform"][i] == name]))
    ids = ids[ids > 0]
    py_s, ix_s = [], []
    pre_ids, pre_mask = token_batch(toks)  # what could be built once per run
    lengths = pre_mask.sum(1)
    for _ in range(20):  # min of 20: the machine is busy
        t0 = time.perf_counter()
        token_batch([toks[i] for i in torch.as_tensor(ids).tolist()])
        py_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sel = torch.as_tensor(ids)
        width = int(lengths[sel].max())
        pre_ids[sel, :width], pre_mask[sel, :width]
        ix_s.append(time.perf_counter() - t0)
    return {"items": int(len(ids)), "python_token_batch": min(py_s),
            "index_prepadded_tensor": min(ix_s)}


def token_counts(cfg: TrainJobConfig, setup: TrainSetup, data: dict[str, np.ndarray],
                 tt: TokenTables, num_batches: int) -> dict[str, Any]:
    """Encoder work per training step if the encoder ran in the step, on ``num_batches``
    batches of a seeded permutation of the train split (collated exactly as in training)."""
    from recsys.data.feed import collate

    bs, max_len = cfg.optim.micro_batch_size, cfg.data.sequences.max_seq_len
    num_neg = cfg.loss.num_negatives
    platform_ids = {p: setup.model_platforms.index(p) for p in setup.inputs.items}
    names = {v: k for k, v in platform_ids.items()}
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(data["target"]))
    rows: list[dict[str, int]] = []
    for b in range(min(num_batches, len(perm) // bs)):
        idx = perm[b * bs:(b + 1) * bs]
        batch = collate({k: v[idx] for k, v in data.items()}, max_len, platform_ids)
        rows.append(_batch_tokens(batch["history"].numpy(), batch["target"].numpy(),
                                  batch["platform"].numpy(), names, tt, setup, num_neg, rng))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"batches": len(rows), "batch_size": bs, "num_negatives": num_neg,
            "mean_per_step": mean, "per_batch": rows,
            "ratio_naive_over_dedup_tokens": mean["naive_tokens"] / mean["dedup_tokens"],
            "ratio_naive_over_dedup_padded": mean["naive_padded"] / mean["dedup_padded"],
            "token_batch_per_call_s": _token_batch_seconds(tt, data, perm[:bs])}


def time_encoder(encoder: str, tt: TokenTables, threads: int, texts: int,
                 repeats: int) -> dict[str, Any]:
    """Seconds per padded token of one encoder on real item texts: inference (the one-off
    frozen-cache encoding) and forward + backward (fine-tuning in the step)."""
    import torch

    from recsys.model.features import token_batch
    from recsys.model.recommender import load_text_encoder

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        enc = load_text_encoder(encoder)
        rng = np.random.default_rng(SEED)
        hashes = list(tt.tokens)
        pick = [tt.tokens[hashes[i]] for i in rng.choice(len(hashes), texts, replace=False)]
        input_ids, mask = token_batch(pick)
        padded = int(input_ids.numel())
        enc.eval()
        inf, inf_cpu, trn, trn_cpu = [], [], [], []
        with torch.inference_mode():
            enc(input_ids[:4], mask[:4])  # warm-up
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                enc(input_ids, mask)
                inf.append(time.perf_counter() - t0)
                inf_cpu.append(time.process_time() - c0)
        enc.train()
        for _ in range(repeats):
            enc.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            enc(input_ids, mask).sum().backward()
            trn.append(time.perf_counter() - t0)
            trn_cpu.append(time.process_time() - c0)
        # CPU seconds, not wall: with 1 thread they are the compute time, whatever else runs
        # on the machine (wall times are kept for reference).
        return {"encoder": encoder, "hidden": enc.hidden_size,
                "params": sum(p.numel() for p in enc.parameters()), "threads": threads,
                "texts": texts, "padded_tokens": padded, "repeats": repeats,
                "inference_wall_s": statistics.median(inf),
                "inference_cpu_s": statistics.median(inf_cpu),
                "train_step_wall_s": statistics.median(trn),
                "train_step_cpu_s": statistics.median(trn_cpu),
                "inference_s_per_padded_token": statistics.median(inf_cpu) / padded,
                "train_s_per_padded_token": statistics.median(trn_cpu) / padded}
    finally:
        torch.set_num_threads(prev)
