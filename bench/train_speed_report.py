"""``bench/train_speed.py``, the report: the comparisons from the measured runs, and the Markdown.

``--render`` rebuilds ``train_speed.md`` from a recorded ``train_speed.json`` with
``write_markdown`` alone, so everything it reads must stay in the JSON under the same keys.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import SYNTHETIC_PLATFORMS, fmt

if TYPE_CHECKING:
    from train_speed_tokens import TokenTables

TARGET_RAY_OVER_PLAIN = 0.95
SPIKE_OTHER_PCT = 40  # a run during which other processes took more CPU is flagged
RUN_NAMES = ("plain_a", "plain_b", "plain_nice0", "ray_ddp_1w", "ray_ddp_2w", "ray_ds2_2w")

METHOD = {
    "sequences_per_s": "median over epochs 1.. (epoch 0 = warm-up) of sequences / "
                       "train seconds; Ray: the loop's own metric (rank 0: sequences of "
                       "all ranks / its epoch time, which includes Ray Data shard "
                       "iteration, local shuffle and collate); plain: collate + forward "
                       "+ backward + optimizer step only",
    "threads": "the Ray worker's OMP_NUM_THREADS, torch.get_num_threads() and niceness "
               "are read inside the worker; the plain loop runs with "
               "torch.set_num_threads and the niceness of the worker (Ray starts "
               "workers at worker_niceness 15); plain_nice0 is the same at nice 0",
    "order": "plain_a, ray_ddp_1w, plain_b, plain_nice0, ray_ddp_2w, ray_ds2_2w; "
             "plain = mean of plain_a and plain_b (A-B-A against drifting load)",
    "cpu": "cpu_s per measurement: this driver, its descendants (Ray processes and "
           "workers, sampled every 1 s), the whole machine, and other = the rest "
           "(background load). machine_nice = CPU time of niced processes",
    "tokens": "counted from tokens.parquet lengths (max_tokens 64) on sampled training "
              "batches collated as in training; padded = what token_batch builds "
              "(rows x longest row of the call, one call per platform for dedup)",
}


# --------------------------------------------------------------------------------------------
# Figures from the measurements
# --------------------------------------------------------------------------------------------

def comparisons(runs: dict[str, Any]) -> dict[str, Any]:
    """The ratios of the report, wall-clock and per CPU-second; NaN for a run not made."""
    sps = {k: runs[k]["sequences_per_s"] if k in runs else float("nan") for k in RUN_NAMES}
    sps["plain"] = (sps["plain_a"] + sps["plain_b"]) / 2  # A-B-A: the runs around ray_ddp_1w
    spc = {k: runs[k]["sequences_per_cpu_s"] if k in runs else float("nan") for k in RUN_NAMES}
    spc["plain"] = (spc["plain_a"] + spc["plain_b"]) / 2
    out = {
        "sps": sps,
        "sequences_per_cpu_s": spc,
        "cpu_normalised": {
            "note": "sequences per CPU-second of the training processes (Ray: worker "
                    "processes, all threads, from the first batch request to the end of the "
                    "epoch's batches; plain: this process during the epoch). Less sensitive to "
                    "other load than wall-clock rates; misses Ray Data work done outside the "
                    "worker (SplitCoordinator).",
            "ray_over_plain": spc["ray_ddp_1w"] / spc["plain"],
            "deepspeed_over_ddp": spc["ray_ds2_2w"] / spc["ray_ddp_2w"],
            "two_over_one_workers": spc["ray_ddp_2w"] / spc["ray_ddp_1w"],
        },
        "ray_over_plain": sps["ray_ddp_1w"] / sps["plain"],
        "ray_over_plain_a": sps["ray_ddp_1w"] / sps["plain_a"],
        "ray_over_plain_b": sps["ray_ddp_1w"] / sps["plain_b"],
        "plain_b_over_plain_a": sps["plain_b"] / sps["plain_a"],
        "plain_nice0_over_plain_b": sps["plain_nice0"] / sps["plain_b"],
        "deepspeed_over_ddp": sps["ray_ds2_2w"] / sps["ray_ddp_2w"],
        "two_over_one_workers": sps["ray_ddp_2w"] / sps["ray_ddp_1w"],
        "scaling_efficiency": sps["ray_ddp_2w"] / (2 * sps["ray_ddp_1w"]),
        "length_buckets_over_random": sps["plain_b"] / runs["plain_random"]["sequences_per_s"],
        "padding_random_over_buckets": (runs["plain_random"]["padded_positions_per_real"]
                                        / runs["plain_b"]["padded_positions_per_real"]),
    }
    out["ray_over_plain_met"] = bool(out["ray_over_plain"] >= TARGET_RAY_OVER_PLAIN)
    return out


def encoder_estimate(runs: dict[str, Any], tok: dict[str, Any],
                     timed: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds per step had MiniLM run in it, from the token counts and its timed cost,
    beside a whole frozen-cache step of the plain loop."""
    mp = tok["mean_per_step"]
    plain_step = statistics.median(e["cpu_seconds"] / e["steps"]
                                   for k in ("plain_a", "plain_b")
                                   for e in runs[k]["epochs"][1:])
    return {"encoder": "all-MiniLM-L6-v2", "texts": timed["texts"], "threads": timed["threads"],
            "model_step_s": plain_step,
            "train_ms_per_padded_token": timed["train_s_per_padded_token"] * 1e3,
            **{f"{k}_train_s": mp[f"{k}_padded"] * timed["train_s_per_padded_token"]
               for k in ("dedup", "naive", "sampled_softmax", "full_catalog")}}


