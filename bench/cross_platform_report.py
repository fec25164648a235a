"""``cross_platform.md`` from ``cross_platform.json``: the gain table of cross-platform histories
per platform and user group, and the transfer gain per pretraining temperature. Reads only the
recorded results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import fmt

GROUPS = (("all", "all test users"), ("history_elsewhere", "with history elsewhere"),
          ("own_history_only", "without"))


def _gain(cell: dict[str, Any], metric: str) -> str:
    m = cell[metric]
    if m["gain"] is None:
        return "n/a"
    low, high = m["ci95"]
    return f"{m['gain']:+.4f} [{low:+.4f}, {high:+.4f}]"


def _own_vs_cross(title: str, part: dict[str, Any], note: str) -> list[str]:
    lines = [f"## {title}", "", note, "",
             "| platform | users | n | NDCG@10 own | NDCG@10 cross | gain [95% CI] "
             "| Recall@10 own | Recall@10 cross | gain [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, groups in part["platforms"].items():
        for key, label in GROUPS:
            c = groups[key]
            if not c["users"]:
                lines.append(f"| {p} | {label} | 0 | | | | | | |")
                continue
            lines.append(
                f"| {p} | {label} | {c['users']} | {fmt(c['ndcg@10']['base'], '.4f')} | "
                f"{fmt(c['ndcg@10']['new'], '.4f')} | {_gain(c, 'ndcg@10')} | "
                f"{fmt(c['recall@10']['base'], '.4f')} | {fmt(c['recall@10']['new'], '.4f')} | "
                f"{_gain(c, 'recall@10')} |")
    runs = part["runs"]
    lines += ["", f"Epoch cap {part.get('epochs_cap', '?')}. Runs: " + "; ".join(
        f"`{arm}` {r['epochs']} epochs, {r['seconds']} s, best valid NDCG@10 "
        f"{r['best_valid_ndcg@10']:.4f}" for arm, r in runs.items()) + ".", ""]
    return lines


def _temperature(part: dict[str, Any]) -> list[str]:
    rows = part["source_train_rows"]
    lines = ["## Pooled pretraining over uneven platforms: temperature vs transfer gain", "",
             f"Epoch cap {part.get('epochs_cap', '?')} for every run.", "",
             "Sources (training rows after the seeded thinning): "
             + ", ".join(f"{p} {n:,} ({100 * part['thin'][p]:.0f}% of users)"
                         for p, n in rows.items())
             + f". Target `shop_d`, {100 * part['target_users']:.0f}% of its users for training "
             "(all its test users evaluated). Each temperature: pretrain on the sources, transfer "
             "with `freeze_encoder`; gain against scratch on the target (NDCG@10 "
             f"{part['scratch_test']['ndcg@10']:.4f}), paired over the same test users.", "",
             "| T | source shares | pretrain valid NDCG@10 | transfer NDCG@10 | gain over "
             "scratch [95% CI] | Recall@10 gain [95% CI] | NDCG@10 vs T=1 [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for t, r in part["temperatures"].items():
        shares = ", ".join(f"{q:.2f}" for q in r["shares"].values())
        g = r["gain"]
        vs = r.get("vs_proportional")
        lines.append(f"| {t} | {shares} | {r['pretrain_valid_ndcg@10']:.4f} | "
                     f"{g['ndcg@10']['new']:.4f} | {_gain(g, 'ndcg@10')} | "
                     f"{_gain(g, 'recall@10')} | {_gain(vs, 'ndcg@10') if vs else '-'} |")
    return lines + [""]


def _rerank(part: dict[str, Any]) -> list[str]:
    shown = ", ".join(f"{p} {n:,}" for p, n in part["impressions"].items())
    lines = ["## Two-stage ranking: retrieval vs retrieval + CTR re-rank", "",
             f"Epoch cap {part.get('epochs_cap', '?')}. The synthetic shops above; impression "
             f"events logged: {shown}. `negatives`: what the CTR head was trained against "
             "(`sampled`: popularity-sampled items, the lake without impressions; `shown`: the "
             "item shown before each label and not chosen, sampled where a label has none). Both "
             "models are scored on the same test rows. N: the retrieval's top N that the head "
             "re-orders (a target outside keeps its rank). Gain = re-rank - retrieval per user, "
             "95% paired bootstrap interval. AUC random: the next item vs a uniform catalog item; "
             "AUC shown: vs the item shown before it and not chosen (rows with one); the "
             "retrieval's AUC on the same pairs (its scores) beside it.", "",
             "| negatives | platform | users | N | NDCG@10 retrieval | NDCG@10 re-rank | gain "
             "[95% CI] | AUC random | AUC shown (rows) | retrieval AUC shown |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        low, high = r["gain_ci"]
        shown_auc = (f"{r['ctr_auc_shown']:.3f} ({r['shown_rows']:,})"
                     if r.get("ctr_auc_shown") is not None else "-")
        lines.append(f"| {r['negatives']} | {r['platform']} | {r['users']} | {r['top_n']} | "
                     f"{r['ndcg@10_retrieval']:.4f} | {r['ndcg@10_rerank']:.4f} | "
                     f"{r['gain']:+.4f} [{low:+.4f}, {high:+.4f}] | {r['ctr_auc']:.3f} | "
                     f"{shown_auc} | {fmt(r.get('retrieval_auc_shown'), '.3f')} |")
    runs = part["runs"]
    return lines + ["", "Runs: " + "; ".join(
        f"`{arm}` {r['epochs']} epochs, {r['seconds']} s, best valid NDCG@10 "
        f"{r['best_valid_ndcg@10']:.4f}" for arm, r in runs.items()) + ".", ""]


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    parts = result["parts"]
    lines = ["# Cross-platform benchmark (test split, full ranking over the platform's catalog, "
             "history not masked)", "",
             f"{m['date']}, {m['cpu_count_logical']} CPUs ({m['cpu_model']}; shared with other "
             "jobs), DDP with 2 CPU workers; each run stops at its part's epoch cap or on early "
             "stopping (valid NDCG@10, patience 3, not before epoch 10); seeds "
             f"{result['seeds']}. Regenerate: `python bench/cross_platform.py` (parts merge by "
             f"name). Total {result['total_seconds']} s.", "",
             "`own`: histories of the platform's own items (leave-one-out by time). `cross`: the "
             "same rows and targets, histories merged with the user's earlier events on the other "
             "platforms (strictly earlier than the target; other platforms' held-out events never "
             "in a training row), each item embedded with its own platform's table and marked with "
             "its platform. One pooled model per arm over all platforms, same seed. Gain = cross - "
             "own per test user; 95% paired bootstrap interval over users (2,000 resamples). "
             "`with history elsewhere`: the cross history holds items of another platform.", ""]
    if "synthetic" in parts:
        lines += _own_vs_cross(
            "Synthetic shops with overlapping users", parts["synthetic"],
            "Three synthetic shops (scale 1.0, seed 7): a user is on each other shop with "
            "probability 0.35 and keeps one taste across shops. Tiny random text encoder "
            "(MiniLM's tokenizer and width), as the other synthetic benchmarks.")
    if "movielens" in parts:
        ml = parts["movielens"]
        lines += _own_vs_cross(
            "MovieLens-1M split into two platforms by genre", ml,
            f"{ml['users_sampled']:,} users of ML-1M sampled (seed "
            f"{result['seeds']['movielens_users']}); `ml_a` / `ml_b` = the two halves of the "
            f"seeded genre partition (seed {result['seeds']['genre_partition']}; rule in "
            "`bench/cross_platform.py` and `docs/benchmarks.md`). Frozen MiniLM text vectors "
            "of title, year and genres.")
    if "rerank" in parts:
        lines += _rerank(parts["rerank"])
    if "temperature" in parts:
        lines += _temperature(parts["temperature"])
    return "\n".join(lines)


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    path.write_text(render(result) + "\n")
