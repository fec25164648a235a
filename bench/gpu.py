"""GPU benchmark: the Scientific transfer of ``bench/quality.py`` on one GPU, per engine, strategy.

Each run is a real training job (``run_training``: Ray Train, one GPU worker, NCCL) with the
quality benchmark's settings (``quality_plan.BASE``), transferred from its ``pretrain_sources``
export to Amazon Scientific:

* ``freeze_ddp_fp32``: frozen-encoder vectors (cache), DDP in fp32 -- what the CPU runs do;
* ``freeze_ds2_bf16``: the same under DeepSpeed ZeRO-2 in bf16;
* ``full_ds2_bf16``: the text encoder (MiniLM) fine-tuned in every step at ``encoder.lr``;
* ``lora_ds2_bf16``: LoRA adapters on the encoder's attention at ``encoder.lora.lr``.

With ``full_softmax`` a step that runs the encoder encodes the platform's whole catalog (4,385
texts for Scientific) forward and backward: the cost a GPU makes affordable. Each run gets the
same epoch budget (``--epochs``); runs are done in the order given and skipped once
``--budget-s`` is spent. Figures per run: seconds and sequences/s per training epoch (median
after the first), peak GPU memory of the worker, validation curve, test metrics (full ranking).
Writes ``gpu.json`` and ``gpu.md`` to ``--out``.

    python bench/gpu.py --epochs 3                      # needs bench/quality.py's pretrain_sources
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, package_versions, stderr_log, write_json
from quality import run_one
from quality_plan import BASE, PSEUDONYM_KEY, TARGET

sys.path.insert(0, str(REPO))
log = stderr_log("gpu")

RUNS: dict[str, dict[str, Any]] = {
    "freeze_ddp_fp32": {"scaling": {"engine": "ddp"},
                        "transfer": {"strategy": "freeze_encoder"}},
    "freeze_ds2_bf16": {"scaling": {"engine": "deepspeed"},
                        "transfer": {"strategy": "freeze_encoder"}},
    "full_ds2_bf16": {"scaling": {"engine": "deepspeed"}, "transfer": {"strategy": "full"}},
    "lora_ds2_bf16": {"scaling": {"engine": "deepspeed"}, "transfer": {"strategy": "lora"}},
}


def overrides(name: str, init: str, epochs: int, gpu: bool = True) -> dict[str, Any]:
    run = RUNS[name]
    return {
        "mode": "transfer", "train_platforms": [TARGET],
        "transfer": {"init_from": init, **run["transfer"]},
        "optim": {"epochs": epochs, "min_epochs": epochs},
        "deepspeed": {"zero_stage": 2, "bf16": "auto"},
        "scaling": {"num_workers": 1, "use_gpu": gpu, "max_failures": 0, **run["scaling"]},
        "output_dir": "runs/bench_gpu",
    }


def machine() -> dict[str, Any]:
    """CPUs, Python, torch and CUDA, the GPU if there is one, the training stack's versions."""
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    info.update(package_versions(("ray", "deepspeed", "transformers", "peft")))
    return info


