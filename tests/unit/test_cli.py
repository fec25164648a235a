"""One ``recsys`` command line reaches every job, runs the same function as ``python -m jobs.X``,
and rejects a misspelt config key with exit code 2 and the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recsys.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]

# subcommand -> a shipped config it accepts
CONFIGS = {
    "pipeline": "configs/pipeline/demo.yaml",
    "pretrain": "configs/train/pretrain.yaml",
    "transfer": "configs/train/transfer.yaml",
    "scratch": "configs/train/scratch.yaml",
    "evaluate": "configs/eval/demo.yaml",
    "tune": "tune/sweeps/demo.yaml",
    "examples": "configs/data/scientific.yaml",
    "monitor": "configs/monitor/monitor.yaml",
}


def test_every_job_module_has_a_subcommand() -> None:
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__"}
    assert jobs <= set(COMMANDS), f"jobs without a `recsys` subcommand: {jobs - set(COMMANDS)}"
    assert {"ingest", "examples", "registry", "docs"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_answers_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_bad_config_key_exits_2_naming_it(command: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main([command, "--config", CONFIGS[command], "bogus_section.key=1"]) == 2
    assert "unknown key 'bogus_section'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pipeline", "pretrain", "evaluate", "tune", "stop"])
def test_subcommand_runs_the_job_modules_main(command: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module(f"jobs.{command}")
    seen: list[list[str]] = []

    def fake_main(argv: list[str] | None = None) -> int:
        seen.append(list(argv or []))
        return 7

    monkeypatch.setattr(module, "main", fake_main)
    assert main([command, "--config", "x.yaml", "a.b=1"]) == 7
    assert seen == [["--config", "x.yaml", "a.b=1"]]


def test_unknown_command_and_no_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_console_entry_point_exits_2_naming_the_key() -> None:
    """As a user runs it: a separate process, exit status and stderr."""
    r = subprocess.run([sys.executable, "-m", "recsys.cli", "evaluate", "--config",
                        "configs/eval/demo.yaml", "metricz=1"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "unknown key 'metricz'" in r.stderr