def frozen_cache(tt: TokenTables, encode_s: float, encoder: str,
                 timed: dict[str, Any]) -> dict[str, Any]:
    """The default mode: no tokens per step, each distinct text encoded once."""
    lengths = tt.lengths_all
    return {"tokens_per_step": 0,
            "distinct_texts": int(len(lengths)), "tokens_total": int(lengths.sum()),
            "catalog_items": int(sum(len(v) - 1 for v in tt.lengths.values())),
            "encode_seconds_this_run": round(encode_s, 2),
            "encoder_this_run": encoder,
            "minilm_inference_seconds_estimate": round(
                float(len(lengths) * 64 * timed["inference_s_per_padded_token"]), 1),
            "note": "vectors come from the cache (TextVectorCache): each distinct text is "
                    "encoded once per (encoder, max_tokens), ever; the step reads "
                    "PlatformTensors.text_vecs. The MiniLM estimate pads every text to "
                    "max_tokens=64 (an upper bound; the cache sorts by length)."}


def other_cpu_share_pct(meters: dict[str, Any]) -> float:
    """Share of the machine's CPU time that other processes took during the timed runs."""
    timed_meters = [v for k, v in meters.items() if k != "prepare_encode"]
    other = sum(x["cpu_s"]["other"] for x in timed_meters)
    capacity = sum(x["cpu_s"]["machine_capacity"] for x in timed_meters)
    return 100 * other / capacity if capacity else float("nan")


