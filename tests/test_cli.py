"""The ``lggseg`` console script routes each sub-command to its module's ``main(argv)``."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import lggseg.cli as cli
from helpers import run_predict
from lggseg.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_console_script_is_declared_and_installed():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lggseg": "lggseg.cli:main"}
    installed = [ep for ep in entry_points(group="console_scripts") if ep.name == "lggseg"]
    assert installed and installed[0].value == "lggseg.cli:main"


def test_every_command_module_has_main():
    for name, (module, text) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
        assert text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_are_routed_with_their_arguments(monkeypatch, name):
    module = importlib.import_module(COMMANDS[name][0])
    calls = []
    monkeypatch.setattr(module, "main", lambda argv=None: calls.append(argv) or 7)
    assert main([name, "--x", "1"]) == 7
    assert calls == [["--x", "1"]]


def test_help_and_usage_errors(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "code", "needle"), [
    (["predict", "--help"], 0, "--allow-missing-attributes"),
    (["predict", "--model", "m"], 2, "required"),
    (["predict", "--model", "m", "--input", "i", "--output", "o", "--device", "tpu"], 2, "invalid choice"),
    (["demo", "--help"], 0, "--overrides"),
])
def test_subcommand_help_and_argument_errors_return_codes(capsys, argv, code, needle):
    assert main(argv) == code
    captured = capsys.readouterr()
    assert needle in captured.out + captured.err


@pytest.mark.parametrize(("command", "module"), [("demo", "lggseg.workspace"), ("report", "lggseg.reporting.merge")])
def test_command_runs_the_module_that_implements_it(monkeypatch, command, module):
    """Patched where it lives (not looked up through COMMANDS): the router must reach that very function."""
    mod = importlib.import_module(module)
    calls = []
    monkeypatch.setattr(mod, "main", lambda argv=None: calls.append(argv) or 5)
    assert main([command, "--flag"]) == 5
    assert calls == [["--flag"]]


def test_runs_as_a_program_without_importing_torch():
    code = "import sys, lggseg.cli as c; rc = c.main(['--help']); assert 'torch' not in sys.modules; sys.exit(rc)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "predict" in res.stdout and "demo" in res.stdout


def test_module_entry(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lggseg", "--help"])
    assert cli.main() == 0


# --------------------------------------------------------------------------- option errors of a command reach the user


@pytest.mark.parametrize(("args", "needle"), [
    (["--threshold", "1.5"], "--threshold must be in (0, 1)"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--postprocess-min-area", "-3"], "--postprocess-min-area must be a non-negative integer"),
])
def test_nonsense_predict_options(capsys, raw, attr_model, tmp_path, args, needle):
    code, err = run_predict(capsys, attr_model, raw, tmp_path / "out", *args)
    assert code == 2 and needle in err
    assert not (tmp_path / "out").exists()
