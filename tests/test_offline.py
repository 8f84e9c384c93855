"""An offline GPU node (issue #20, point 6): the core package imports without the pipeline's extras
(dvc, dvclive, kagglehub, albumentations) and monai, and ``python -m lggseg`` runs from a source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lggseg.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
ABSENT = ("dvc", "dvclive", "kagglehub", "albumentations", "monai")
CORE = ("lggseg", "lggseg.config", "lggseg.data", "lggseg.models", "lggseg.losses", "lggseg.training",
        "lggseg.inference", "lggseg.evaluation", "lggseg.reproduce", "lggseg.preflight", "lggseg.cli")

# Run first in the child: every import of an ABSENT distribution fails, as where it is not installed,
# and is reported on stderr (an import that is tried, even if caught, is not lazy).
BLOCKER = f'''
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            print(f"blocked import: {{name}}", file=sys.stderr)
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, _Absent())
'''


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_the_extras_are_not_core_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert not core & set(ABSENT)
    assert "segmentation-models-pytorch" in core  # the networks are smp's constructors
    optional = {d.split(">")[0].strip() for ds in project["optional-dependencies"].values() for d in ds}
    assert set(ABSENT) <= optional  # still installed by `make install`


@pytest.mark.slow
def test_core_modules_and_commands_import_without_the_extras():
    modules = [*CORE, *(module for module, _ in COMMANDS.values())]
    res = _run(f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
               f"print('imported', len({modules!r}))")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"imported {len(modules)}" in res.stdout
    assert "blocked import" not in res.stderr, res.stderr  # not even tried: their imports are lazy


def test_python_m_lggseg_runs_from_a_source_tree():
    res = _run("import runpy, sys\nsys.argv = ['lggseg', *sys.argv[1:]]\nrunpy.run_module('lggseg', run_name='__main__')",
               "--help")
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(name in res.stdout for name in COMMANDS)
    res = _run("import runpy, sys\nsys.argv = ['lggseg', *sys.argv[1:]]\nrunpy.run_module('lggseg', run_name='__main__')",
               "frobnicate")
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr
    # and the real `python -m` (no blocker), from a source tree only
    res = subprocess.run([sys.executable, "-m", "lggseg", "--help"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert res.returncode == 0 and "reproduce" in res.stdout
