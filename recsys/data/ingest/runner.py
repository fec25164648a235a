"""Run one ingest: adapter -> common validation -> pseudonyms -> lake, one report per platform.

:data:`ADAPTERS` is the one table from source name to adapter: the runner dispatches on it and
the CLI offers its keys as ``--source`` choices (:func:`adapter_names`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from recsys.data.ingest import amazon, feedback, generic, recbole, synthetic, uci, unisrec
from recsys.data.ingest.base import Adapter, IngestOptions, SourceKind
from recsys.data.ingest.finalize import event_stats, finalize, ingest_report
from recsys.data.ingest.stream import ingest_stream
from recsys.data.lake import PlatformWrite, check_key, list_platforms, write_platform
from recsys.data.pseudonym import Pseudonymizer, load_key

log = logging.getLogger(__name__)

ADAPTERS: dict[SourceKind, Adapter] = {
    "unisrec": unisrec.read,
    "uci-online-retail": uci.read,
    "amazon-json": amazon.read,
    "recbole": recbole.read,
    "generic": generic.read,
    "synthetic": synthetic.read,
    "feedback": feedback.read,
}
# Every SourceKind has an entry (tests/unit/test_layout.py checks it: a dict cannot say so).
SOURCES: tuple[SourceKind, ...] = tuple(ADAPTERS)


def adapter_names() -> list[str]:
    """The source names `recsys ingest --source` accepts."""
    return list(ADAPTERS)


def ingest(opts: IngestOptions, pseudonymizer: Pseudonymizer | None = None,
           key_source: str | None = None) -> list[PlatformWrite]:
    """Ingest one source into the lake; returns what was written, one entry per platform.
    ``key_source`` says where a given ``pseudonymizer``'s key came from (for the report; default
    its ``source``). Refused (:class:`~recsys.data.lake.KeyMismatchError`) when the lake's other
    platforms were pseudonymised with another key: users would not link across them."""
    if pseudonymizer is None:
        key, key_source = load_key()
        pseudonymizer = Pseudonymizer(key, key_source)
    key_source = key_source or pseudonymizer.source or "the caller"
    targets = target_platforms(opts)
    _check_other_platforms(opts.out, pseudonymizer, targets)  # before the (long) read
    started = time.perf_counter()
    if opts.chunk_rows is not None:  # the validator allows it for source generic only
        return [ingest_stream(opts, pseudonymizer, key_source)]
    frames = ADAPTERS[opts.source](opts, pseudonymizer)
    if {fr.platform for fr in frames} != set(targets):
        _check_other_platforms(opts.out, pseudonymizer, [fr.platform for fr in frames])
    written = []
    for fr in frames:
        events, items = finalize(
            fr.platform, fr.events, fr.items, fr.ledger, source_file=fr.source_file,
            min_user_events=max(fr.min_user_events, opts.min_user_events),
            min_item_events=max(fr.min_item_events, opts.min_item_events),
            pseudonymised=fr.pseudonymised,
        )
        report = ingest_report(opts, fr.platform, fr.ledger, event_stats(events),
                               items.num_rows, pseudonymizer, key_source,
                               time.perf_counter() - started)
        written.append(write_platform(
            opts.out, fr.platform, events, items,
            fr.ledger.quarantine_table("events"), fr.ledger.quarantine_table("items"),
            report, opts.buckets,
        ))
        ev = report["events"]
        log.info("ingested %s/%s: %d rows in -> %d out, %d quarantined, %d filtered",
                 opts.source, fr.platform, ev["rows_in"], ev["rows_out"], ev["rows_quarantined"],
                 ev["rows_filtered"])
    return written


def _check_other_platforms(lake: Path, pseudo: Pseudonymizer, written: list[str]) -> None:
    """The platforms this ingest leaves alone must share its key (those it writes are replaced
    whole, so re-ingesting a lake's only platform with a new key is allowed)."""
    others = sorted(set(list_platforms(lake)) - set(written))
    if others:
        check_key(lake, pseudo, others, purpose="ingest into")


def target_platforms(opts: IngestOptions) -> list[str]:
    """The platforms an ingest writes (known before reading: ``--platform``, or the synthetic
    default names), which it replaces whole."""
    if opts.platform:
        return opts.platform.split(",")
    return synthetic.default_names(opts.num_platforms) if opts.source == "synthetic" else []


__all__ = ["ADAPTERS", "SOURCES", "IngestOptions", "adapter_names", "ingest",
           "target_platforms"]


def format_ingest_summary(reports: list[dict[str, Any]], lake: Path | str) -> str:
    """A table of what ingest kept, quarantined and filtered per platform, and where it went."""
    head = f"{'platform':<16}{'rows in':>10}{'out':>10}{'quarant.':>10}{'filtered':>10}" \
           f"{'users':>9}{'items':>8}"
    lines = [head, "-" * len(head)]
    for r in reports:
        e = r["events"]
        lines.append(f"{r['platform']:<16}{e['rows_in']:>10,}{e['rows_out']:>10,}"
                     f"{e['rows_quarantined']:>10,}{e['rows_filtered']:>10,}{r['users']:>9,}"
                     f"{r['catalog_items']:>8,}")
    lines.append(f"lake: {lake}  (reports: {lake}/platform=*/report.json, rejected rows: "
                 f"{lake}/platform=*/quarantine/)")
    if reports:
        r = reports[0]
        lines.append(f"user, session and other ids pseudonymised with the key from "
                     f"{r['pseudonym_key_source']} (fingerprint {r['pseudonym_key_fingerprint']})")
    return "\n".join(lines)
