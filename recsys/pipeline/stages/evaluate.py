"""The ``evaluate`` stage: scratch vs each transfer strategy per target, on one split, by full
ranking (``recsys.evaluation.offline``); re-runs when any compared run was retrained."""

from __future__ import annotations

import json
import time
from pathlib import Path

from recsys.pipeline.context import Context
from recsys.pipeline.outputs import EvaluateOutput
from recsys.pipeline.stages.train import transfer_runs


def stage_evaluate(ctx: Context) -> None:
    """JSON + Markdown + PNG reports per target."""
    from recsys.evaluation.offline import EvaluateConfig, run_evaluation

    out: dict[str, EvaluateOutput] = {}
    for target, runs in transfer_runs(ctx).items():
        exports = {label: r.output.export for label, r in runs.items()}
        inputs = {"split": ctx.cfg.evaluate.split,
                  **{f"run/{label}": r.fingerprint for label, r in runs.items()}}
        eval_dir = ctx.cfg.root / "eval"
        key = f"evaluate/{target}"
        rec = ctx.state.read(key, EvaluateOutput)
        if ctx.needed(key, "evaluate", inputs,
                      rec.output.files() if rec else [eval_dir / key], EvaluateOutput):
            t = time.perf_counter()
            files = run_evaluation(EvaluateConfig(
                name=target, examples=ctx.cfg.data.examples, split=ctx.cfg.evaluate.split,
                platforms=[target], exports=exports,
                baseline="scratch" if "scratch" in exports else None, out_dir=str(eval_dir)))
            transfer = files.pop("transfer", None)
            ctx.finish(key, EvaluateOutput(
                reports={label: str(path) for label, path in files.items()},
                transfer=str(transfer) if transfer else None), time.perf_counter() - t)
        out[target] = ctx.recorded(key, EvaluateOutput).output
        _print_comparison(target, out[target])
    ctx.result.evaluate = out


def _print_comparison(target: str, evaluated: EvaluateOutput) -> None:
    """One table per target: each run's test metrics and its gain over scratch."""
    rows = []
    for label, path in evaluated.reports.items():
        m = json.loads(Path(path).read_text())["platforms"][target]["metrics"]
        rows.append((label, m["ndcg@10"], m["recall@10"], m["mrr"]))
    base = next((r[1] for r in rows if r[0] == "scratch"), None)
    print(f"\n{target}: {'run':<18}{'NDCG@10':>9}{'R@10':>8}{'MRR':>8}{'vs scratch':>12}")
    for label, ndcg, rec, mrr in rows:
        gain = f"{(ndcg / base - 1) * 100:+.1f}%" if base and label != "scratch" else ""
        print(f"{'':<{len(target) + 2}}{label:<18}{ndcg:>9.4f}{rec:>8.4f}{mrr:>8.4f}{gain:>12}")