def worker_threads_summary(runs: dict[str, Any]) -> str:
    """The thread and niceness settings the Ray workers reported, each distinct one once."""
    wthreads = sorted({(w["OMP_NUM_THREADS"], w["torch_num_threads"], w["nice"])
                       for r in runs if r.startswith("ray_") for w in runs[r]["worker_threads"]})
    return ", ".join(f"OMP_NUM_THREADS={o} -> torch {t} thread(s) at nice {n}"
                     for o, t, n in wthreads)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def noise_sentence(other_pct: float) -> str:
    """How far to trust the ratios, from how much of the machine other processes took."""
    if other_pct >= 10:
        return "On a machine this busy every ratio carries noise well beyond a few %"
    return "A quiet machine, but still one run per figure: read differences of a few % as noise"


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    c, tok, sps = res["comparisons"], res["encoder_tokens"], res["comparisons"]["sps"]
    cn = c["cpu_normalised"]

    def other_share(name: str) -> float:
        mt = res["meters"].get(name)
        cap = mt["cpu_s"]["machine_capacity"] if mt else 0
        return 100 * mt["cpu_s"]["other"] / cap if cap else float("nan")

    def caveat(*names: str) -> str:
        """A warning where a run overlapped heavy other load (the wall-clock ratio is then
        mostly noise; the per-CPU-second one less so)."""
        hit = [f"{n} ran while other processes took {other_share(n):.0f}% of the CPU"
               for n in names if other_share(n) > SPIKE_OTHER_PCT]
        return f" -- **caution: {'; '.join(hit)}**" if hit else ""
    m = tok["mean_per_step"]
    est = res.get("encoder_seconds_estimate") or {}
    fz = res["frozen_cache"]
    loads = ", ".join(f"{k} {v['loadavg_start'][0]}" for k, v in res["meters"].items()
                      if k != "prepare_encode")
    lines = [
        "# Training speed (bench/train_speed.py)",
        "",
        f"**CPU ratios measured in one run on a shared {res['machine']['cpu_count_logical']}-core "
        f"machine ({res['machine']['cpu_model']}), no GPU.** Only the ratios mean something; "
        "absolute sequences/s are meaningful on a GPU only. "
        f"Load average (1 min) {res['loadavg_start'][0]} at the start and "
        f"{res['loadavg_end'][0]} at the end; at the start of each run: {loads}. Other "
        f"processes used {res['other_cpu_share_pct']:.0f}% of the machine's CPU time during "
        f"the timed runs. {noise_sentence(res['other_cpu_share_pct'])} (compare plain_a with "
        f"plain_b, the same run twice: {c['plain_b_over_plain_a']:.2f}).",
        "",
        "| comparison | value | target |",
        "|---|---|---|",
        f"| Ray Train (1 DDP worker) / plain process, sequences/s | "
        f"**{fmt(c['ray_over_plain'])}** ({fmt(sps['ray_ddp_1w'], ',.0f')} / "
        f"{fmt(sps['plain'], ',.0f')}; plain before {fmt(sps['plain_a'], ',.0f')}, after "
        f"{fmt(sps['plain_b'], ',.0f')}); per CPU-second {fmt(cn['ray_over_plain'])}"
        f"{caveat('plain_a', 'ray_ddp_1w', 'plain_b')} | >= {TARGET_RAY_OVER_PLAIN} "
        f"({'met' if c['ray_over_plain_met'] else 'NOT met'}) |",
        f"| DeepSpeed ZeRO-2 / DDP, 2 workers, sequences/s | **{fmt(c['deepspeed_over_ddp'])}** "
        f"({fmt(sps['ray_ds2_2w'], ',.0f')} / {fmt(sps['ray_ddp_2w'], ',.0f')}); per "
        f"CPU-second {fmt(cn['deepspeed_over_ddp'])}{caveat('ray_ddp_2w', 'ray_ds2_2w')} | "
        "none (ZeRO saves memory; on CPU it can only cost time) |",
        f"| 2 / 1 DDP workers, sequences/s | **{fmt(c['two_over_one_workers'])}** "
        f"({fmt(sps['ray_ddp_2w'], ',.0f')} / {fmt(sps['ray_ddp_1w'], ',.0f')}); "
        f"scaling efficiency sps(2)/(2 sps(1)) **{fmt(c['scaling_efficiency'])}**; per "
        f"CPU-second 2 / 1 workers {fmt(cn['two_over_one_workers'])}"
        f"{caveat('ray_ddp_1w', 'ray_ddp_2w')} | "
        "efficiency <= 1 (2 cores) |",
        f"| Encoder tokens per step: naive per-event / per-item dedup | "
        f"**{fmt(tok['ratio_naive_over_dedup_tokens'], '.1f')}x** "
        f"({m['naive_tokens']:,.0f} / {m['dedup_tokens']:,.0f} tokens; "
        f"{m['naive_texts']:,.0f} / {m['dedup_items']:,.0f} texts; padded "
        f"{tok['ratio_naive_over_dedup_padded']:.1f}x) | dedup < naive |",
        f"| Encoder tokens per step, sampled softmax as implemented (batch items + "
        f"{tok['num_negatives']} sampled negatives) | {m['sampled_softmax_tokens']:,.0f} | |",
        f"| Encoder tokens per step, full softmax with the encoder in the step (every "
        f"catalog item of the batch's platforms) | {m['full_catalog_tokens']:,.0f} | |",
        f"| Encoder tokens per step, frozen cache (the default) | **0** (one-off: "
        f"{fz['distinct_texts']:,} distinct texts, {fz['tokens_total']:,} tokens, once per "
        "encoder) | 0 |",
    ]
    if "length_buckets_over_random" in c:
        pb, pr = res["runs"]["plain_b"], res["runs"]["plain_random"]
        lines.append(
            f"| Batches grouped by history length (`optim.length_buckets` "
            f"{pb['length_buckets']}) / random batches, plain loop, sequences/s | "
            f"**{fmt(c['length_buckets_over_random'])}** ({fmt(sps['plain_b'], ',.0f')} / "
            f"{fmt(pr['sequences_per_s'], ',.0f')}); padded positions per real one "
            f"{pb['padded_positions_per_real']:.2f} vs {pr['padded_positions_per_real']:.2f}"
            f"{caveat('plain_b', 'plain_random')} | > 1 |")
    if "plain_nice0" in res["runs"]:
        lines.append(
            f"| (extra) plain at nice 0 / plain at the Ray worker's niceness "
            f"({res['runs']['plain_b']['nice']}) | {fmt(c['plain_nice0_over_plain_b'])} | |")
    lines += [
        "",
        f"Setup: synthetic world x{res['args']['scale']} ({len(SYNTHETIC_PLATFORMS)} shops, "
        f"{res['data']['train_rows']:,} training sequences, {res['data']['catalog_items']:,} "
        f"catalog items), frozen text vectors from {res['data']['encoder_label']}; model dim 64, "
        "2 layers, 8 experts, full softmax + CTR head, micro batch 256 per worker, "
        f"max_seq_len 50; {res['args']['epochs']} epochs per run, epoch 0 not counted, median "
        "sequences/s of the rest. Ray: the loop's own `sequences_per_s` (epoch time including "
        "the Ray Data shard iteration); plain: collate + forward + backward + step in one "
        "process. 'Per CPU-second': the same ratio of sequences per CPU-second of the "
        "training process(es) (Ray: the worker processes, all their threads), a cross-check "
        f"that depends less on the other load. Workers: {res['args']['cpus_per_worker']} CPU "
        "each, "
        f"{res['worker_threads_summary']}; the plain loop ran with the same thread count and "
        "niceness. Order: " + ", ".join(k for k in res["meters"] if k != "prepare_encode") + ".",
    ]
    lines += ["", "Per run (median of the counted epochs; 'other CPU' = share of the machine's CPU "
              "time used by processes outside this benchmark during the run):", "",
              "| run | sequences/s | per CPU-second | other CPU | 1-min load start -> end |",
              "|---|---|---|---|---|"]
    for name, run in res["runs"].items():
        mt = res["meters"].get(name)
        share = (100 * mt["cpu_s"]["other"] / mt["cpu_s"]["machine_capacity"]
                 if mt and mt["cpu_s"]["machine_capacity"] else float("nan"))
        lines.append(f"| {name} | {fmt(run['sequences_per_s'], ',.0f')} | "
                     f"{fmt(run['sequences_per_cpu_s'], ',.0f')} | {fmt(share, '.0f')}% | "
                     f"{mt['loadavg_start'][0] if mt else ''} -> "
                     f"{mt['loadavg_end'][0] if mt else ''} |")
    lines += ["", f"Token counts: mean over {tok['batches']} training batches of "
              f"{tok['batch_size']} sequences (a seeded permutation of the train split, collated "
              "as in training); 'padded' counts what `token_batch` builds (rows x longest row). "
              f"Deduplicating by text across shops instead of by item within a shop would encode "
              f"{m['dedup_by_text_texts']:,.0f} texts per step instead of "
              f"{m['dedup_items']:,.0f}."]
    if est:
        lines += ["", f"Encoder seconds per step if it ran in the step, estimated from a timed "
                  f"{est['encoder']} forward+backward on {est['texts']} item texts "
                  f"({est['threads']} thread, {est['train_ms_per_padded_token']:.2f} CPU-ms "
                  f"per padded token): dedup {est['dedup_train_s']:.1f} s, naive "
                  f"{est['naive_train_s']:.1f} s, sampled softmax "
                  f"{est['sampled_softmax_train_s']:.1f} s, full catalogs "
                  f"{est['full_catalog_train_s']:.1f} CPU-s per step, against "
                  f"{est['model_step_s']:.2f} CPU-s for a whole frozen-cache training step "
                  "(plain loop). "
                  f"The one-off MiniLM encoding of all {fz['distinct_texts']:,} texts: about "
                  f"{fz['minilm_inference_seconds_estimate']:.0f} s."]
    lines += ["", "Per-epoch numbers, CPU time of other processes per run, worker thread and "
              "niceness settings: `train_speed.json`."]
    path.write_text("\n".join(lines) + "\n")

