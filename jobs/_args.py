"""Shared argument parsing of job entry points: ``--config FILE`` then ``key=value`` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", type=Path, required=True, help="YAML config of the job")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. data.sequences.max_seq_len=20")
    return p.parse_args(argv)
