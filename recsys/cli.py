"""`recsys` command line: a dict from subcommand to function (as litgpt does).

Config-driven jobs take ``--config FILE`` then dotted ``key=value`` overrides, and run exactly
what ``python -m jobs.X`` runs (the same function; see docs/jobs.md):

    recsys pipeline --config configs/pipeline/demo.yaml [key=value ...]
    recsys pretrain|transfer|scratch --config configs/train/X.yaml [key=value ...]
    recsys federated --config configs/federated/federated.yaml [key=value ...]
    recsys evaluate --config configs/eval/demo.yaml [key=value ...]
    recsys tune --config tune/sweeps/X.yaml [key=value ...]
    recsys monitor --config configs/monitor/monitor.yaml [--watch] [key=value ...]
    recsys examples --config configs/data/X.yaml [key=value ...]
    recsys ingest --source KIND --path P --platform NAME --out LAKE [...]
    recsys registry list|show|promote|rollback --platform P [--version V]
    recsys stop                    # the demo's Ray head and MLflow server
    recsys docs [--check]          # regenerate docs/configs.md

`recsys X --help` describes X. A bad config key exits 2 with the key named.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from recsys.logs import setup_logging


def _kv(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{flag} {item!r}: expected field=column")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def ingest_main(argv: list[str]) -> int:
    from recsys.data.ingest.base import IngestOptions
    from recsys.data.ingest.runner import adapter_names, format_ingest_summary, ingest

    p = argparse.ArgumentParser(prog="recsys ingest", description="Ingest a source into the "
                                "canonical Parquet lake (one partition per platform).")
    p.add_argument("--source", required=True, choices=adapter_names())
    p.add_argument("--path", type=Path, help="source file or directory")
    p.add_argument("--platform", help="platform name (synthetic: optional comma-separated list)")
    p.add_argument("--out", type=Path, required=True, help="lake directory")
    p.add_argument("--items-path", type=Path, help="item metadata file, when separate")
    p.add_argument("--recipe", help="named preprocessing recipe, e.g. unisrec-or")
    p.add_argument("--map", action="append", metavar="FIELD=COLUMN",
                   help="generic: event field -> source column (repeatable)")
    p.add_argument("--item-map", action="append", metavar="FIELD=COLUMN",
                   help="generic: item field -> source column (repeatable)")
    p.add_argument("--mapping", type=Path, help="generic: YAML with columns/item_columns/"
                   "event_type (command-line --map entries win)")
    p.add_argument("--event-type", help="constant event type when the source has none")
    p.add_argument("--user-namespace", help="prefix raw user ids before hashing")
    p.add_argument("--min-user-events", type=int, default=0, help="k-core on users")
    p.add_argument("--min-item-events", type=int, default=0, help="k-core on items")
    p.add_argument("--buckets", type=int, help="user buckets per platform (default: by size)")
    p.add_argument("--chunk-rows", type=int, metavar="N",
                   help="generic: stream the source N rows at a time in bounded memory "
                   "(default: read it whole)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    p.add_argument("--scale", type=float, default=1.0, help="synthetic: size multiplier")
    p.add_argument("--num-platforms", type=int, default=3, help="synthetic: platforms")
    p.add_argument("--impressions", nargs="*", default=[], metavar="PLATFORM",
                   help="synthetic: platforms that also log impression events")
    a = p.parse_args(argv)

    columns, item_columns, event_type = {}, {}, a.event_type
    if a.mapping:
        from recsys.data.ingest.generic import load_mapping

        columns, item_columns, mapped_type = load_mapping(a.mapping)
        event_type = event_type or mapped_type
    columns.update(_kv(a.map, "--map"))
    item_columns.update(_kv(a.item_map, "--item-map"))
    opts = IngestOptions(
        source=a.source, out=a.out, path=a.path, items_path=a.items_path, platform=a.platform,
        recipe=a.recipe, columns=columns, item_columns=item_columns, event_type=event_type,
        user_namespace=a.user_namespace, min_user_events=a.min_user_events,
        min_item_events=a.min_item_events, buckets=a.buckets, chunk_rows=a.chunk_rows,
        seed=a.seed, scale=a.scale,
        num_platforms=a.num_platforms, impressions=a.impressions,
    )
    written = ingest(opts)
    print(format_ingest_summary([w.report for w in written], a.out))
    return 0


def examples_main(argv: list[str]) -> int:
    from recsys.cluster import init_ray
    from recsys.config import load_config, log_config
    from recsys.data.examples import DataConfig, build_example_set

    p = argparse.ArgumentParser(prog="recsys examples",
                                description="Build leave-one-out examples from a lake (Ray Data).")
    p.add_argument("--config", type=Path, help="YAML DataConfig")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    a = p.parse_args(argv)
    cfg = load_config(DataConfig, a.config, a.overrides)
    log_config(cfg, "data config")
    init_ray()
    es = build_example_set(cfg)
    print(es.manifest.summary())
    return 0


def job(module: str) -> Callable[[list[str]], int]:
    """``recsys X`` -> ``jobs.X.main``: the same function as ``python -m jobs.X``, imported when
    the subcommand runs (so ``recsys --help`` does not import Ray, torch and MLflow)."""

    def run(argv: list[str]) -> int:
        main: Callable[[list[str]], int] = importlib.import_module(f"jobs.{module}").main
        return main(argv)

    run.__name__ = run.__qualname__ = f"{module}_main"
    return run


def docs_main(argv: list[str]) -> int:
    from recsys.docs import main as docs

    return docs(argv)


def registry_main(argv: list[str]) -> int:
    import json

    from recsys.settings import get_settings
    from recsys.tracking import registry
    from recsys.tracking.server import ensure_tracking

    p = argparse.ArgumentParser(prog="recsys registry", description="Inspect the registered "
                                "models and move @champion by hand (MLflow model registry).")
    p.add_argument("action", choices=["list", "show", "promote", "rollback"])
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--name", help="registered model name")
    who.add_argument("--platform", help="platform (model recsys-<platform>)")
    p.add_argument("--version", help="promote: the version to make @champion")
    p.add_argument("--reason", default="manual", help="promote: recorded on the version")
    p.add_argument("--tracking-uri", help="MLflow server (default: RECSYS_MLFLOW_TRACKING_URI "
                   "or the project's local server)")
    p.add_argument("--json", action="store_true", help="show: print JSON")
    a = p.parse_args(argv)
    uri = a.tracking_uri or ensure_tracking(get_settings())
    name = a.name or registry.default_model_name(a.platform)
    try:
        if a.action == "promote":
            if not a.version:
                p.error("promote needs --version")
            previous = registry.promote(uri, name, a.version, reason=a.reason)
            print(f"{name}: @champion -> v{a.version} (was {previous or 'none'})")
        elif a.action == "rollback":
            version = registry.rollback(uri, name)
            print(f"{name}: @champion rolled back to v{version}")
        elif a.action == "show" and a.json:
            print(json.dumps(registry.describe(uri, name), indent=2, default=str))
        else:
            print(format_registry(registry.describe(uri, name), full=a.action == "show"))
    except registry.RegistryError as exc:
        print(f"recsys registry: error: {exc}", file=sys.stderr)
        return 2
    return 0


def format_registry(info: dict, full: bool = False) -> str:
    """Versions of one registered model, newest first, with aliases and scores."""
    lines = [f"{info['name']}: champion v{info['champion'] or '-'}, previous "
             f"v{info['previous_champion'] or '-'}, history {info['champion_history']}",
             f"{'version':>8}  {'aliases':<28}{'role':<16}{'valid score':>12}  source run"]
    for v in info["versions"]:
        score = next((t for k, t in v["tags"].items() if k.startswith("valid_")), "")
        lines.append(f"{v['version']:>8}  {','.join(v['aliases']) or '-':<28}"
                     f"{v['tags'].get('role', '-'):<16}{score:>12}  {v['run_id']}")
        if full:
            for k, t in sorted(v["tags"].items()):
                lines.append(f"{'':>10}{k} = {t}")
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "pipeline": job("pipeline"),
    "ingest": ingest_main,
    "examples": examples_main,
    "pretrain": job("pretrain"),
    "transfer": job("transfer"),
    "scratch": job("scratch"),
    "federated": job("federated"),
    "evaluate": job("evaluate"),
    "tune": job("tune"),
    "monitor": job("monitor"),
    "registry": registry_main,
    "stop": job("stop"),
    "docs": docs_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\ncommands: " + ", ".join(COMMANDS))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"recsys: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup_logging()
    from pydantic import ValidationError

    from recsys.config import ConfigError, format_validation_error
    from recsys.data.ingest.base import IngestError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValidationError as exc:
        print(format_validation_error(exc, f"recsys {argv[0]}"), file=sys.stderr)
    except (IngestError, ConfigError, FileNotFoundError) as exc:
        print(f"recsys {argv[0]}: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
