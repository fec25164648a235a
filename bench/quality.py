"""Quality benchmark on the real shared datasets: full ranking, test split, per platform.

Runs (frozen-encoder cache mode: each item text is encoded once by MiniLM, then training runs at
sequence-model speed; DDP with 2 workers on CPU):

* ``scientific_scratch``, ``online_retail_scratch``: against VQ-Rec's published numbers;
  ``*_no_repeat``: the same without the learned repeat bias (``model.repeat_bias``: a score per
  platform for items already in the user's history), the text-only model as it was before;
  ``scientific_scratch_decay``: with ``optim.lr_decay`` (halved after 2 epochs without gain);
* ``scientific_scratch_ids``, ``online_retail_scratch_ids``: with a learned id vector per item
  (``model.item_ids``; Online Retail also with ``optim.lr_decay``);
* ``pretrain_sources``: one model on Online Retail + Office + MovieLens pooled;
  ``pretrain_sources_long``: the same carried on (from a copy of its checkpoints) with a smaller
  step each time validation stops rising;
* ``scientific_transfer_<strategy>``: that model transferred to Scientific; ``*_shrunk``: the
  same from shrunk and perturbed pretrained weights (``transfer.shrink`` / ``perturb``);
  ``*_long``: from ``pretrain_sources_long``;
* ``scientific10_*``: the same with only 10% of Scientific's users for training (seeded);
* ``*_seed<n>``: scratch and the shrunk transfer at 100% again with ``optim.seed`` n;
* ``pretrain_pooled``: the sources and Scientific's training events pooled (the product's
  recipe for a platform that already has logs), then ``*_pooled_seed3``: fine-tuned on
  Scientific, against ``scientific_scratch_seed3``.

Results merge into ``bench/results/quality.json`` by run name, so a long benchmark can be run
in parts (``--runs``); ``quality.md`` is rendered from everything recorded so far.

``--resume`` continues recorded runs from their last checkpoints under the plan's (larger) cap.
``--paired`` then re-evaluates the recorded exports: paired bootstrap intervals of transfer vs
scratch (and of the repeat bias), and each scratch run with its repeat bias removed at test.

    python bench/quality.py                        # everything (hours on 2 CPU cores)
    python bench/quality.py --runs scientific_scratch --max-epochs 40

The runs are defined in ``quality_plan.py``, the ``--paired`` re-evaluation is in
``quality_paired.py``, the Markdown in ``quality_report.py``; this script trains and records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, stderr_log, write_json
from quality_paired import bias_off, paired_gains
from quality_plan import BASE, CPU_STRATEGIES, PSEUDONYM_KEY, merge, plan
from quality_report import render

sys.path.insert(0, str(REPO))
log = stderr_log("quality")


def ensure_examples() -> None:
    """Build the shared-data example set once (ingest + Ray Data), if missing."""
    if (REPO / "runs/shared/examples/manifest.json").exists():
        return
    from recsys.config import load_config
    from recsys.pipeline import PipelineConfig, run_pipeline

    run_pipeline(load_config(PipelineConfig, REPO / "configs/pipeline/shared_data.yaml",
                             ["stages=[ingest,examples]"]))


def run_one(name: str, overrides: dict[str, Any], max_epochs: int | None,
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run from scratch, or (``previous``: its recorded result) continue it from its
    latest checkpoint under the plan's cap (Ray Train resumes a run of the same name)."""
    from recsys.training.config import TrainJobConfig
    from recsys.training.run import run_training

    overrides = dict(overrides)
    source = overrides.pop("continue_from", None)
    cfg_dict = merge(BASE, {"name": name, **overrides})
    if max_epochs:
        cfg_dict["optim"]["epochs"] = max_epochs
    cfg_dict["resume"] = previous is not None or source is not None
    if source is not None:  # start from a copy of another run's checkpoints (Ray Train resumes)
        continue_from(Path(BASE["output_dir"]) / source, Path(BASE["output_dir"]) / name)
    cfg = TrainJobConfig.model_validate(cfg_dict)
    out = run_training(cfg)
    extra = {} if previous is None else {
        "resumed": {"epochs_before": previous["epochs_run"],
                    "cap_before": previous["config"]["optim"]["epochs"],
                    "run_before": previous.get("continued_from", name)}}
    return {
        "config": cfg.model_dump(mode="json"),
        **extra,
        "seconds": round(out.seconds + (previous["seconds"] if previous else 0.0), 1),
        "epochs_run": len(out.curve),
        "best_valid_ndcg@10": out.best_metric,
        "curve": out.curve,
        "test": {p: {"metrics": r.metrics, "history_excluded": r.history_excluded,
                     "cold_start": r.subsets.get("cold_start"), "auc": r.auc, "users": r.users}
                 for p, r in out.report.platforms.items()},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def continue_from(src: Path, dst: Path) -> None:
    """A fresh copy of ``src``'s Ray Train state (checkpoints and their manifest, which names
    them by relative path) under ``dst``, so the run ``dst`` carries on where ``src`` stopped
    and ``src`` stays as recorded."""
    import shutil

    if not (src / "checkpoint_manager_snapshot.json").exists():
        raise SystemExit(f"{src} has no checkpoints to continue from; run it first")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export", "report"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="all", help="comma-separated run names (default: all)")
    p.add_argument("--strategies", default=",".join(CPU_STRATEGIES),
                   help="transfer strategies (full and lora run the encoder in every step: "
                        "GPU territory)")
    p.add_argument("--max-epochs", type=int, help="cap epochs (smoke runs)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true",
                   help="continue the named runs from their latest checkpoints under the plan's "
                        "cap (for runs recorded under a smaller one)")
    p.add_argument("--paired", action="store_true",
                   help="only (re)compute the paired transfer-vs-scratch intervals from the "
                        "recorded runs' exports, and re-render")
    a = p.parse_args(argv)
    os.chdir(REPO)
    if a.paired:
        path = a.out / "quality.json"
        results = json.loads(path.read_text())
        results["paired"] = paired_gains(results)
        results["bias_off"] = bias_off(results)
        write_json(path, results)
        (a.out / "quality.md").write_text(render(results))
        print((a.out / "quality.md").read_text())
        return 0
    os.environ.setdefault("RECSYS_PSEUDONYM_KEY", PSEUDONYM_KEY)
    from recsys.cluster import init_ray
    from recsys.logs import setup_logging

    setup_logging()
    runs = plan(a.strategies.split(","))
    names = list(runs) if a.runs == "all" else a.runs.split(",")
    unknown = sorted(set(names) - set(runs))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {list(runs)}")
    ensure_examples()
    init_ray(num_cpus=2)
    path = a.out / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["machine"] = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, " \
                         f"Python {platform.python_version()}"
    for name in names:
        t = time.perf_counter()
        log(f"{name} ...")
        previous = results["runs"].get(name) if a.resume else None
        if a.resume and previous is None:
            raise SystemExit(f"--resume: {name} has no recorded run to continue")
        source = runs[name].get("continue_from")
        if source is not None:  # its first part is another recorded run
            if source not in results["runs"]:
                raise SystemExit(f"{name} continues {source}, which has no recorded run")
            previous = {**results["runs"][source], "continued_from": source}
        results["runs"][name] = run_one(name, runs[name], a.max_epochs, previous)
        log(f"{name} done in {time.perf_counter() - t:.0f}s")
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        (a.out / "quality.md").write_text(render(results))
    print((a.out / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
