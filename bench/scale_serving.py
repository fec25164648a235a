"""Serving a large catalog (issue 24): top-k latency of exact scoring vs the approximate index
(``recsys.model.ann``, IVF-Flat) at 10k / 100k / 1M items, the index's recall@10, build time and
size; and the int8 /search query encoder vs fp32 (latency, top-10 agreement) on a demo export.

    .venv/bin/python bench/scale_serving.py                       # 10k, 100k, 1M; demo export
    .venv/bin/python bench/scale_serving.py --sizes 10000 100000 --queries 100

Item vectors are synthetic: a mixture of Gaussian clusters in 128-d (one cluster per 1,000 items,
at least 64), L2-normalised, like an item table whose items group by category. Queries are
catalog items plus noise (users close to items they would buy); a harder set ("mixed")
averages three random items (a user between interests, far from any one item). Both paths are
the serving code, ``recsys.serving.retrieval.search_items`` over the (N+1, D) scoring matrix,
with and without the index (the index path re-scores its k + 32 candidates exactly). Latency
is one query at a time on one thread (a Serve replica on a 2-core machine runs one), the index
built on every core.
Writes bench/results/scale_serving.{json,md}; ``run_scale_serving`` is what ``bench/scale.py``
calls.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO_EXPORT = REPO / "runs" / "demo" / "train" / "transfer-freeze_encoder-shop_c" / "export"
SIZES = (10_000, 100_000, 1_000_000)
MB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[scale_serving] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def clustered(n: int, dim: int, seed: int, noise: float = 0.35) -> np.ndarray:
    """(n, dim) unit vectors from max(64, n / 1000) Gaussian clusters; built in blocks."""
    rng = np.random.default_rng(seed)
    clusters = max(64, n // 1000)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        block = centers[rng.integers(0, clusters, hi - lo)]
        block += noise * rng.standard_normal((hi - lo, dim)).astype(np.float32)
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _latency(fn, queries: torch.Tensor) -> tuple[list[list[int]], dict[str, float]]:
    fn(queries[0])  # warm-up
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(fn(q)[0])
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    return found, {"p50_ms": round(float(np.percentile(ms, 50)), 3),
                   "p95_ms": round(float(np.percentile(ms, 95)), 3),
                   "mean_ms": round(float(ms.mean()), 3)}


def measure_catalog(n: int, dim: int = 128, queries: int = 200, k: int = 10,
                    seed: int = 0) -> dict[str, Any]:
    """One catalog size: exact vs index latency, recall@k, index build time and size."""
    import faiss

    from recsys.model.ann import AnnIndex, AnnMeta, build_index
    from recsys.serving.retrieval import search_items

    started, rss0 = time.perf_counter(), rss_mb()
    x = clustered(n, dim, seed)
    scoring = torch.cat([torch.zeros(1, dim), torch.from_numpy(x)])               # (N+1, D)
    rng = np.random.default_rng(seed + 1)
    q = x[rng.integers(0, n, queries)] + 0.3 * rng.standard_normal((queries, dim)).astype(
        np.float32)
    q = torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))
    mixed = x[rng.integers(0, n, (queries, 3))].mean(axis=1)  # a user between 3 interests
    mixed = torch.from_numpy(mixed / np.linalg.norm(mixed, axis=1, keepdims=True))
    faiss.omp_set_num_threads(psutil.cpu_count() or 1)
    index, params = build_index(x)
    data = faiss.serialize_index(index)
    ann = AnnIndex(index, AnnMeta(nlist=int(params["nlist"]), nprobe=int(params["nprobe"]),
                                  num_items=n, dim=dim, index_sha256="-", inputs_sha256={},
                                  build_seconds=float(params["build_seconds"])))
    log(f"{n:,} items: index built in {params['build_seconds']:.1f} s "
        f"(nlist {params['nlist']}, nprobe {params['nprobe']}), {len(data) / MB:.0f} MiB")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        exact, exact_t = _latency(lambda v: search_items(scoring, None, v, k), q)
        approx, approx_t = _latency(lambda v: search_items(scoring, ann, v, k), q)
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(psutil.cpu_count() or 1)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, approx)]))
    mixed_recall = float(np.mean([
        len(set(search_items(scoring, None, v, k)[0]) & set(search_items(scoring, ann, v, k)[0]))
        / k for v in mixed]))
    raw = float(np.mean([len(set(a) & set((ann.search(v.numpy()[None], k)[0]).tolist())) / k
                         for a, v in zip(exact, q)]))
    row = {"items": n, "dim": dim, "queries": queries, "nlist": params["nlist"],
           "nprobe": params["nprobe"], "build_seconds": params["build_seconds"],
           "index_mb": round(len(data) / MB, 1), "vectors_mb": round(x.nbytes / MB, 1),
           "exact": exact_t, "ann": approx_t, "recall_at_10": round(recall, 4),
           "recall_at_10_index_only": round(raw, 4),
           "recall_at_10_mixed": round(mixed_recall, 4),
           "speedup_p50": round(exact_t["p50_ms"] / max(approx_t["p50_ms"], 1e-9), 1),
           "rss_growth_mb": round(rss_mb() - rss0, 0), "peak_rss_mb": round(peak_rss_mb(), 0),
           "seconds": round(time.perf_counter() - started, 1)}
    log(f"{n:,} items: exact p50 {exact_t['p50_ms']} ms, index p50 {approx_t['p50_ms']} ms, "
        f"recall@10 {recall:.3f}")
    return row


def measure_int8_search(export: Path, queries: int = 100, k: int = 10) -> dict[str, Any]:
    """fp32 vs int8 query encoder on each catalog of an export: latency of ``query_vector``
    (tokenise + encode + item tower) and top-k agreement of ``search`` (queries: the first
    three words of catalog titles)."""
    from recsys.serving.predictor import Predictor

    fp32 = Predictor.from_export(export, search=True)
    int8 = Predictor.from_export(export, search=True, int8_search=True)
    if fp32.encoder is None:
        return {"export": str(export), "skipped": fp32.search_error}
    shown = export.relative_to(REPO) if export.is_relative_to(REPO) else export
    rows = [_int8_platform(fp32, int8, p, queries, k) for p in fp32.catalogs]
    return {"export": str(shown), "encoder": fp32.exported.meta.encoder, "platforms": rows}


def _int8_platform(fp32: Any, int8: Any, platform: str, queries: int, k: int) -> dict[str, Any]:
    from recsys.serving.schemas import SearchRequest

    titles = [t for t in fp32.catalogs[platform].titles if t]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(titles), min(queries, len(titles)), replace=False)
    texts = [" ".join(titles[i].split()[:3]) for i in picked]
    out: dict[str, Any] = {"platform": platform,
                           "catalog_items": fp32.catalogs[platform].num_items,
                           "queries": len(texts)}
    tops: dict[str, list[list[str]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, pred in (("fp32", fp32), ("int8", int8)):
            pred.query_vector(platform, texts[0])  # warm-up
            times, tops[name] = [], []
            for text in texts:
                t = time.perf_counter()
                pred.query_vector(platform, text)
                times.append(time.perf_counter() - t)
                got = pred.search(SearchRequest(platform=platform, query=text, k=k))
                tops[name].append([i.item_id for i in got.items])
            ms = np.asarray(times) * 1e3
            out[f"{name}_p50_ms"] = round(float(np.percentile(ms, 50)), 2)
            out[f"{name}_p95_ms"] = round(float(np.percentile(ms, 95)), 2)
    finally:
        torch.set_num_threads(threads)
    pairs = list(zip(tops["fp32"], tops["int8"]))
    out["top10_agreement"] = round(float(np.mean([len(set(a) & set(b)) / max(len(a), 1)
                                                  for a, b in pairs])), 4)
    out["top1_agreement"] = round(float(np.mean([a[:1] == b[:1] for a, b in pairs])), 4)
    out["speedup_p50"] = round(out["fp32_p50_ms"] / out["int8_p50_ms"], 2)
    log(f"int8 search on {platform}: p50 {out['int8_p50_ms']} ms vs fp32 "
        f"{out['fp32_p50_ms']} ms, top-10 agreement {out['top10_agreement']}")
    return out


def run_scale_serving(sizes: tuple[int, ...] = SIZES, dim: int = 128, queries: int = 200,
                      export: Path | None = DEMO_EXPORT) -> dict[str, Any]:
    """Every measurement of this module, as one JSON-able dict (``bench/scale.py`` embeds it)."""
    started = time.perf_counter()
    rows = [measure_catalog(n, dim, queries) for n in sizes]
    from recsys.model.export import ExportError, read_meta

    try:
        read_meta(export) if export is not None else None
        int8 = (measure_int8_search(export) if export is not None
                else {"skipped": "no export given"})
    except (FileNotFoundError, ExportError) as e:
        int8 = {"skipped": f"no loadable export ({e}; run `make demo`)"}
    return {"catalogs": rows, "int8_search": int8,
            "machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__,
                        "faiss": _faiss_version(),
                        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1)},
            "total_seconds": round(time.perf_counter() - started, 1)}


def _faiss_version() -> str:
    import faiss

    return faiss.__version__


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Serving a large catalog: exact vs approximate top-k, int8 query encoder", "",
             "Synthetic clustered 128-d unit vectors; one query at a time on one thread; the "
             "index (faiss IVF-Flat, inner product) proposes k + 32 candidates that are "
             "re-scored exactly. Recall@10: share of the exact top 10 that the served top 10 "
             "holds (queries near an item; mixed: the mean of three random items). "
             "Regenerate: `python bench/scale_serving.py`.", "",
             "| items | exact p50 / p95 ms | index p50 / p95 ms | speed-up | recall@10 "
             "| recall@10 (index alone) | recall@10 mixed | nlist / nprobe | build s | index MiB "
             "| peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["catalogs"]:
        lines.append(f"| {r['items']:,} | {r['exact']['p50_ms']} / {r['exact']['p95_ms']} "
                     f"| {r['ann']['p50_ms']} / {r['ann']['p95_ms']} | {r['speedup_p50']}x "
                     f"| {r['recall_at_10']:.3f} | {r['recall_at_10_index_only']:.3f} "
                     f"| {r['recall_at_10_mixed']:.3f} "
                     f"| {r['nlist']} / {r['nprobe']} | {r['build_seconds']} "
                     f"| {r['index_mb']} | {r['peak_rss_mb']:.0f} |")
    s = result["int8_search"]
    lines += ["", "## /search query encoder: int8 (dynamic, Linear layers) vs fp32", ""]
    if "skipped" in s:
        lines.append(f"Not measured: {s['skipped']}.")
    else:
        lines += [f"`{s['export']}` (encoder {s['encoder']}), per platform: queries are the "
                  "first three words of catalog titles; one thread; latency of the query "
                  "vector (tokenise, encode, item tower).", "",
                  "| platform | items | queries | fp32 p50 / p95 ms | int8 p50 / p95 ms "
                  "| speed-up | top-10 agreement | top-1 agreement |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["platforms"]:
            lines.append(f"| {r['platform']} | {r['catalog_items']} | {r['queries']} "
                         f"| {r['fp32_p50_ms']} / {r['fp32_p95_ms']} "
                         f"| {r['int8_p50_ms']} / {r['int8_p95_ms']} | {r['speedup_p50']}x "
                         f"| {r['top10_agreement']} | {r['top1_agreement']} |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpus']} CPUs, {m['memory_gb']} GB; torch {m['torch']}, "
              f"faiss {m['faiss']}; {result['total_seconds']:.0f} s in all.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--export", type=Path, default=DEMO_EXPORT)
    ap.add_argument("--out", type=Path, default=RESULTS)
    opts = ap.parse_args()
    result = run_scale_serving(tuple(opts.sizes), queries=opts.queries, export=opts.export)
    import json

    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "scale_serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (opts.out / "scale_serving.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
