"""Full-ranking evaluation over a large catalog in bounded memory (issue 24): one batch of users
ranked against every item, whole-catalog scores (``Recommender.score`` + ``rank_of_target``,
what ``rank_batches`` does up to ``CHUNK_ITEMS`` items) vs chunk by chunk
(``recsys.evaluation.chunked``): time, extra memory while it runs, and equal ranks.

    .venv/bin/python bench/scale_eval.py                   # 1M items, 256 users
    .venv/bin/python bench/scale_eval.py --items 100000 --users 512

A random (untrained) recommender of width 128 with a repeat bias scores a random item table: the
cost of ranking does not depend on what the model learned. Writes
bench/results/scale_eval.{json,md}; ``run_scale_eval`` is what ``bench/scale.py`` calls.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MB = 1024 * 1024


def peak_extra_mb(fn: Callable[[], Any], interval: float = 0.005) -> tuple[Any, float, float]:
    """(result, seconds, peak RSS above the RSS at the start in MiB) of ``fn()``, sampled."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return out, seconds, (peak[0] - base) / MB


@torch.inference_mode()
def run_scale_eval(items: int = 1_000_000, users: int = 256, dim: int = 128,
                   chunk: int | None = None, exact: bool = True, seed: int = 0
                   ) -> dict[str, Any]:
    from recsys.evaluation.chunked import CHUNK_ITEMS, chunked_ranks
    from recsys.evaluation.metrics import rank_of_target
    from recsys.model.recommender import Recommender

    chunk = chunk or CHUNK_ITEMS
    torch.manual_seed(seed)
    model = Recommender(text_dim=dim, dim=dim, num_platforms=1, num_brands=2,
                        num_categories=2, max_len=8, num_layers=1, num_heads=2, dropout=0.0,
                        num_experts=1, repeat_bias=True).eval()
    model.repeat.weight.fill_(0.1)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(items + 1, dim, generator=gen)
    table[0] = 0.0
    user = torch.randn(users, dim, generator=gen)
    history = torch.randint(1, items + 1, (users, 8), generator=gen)
    targets = torch.randint(1, items + 1, (users,), generator=gen)
    pid = torch.zeros(users, dtype=torch.long)
    row: dict[str, Any] = {"items": items, "users": users, "dim": dim, "chunk": chunk,
                           "table_mb": round(table.numel() * 4 / MB, 1)}
    got, secs, extra = peak_extra_mb(lambda: chunked_ranks(
        model, user, table, history, pid, targets, exclude_own=True, k=10, chunk=chunk))
    row["chunked"] = {"seconds": round(secs, 2), "peak_extra_mb": round(extra, 0)}
    if exact:
        def whole() -> tuple[torch.Tensor, torch.Tensor]:
            scores = model.score(history, pid, table, user=user)              # (B, N+1)
            return (rank_of_target(scores, targets),
                    rank_of_target(scores, targets, exclude=history))

        (rank, rank_x), secs, extra = peak_extra_mb(whole)
        row["whole"] = {"seconds": round(secs, 2), "peak_extra_mb": round(extra, 0)}
        row["ranks_equal"] = bool(torch.equal(rank, got.rank) and torch.equal(rank_x,
                                                                               got.rank_excl))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Full-ranking evaluation over a large catalog: whole vs chunked", "",
             "One batch of users ranked against every item (history-excluded ranks and a top 10 "
             "too in the chunked path); extra RSS while it runs, sampled every 5 ms. "
             "Regenerate: `python bench/scale_eval.py`.", "",
             "| items | users | chunk | whole s | whole extra MiB | chunked s "
             "| chunked extra MiB | equal ranks |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r.get("whole", {})
        lines.append(f"| {r['items']:,} | {r['users']} | {r['chunk']:,} "
                     f"| {w.get('seconds', 'n/a')} | {w.get('peak_extra_mb', 'n/a')} "
                     f"| {r['chunked']['seconds']} | {r['chunked']['peak_extra_mb']} "
                     f"| {r.get('ranks_equal', 'n/a')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS)
    opts = ap.parse_args()
    rows = [run_scale_eval(n, opts.users) for n in opts.items]
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "scale_eval.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (opts.out / "scale_eval.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
