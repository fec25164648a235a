"""``docs/configs.md`` generated from the typed config schemas, so the reference never drifts.

    python -m recsys.docs            # rewrite docs/configs.md
    python -m recsys.docs --check    # exit 1 if docs/configs.md is stale (what the unit test does)

Every job config is listed in :data:`REGISTRY`; a new job config is documented by adding one
:class:`DocEntry` there. Each model's fields are walked recursively into one table per section,
keyed by the dotted path that YAML files and ``key=value`` overrides use. Descriptions are
pydantic's ``FieldInfo.description``: ``Field(description=...)``, or the attribute docstring under
the field (the project's style), which ``use_attribute_docstrings=True`` on ``StrictModel`` and
``Settings`` puts there.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from recsys.data.examples import DataConfig
from recsys.evaluation.offline import EvaluateConfig
from recsys.federated.config import FederatedJobConfig
from recsys.monitoring.config import MonitorConfig
from recsys.pipeline.config import PipelineConfig
from recsys.settings import Settings
from recsys.training.config import TrainJobConfig
from recsys.tuning.config import SweepConfig

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configs.md"


@dataclass(frozen=True)
class DocEntry:
    """One documented config: the model, who reads it, and where its shipped YAMLs live."""

    title: str
    model: type[BaseModel]
    used_by: str
    yaml_glob: str | None = None
    env_prefix: str | None = None
    """Set for settings read from the environment: rows show variable names, not YAML keys."""


REGISTRY: tuple[DocEntry, ...] = (
    DocEntry("Pipeline", PipelineConfig, "`python -m jobs.pipeline`", "configs/pipeline/*.yaml"),
    DocEntry("Training", TrainJobConfig,
             "`python -m jobs.pretrain`, `jobs.transfer`, `jobs.scratch` (`mode` is set by the "
             "job), Tune trials", "configs/train/**/*.yaml"),
    DocEntry("Federated training", FederatedJobConfig,
             "`python -m jobs.federated`; the pipeline's `pretrain` stage with "
             "`federated.enabled: true`", "configs/federated/*.yaml"),
    DocEntry("Evaluation", EvaluateConfig, "`python -m jobs.evaluate`", "configs/eval/*.yaml"),
    DocEntry("Drift monitor", MonitorConfig, "`python -m jobs.monitor` (`--watch`: every "
             "`interval_s`); the pipeline's opt-in `monitor` stage", "configs/monitor/*.yaml"),
    DocEntry("Sweep", SweepConfig, "Ray Tune sweeps (`recsys.tuning`)", "tune/sweeps/*.yaml"),
    DocEntry("Data (examples)", DataConfig, "`recsys examples`; the `data` section of the "
             "pipeline and training configs", "configs/data/*.yaml"),
    DocEntry("Environment", Settings, "every job (`recsys.settings.get_settings()`)",
             env_prefix="RECSYS_"),
)


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds directly, in a list or dict, or optionally (else None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is dict:
        return _model_in(typing.get_args(annotation)[1])
    if origin in (list, tuple, typing.Union, types.UnionType):
        models = {m for a in typing.get_args(annotation) if (m := _model_in(a))}
        return models.pop() if len(models) == 1 else None
    return None


def type_name(annotation: Any) -> str:
    """A short, stable spelling of a type (``int | None``, ``'ddp' | 'deepspeed'``)."""
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else str(a).lower()
                            if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def constraints(field: FieldInfo) -> str:
    """Bounds declared with ``Field(ge=..., min_length=...)``, as ``>= 1, < 1``."""
    symbols = {annotated_types.Ge: ("ge", ">="), annotated_types.Gt: ("gt", ">"),
               annotated_types.Le: ("le", "<="), annotated_types.Lt: ("lt", "<"),
               annotated_types.MinLen: ("min_length", "min length"),
               annotated_types.MaxLen: ("max_length", "max length")}
    parts = []
    for meta in field.metadata:
        for cls, (attr, symbol) in symbols.items():
            if isinstance(meta, cls):
                parts.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{_json(value)}`"


def _json(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, default=str)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def walk(model: type[BaseModel], title: str, prefix: str = ""
         ) -> Iterator[tuple[str, type[BaseModel], list[Row]]]:
    """(section path, model, rows) for the model, then for each nested config section."""
    rows: list[Row] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        kind = type_name(field.annotation)
        bounds = constraints(field)
        description = field.description or ""
        if sub is not None:
            section = key + {list: "[]", dict: ".<name>"}.get(typing.get_origin(field.annotation),
                                                               "")
            nested.append((section, sub))
            description = (description + " " if description else "") + (
                f"See [`{section}`](#{_anchor(f'{title} {section}')}).")
        rows.append(Row(key, kind + (f" ({bounds})" if bounds else ""), default_text(field),
                        description))
    yield prefix.rstrip("."), model, rows
    for key, sub in nested:
        yield from walk(sub, title, key + ".")


def _anchor(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def render_entry(entry: DocEntry) -> str:
    lines = [f"## {entry.title}: `{entry.model.__name__}`", ""]
    module = entry.model.__module__
    lines.append(f"Schema `{module}.{entry.model.__name__}`, read by {entry.used_by}.")
    if entry.yaml_glob:
        lines.append(f"Shipped files: `{entry.yaml_glob}`.")
    doc = inspect.cleandoc(entry.model.__doc__ or "")
    if doc:
        lines += ["", _cell(doc.split("\n\n")[0])]
    for section, model, rows in walk(entry.model, entry.title):
        if entry.env_prefix:
            rows = [Row(f"{entry.env_prefix}{r.key.upper()}", r.type, r.default, r.description)
                    for r in rows]
        if section:
            lines += ["", f"### {entry.title} `{section}`", ""]
            if model.__doc__ and model is not entry.model:
                lines += [f"`{model.__name__}`: {_cell(inspect.cleandoc(model.__doc__))}", ""]
        else:
            lines.append("")
        header = "variable" if entry.env_prefix else "key"
        lines += [f"| {header} | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |"
                  for r in rows]
    return "\n".join(lines)


def render(registry: tuple[DocEntry, ...] = REGISTRY) -> str:
    """The whole of ``docs/configs.md``: deterministic (no dates, no paths of this machine)."""
    head = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m recsys.docs` from the pydantic schemas; do not edit. -->",
        "",
        "Every job reads one YAML file validated by the schema below (unknown keys are errors)",
        "and takes dotted overrides on the command line, e.g. `optim.lr=3e-4`. Keys are shown",
        "by their dotted path; `x[]` is a list whose items have the keys listed under it.",
        "",
        *(f"* [{e.title}](#{_anchor(f'{e.title}: {e.model.__name__}')})" for e in registry),
    ]
    return "\n".join(head) + "\n\n" + "\n\n".join(render_entry(e) for e in registry) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if the file is stale")
    p.add_argument("--out", type=Path, default=DOC_PATH)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m recsys.docs", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
