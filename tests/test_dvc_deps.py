"""dvc.yaml's code deps cover what each stage script imports (issue #12), so they cannot drift.

For every stage whose command runs ``stages/<name>.py``, the lggseg modules the script imports, and
everything those import in turn (grimp's graph, function-level imports included), must lie in a file
or folder the stage lists under ``deps``. Left out on purpose: :mod:`lggseg.errors` and :mod:`lggseg.io`
(messages and atomic writing cannot change a result), and for
``train@`` the :mod:`lggseg.config` package (the run's settings reach training as
``configs/<variant>.yaml``, which the ``configure`` stage, depending on ``src/lggseg/config``, writes).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXEMPT = ("lggseg.errors", "lggseg.io")
# the package root holds only __version__, which provenance records and no result depends on
EXEMPT_EXACT = ("lggseg",)
EXEMPT_BY_STAGE = {"train": ("lggseg.config",)}


def _stages() -> list[tuple[str, list[str]]]:
    out = []
    for path in (REPO / "dvc.yaml", REPO / "bench" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            body = stage.get("do", stage)
            out.append((name, [str(d) for d in body.get("deps", [])], body["cmd"]))
    return out


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("lggseg")


def _file(module: str) -> str:
    path = REPO / "src" / Path(*module.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(REPO).as_posix()


@pytest.mark.parametrize(("name", "deps", "cmd"), _stages(), ids=[s[0] for s in _stages()])
def test_code_deps_cover_the_imports(graph, name, deps, cmd):
    script = re.search(r"stages/\w+\.py", cmd).group(0)
    assert script in deps, f"{name}: {script} is not a dep"
    imported = {n.module for n in ast.walk(ast.parse((REPO / script).read_text()))
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("lggseg")}
    closure = set(imported)
    for module in imported:
        closure |= graph.find_upstream_modules(module)
    exempt = EXEMPT + EXEMPT_BY_STAGE.get(name, ())
    needed = {_file(m) for m in closure if m not in EXEMPT_EXACT and not any(m == e or m.startswith(e + ".") for e in exempt)}
    uncovered = sorted(f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not uncovered, f"{name}: dvc.yaml deps miss {uncovered}"
    for dep in deps:  # every listed code dep exists
        if dep.startswith("src/"):
            assert (REPO / dep).exists(), f"{name}: {dep} does not exist"
