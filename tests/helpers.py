"""Helpers for the tests that break inputs and outputs through the user-facing entry points
(``lggseg predict`` and the stage scripts): every bad input gives exit status 2 and a one-line message
naming the file (or parameter) and the problem, and leaves existing outputs byte-for-byte as they were
with no partial or temporary output beside them. The fixtures that go with them (``raw_template``,
``raw``, ``attr_model``, ``manifest_stage``) are in ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from lggseg.cli import main as cli
from test_predict import tree_state

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_SLICES = 4  # slices kept per case of raw_template: small inputs, still several batches
MARKER = b"previous output, must survive"


def load_stage(name: str) -> ModuleType:
    """``stages/<name>.py`` as a module (its ``main(argv) -> int``)."""
    spec = importlib.util.spec_from_file_location(f"_stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def previous_output(path: Path) -> Path:
    """A previous ``lggseg predict`` output (or stage output) that a failing run must leave alone."""
    path.mkdir(parents=True)
    (path / "predict.json").write_bytes(MARKER)
    (path / "summary.csv").write_bytes(MARKER)
    (path / "old_pred.png").write_bytes(MARKER)
    return path


def assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    """``out`` holds exactly ``before`` (a :func:`tree_state`) and nothing temporary lies beside it."""
    assert tree_state(out) == before, f"{out} changed"
    strays = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert strays == [], f"temporary outputs left beside {out}: {strays}"


def run_predict(capsys, model: Path, inp: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``lggseg predict`` through the console script's router; returns the exit status and stderr."""
    code = cli(["predict", "--model", str(model), "--input", str(inp), "--output", str(out), "--batch-size", "3", *extra])
    return code, capsys.readouterr().err


def case_dir(raw: Path, k: int = 1) -> Path:
    """The ``k``-th case folder of a kaggle_3m folder."""
    return sorted(p for p in raw.iterdir() if p.is_dir())[k]


def slice_path(raw: Path, n: int = 2, mask: bool = False, k: int = 1) -> Path:
    """Slice ``n`` (or its mask) of case ``k``."""
    case = case_dir(raw, k)
    return case / f"{case.name}_{n}{'_mask' if mask else ''}.tif"