def summarise(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a run's record (``quality.run_one``'s)."""
    curve = r["curve"]
    later = curve[1:] or curve  # the first epoch includes CUDA/NCCL warm-up
    test = r["test"][TARGET]["metrics"]
    return {"run": name, "strategy": r["config"]["transfer"]["strategy"],
            "engine": r["config"]["scaling"]["engine"], "epochs": r["epochs_run"],
            "train_s_per_epoch": statistics.median(p["train_seconds"] for p in later),
            "sequences_per_s": statistics.median(p["sequences_per_s"] for p in later),
            "gpu_max_memory_gib": max((p.get("gpu_max_memory_gib", 0.0) for p in curve),
                                      default=0.0),
            "best_valid_ndcg@10": r["best_valid_ndcg@10"], "test_ndcg@10": test["ndcg@10"],
            "test_recall@10": test["recall@10"], "job_seconds": r["seconds"]}


def render(res: dict[str, Any]) -> str:
    """``gpu.md`` from ``gpu.json`` (``--render`` re-writes it after notes were added)."""
    m = res["machine"]
    lines = ["# GPU benchmark (`bench/gpu.py`): Scientific transfer on one GPU", "",
             f"{res['finished_at']}; {m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib')} GiB), "
             f"{m['cpus']} CPUs, Python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), "
             f"ray {m['ray']}, deepspeed {m['deepspeed']}, transformers {m['transformers']}, "
             f"peft {m['peft']}. One run each; {res['epochs']} epochs per run from "
             f"`{res['init']}`.", "",
             "Each run: `run_training` (Ray Train, 1 GPU worker over NCCL), the quality "
             "benchmark's settings (dim 128, full softmax over the catalog, micro batch 256, "
             "lr 0.003; encoder at `encoder.lr` 5e-5, LoRA at `encoder.lora.lr` 5e-4). Epoch "
             "figures are medians after the first epoch; test metrics are full ranking over all "
             "4,385 Scientific items after the given epochs, not converged runs.", "",
             "| run | strategy | engine | s / train epoch | sequences/s | peak GPU GiB "
             "| best valid NDCG@10 | test NDCG@10 | test R@10 | job s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        lines.append(f"| {s['run']} | {s['strategy']} | {s['engine']} | "
                     f"{s['train_s_per_epoch']:.2f} | {s['sequences_per_s']:,.0f} | "
                     f"{s['gpu_max_memory_gib']:.2f} | {s['best_valid_ndcg@10']:.4f} | "
                     f"{s['test_ndcg@10']:.4f} | {s['test_recall@10']:.4f} | "
                     f"{s['job_seconds']:.0f} |")
    by = {s["run"]: s for s in res["summary"]}
    ratios = []
    for a, b, what in (("freeze_ds2_bf16", "freeze_ddp_fp32", "DeepSpeed ZeRO-2 bf16 / DDP fp32"),
                       ("full_ds2_bf16", "freeze_ds2_bf16", "full fine-tune / frozen cache"),
                       ("lora_ds2_bf16", "freeze_ds2_bf16", "LoRA / frozen cache")):
        if a in by and b in by:
            ratios.append(f"- {what}: {by[a]['sequences_per_s'] / by[b]['sequences_per_s']:.2f}x "
                          "the sequences/s")
    if ratios:
        lines += ["", "Ratios in this run:", *ratios]
    if res.get("skipped"):
        lines += ["", f"Not run (time budget): {', '.join(res['skipped'])}."]
    for note in res.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--init", default=f"{BASE['output_dir']}/pretrain_sources/export")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="start no further run once this many seconds have passed")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", action="store_true",
                   help="only re-write gpu.md from gpu.json (e.g. after adding notes to it)")
    p.add_argument("--cpu", action="store_true",
                   help="smoke-test this script on CPU workers (its figures then mean nothing)")
    a = p.parse_args(argv)
    os.chdir(REPO)
    if a.render:
        (a.out / "gpu.md").write_text(render(json.loads((a.out / "gpu.json").read_text())))
        print((a.out / "gpu.md").read_text())
        return 0
    names = a.runs.split(",")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {list(RUNS)}")
    if not Path(a.init).is_dir():
        raise SystemExit(f"{a.init}: no pretrain export (run bench/quality.py --runs "
                         "pretrain_sources first)")
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", PSEUDONYM_KEY)
    from recsys.cluster import init_ray
    from recsys.logs import setup_logging

    setup_logging()
    init_ray()
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "epochs": a.epochs, "init": a.init,
                           "runs": {}, "summary": [], "skipped": []}
    a.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if time.perf_counter() - started > a.budget_s:
            res["skipped"].append(name)
            continue
        log(f"{name} ...")
        r = run_one(f"gpu_{name}", overrides(name, a.init, a.epochs, not a.cpu),
                            None)
        res["runs"][name] = r
        res["summary"].append(summarise(name, r))
        log(f"{name}: {res['summary'][-1]}")
        res["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(a.out / "gpu.json", res)
        (a.out / "gpu.md").write_text(render(res))
    res["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(a.out / "gpu.json", res)
    (a.out / "gpu.md").write_text(render(res))
    print((a.out / "gpu.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
