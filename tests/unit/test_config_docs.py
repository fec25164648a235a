"""docs/configs.md is generated from the schemas (``python -m recsys.docs``) and must not drift."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

from pydantic import Field

from recsys.config import StrictModel
from recsys.docs import DOC_PATH, REGISTRY, DocEntry, main, render, render_entry, walk

REPO = Path(__file__).resolve().parents[2]


def test_docs_configs_md_is_current() -> None:
    assert DOC_PATH == REPO / "docs" / "configs.md"
    assert DOC_PATH.exists(), "docs/configs.md is missing: run python -m recsys.docs"
    assert DOC_PATH.read_text() == render(), (
        "docs/configs.md is stale (a config schema changed): run python -m recsys.docs")


def test_check_flag_reports_stale_file(tmp_path: Path) -> None:
    out = tmp_path / "configs.md"
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("| `optim.lr` |", "| `optim.learning_rate` |"))
    assert main(["--check", "--out", str(out)]) == 1


class _Leaf(StrictModel):
    """A nested section."""

    rate: float = Field(0.5, gt=0, lt=1)
    """Fraction of things."""


class _Item(StrictModel):
    name: str = Field(description="what it is called")


class _Job(StrictModel):
    """A toy job config."""

    mode: Literal["a", "b"] = "a"
    count: int = Field(ge=1)
    leaf: _Leaf = _Leaf()
    items: list[_Item] = []
    maybe: _Leaf | None = None
    named: dict[str, _Item] = {}


def test_walk_documents_nested_sections_docstrings_and_bounds() -> None:
    sections = {path: rows for path, _, rows in walk(_Job, "Toy")}
    assert list(sections) == ["", "leaf", "items[]", "maybe", "named.<name>"]
    top = {r.key: r for r in sections[""]}
    assert top["mode"].type == '"a" | "b"' and top["mode"].default == '`"a"`'
    assert top["count"].default == "**required**" and top["count"].type == "int (>= 1)"
    assert "#toy-leaf" in top["leaf"].description and top["leaf"].default == "(section)"
    assert "#toy-items" in top["items"].description
    (rate,) = sections["leaf"]
    assert (rate.key, rate.type, rate.description) == ("leaf.rate", "float (> 0, < 1)",
                                                       "Fraction of things.")
    assert sections["items[]"][0].description == "what it is called"
    text = render_entry(DocEntry("Toy", _Job, "tests"))
    assert "### Toy `leaf`" in text and "`_Leaf`: A nested section." in text


def test_every_field_of_every_registered_model_has_a_row() -> None:
    text = render()
    for entry in REGISTRY:
        for path, model, rows in walk(entry.model, entry.title):
            assert [r.key.rsplit(".", 1)[-1].removesuffix("[]") for r in rows] == list(
                model.model_fields), (entry.title, path)
        assert f"## {entry.title}: `{entry.model.__name__}`" in text
    assert "| `optim.lr` |" in text and "| `RECSYS_MLFLOW_TRACKING_URI` |" in text


def _load_config_classes() -> dict[str, str]:
    """Class names passed to ``load_config(Cls, ...)`` or the job runner ``run_job(Cls, ...)``
    anywhere in the library and jobs."""
    found: dict[str, str] = {}
    for root in ("recsys", "jobs", "serve", "tune"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call)
                        and getattr(node.func, "id", None) in ("load_config", "run_job")
                        and node.args and isinstance(node.args[0], ast.Name)
                        # a class, not the runner's own generic ``load_config(schema, ...)``
                        and node.args[0].id[:1].isupper()):
                    found[node.args[0].id] = str(path.relative_to(REPO))
    return found


def test_registry_covers_every_job_config() -> None:
    """A config class loaded by a job but missing from recsys.docs.REGISTRY fails here: add a
    DocEntry for it and run python -m recsys.docs."""
    documented = {e.model.__name__ for e in REGISTRY}
    found = _load_config_classes()
    assert {"EvaluateConfig", "SweepConfig", "TrainJobConfig", "DataConfig"} <= set(found)
    missing = {name: where for name, where in found.items() if name not in documented}
    assert not missing, f"config classes not in recsys.docs.REGISTRY: {missing}"
