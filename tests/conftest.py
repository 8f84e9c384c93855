"""Shared fixtures: paths to the real LGG copy (skipped when absent) and small generated data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# LGGSEG_SHARED_LGG points a git worktree (whose ../shared is elsewhere) at the copy; tests only.
SHARED_LGG = Path(os.environ.get("LGGSEG_SHARED_LGG") or REPO.parent / "shared" / "lgg")


def shared_lgg_available() -> bool:
    return (SHARED_LGG / "restore.py").is_file() and (SHARED_LGG / "kaggle_3m").is_dir()


@pytest.fixture(scope="session")
def real_kaggle_dir(tmp_path_factory) -> Path:
    """A real 5-case subset restored from ../shared/lgg in the exact Kaggle layout (skips when absent)."""
    if not shared_lgg_available():
        pytest.skip("../shared/lgg (real LGG copy) is not available")
    dest = tmp_path_factory.mktemp("real5")
    subprocess.run([sys.executable, str(SHARED_LGG / "restore.py"), str(dest), "--cases", "5"], check=True, capture_output=True)
    return dest / "kaggle_3m"


@pytest.fixture(scope="session")
def demo_kaggle_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (``lggseg.data.synthetic``: 6 cases, seed 0) in the Kaggle layout; read-only."""
    from lggseg.data.synthetic import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo6"), n_cases=6, seed=0)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A manifest store of 3 synthetic demo cases at 64 px (training tests)."""
    from lggseg.config import CommonConfig, ManifestConfig
    from lggseg.data.manifest import build_manifest
    from lggseg.data.synthetic import generate_demo

    root = tmp_path_factory.mktemp("demo3")
    raw = generate_demo(root / "raw", 3, 23)
    build_manifest(raw, root / "store", CommonConfig(image_size=64), ManifestConfig())
    return root / "store"


# --------------------------------------------------------------------------- broken inputs (tests/helpers.py)


@pytest.fixture(scope="module")
def raw_template(demo_kaggle_dir, tmp_path_factory) -> Path:
    """Three demo cases of ``helpers.N_SLICES`` slices each plus the demo data.csv (all six patients)."""
    import shutil

    from helpers import N_SLICES
    from test_predict import copy_case

    root = tmp_path_factory.mktemp("raw_template") / "kaggle_3m"
    cases = sorted(p for p in demo_kaggle_dir.iterdir() if p.is_dir())[:3]
    for case in cases:
        copy_case(case, root, N_SLICES)
    shutil.copy(demo_kaggle_dir / "data.csv", root)
    return root


@pytest.fixture(scope="module")
def attr_model(raw_template, tmp_path_factory) -> Path:
    """A tiny attribute-encoder model whose attribute names are those of the template's data.csv."""
    from test_predict import attribute_names, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("attr_model") / "seed_1", attribute_names(raw_template))


@pytest.fixture()
def raw(raw_template, tmp_path) -> Path:
    """A fresh, writable copy of the template for one test to break."""
    import shutil

    return Path(shutil.copytree(raw_template, tmp_path / "in" / "kaggle_3m"))


@pytest.fixture(scope="module")
def manifest_stage():
    """``stages/manifest.py`` as a module."""
    from helpers import load_stage

    return load_stage("manifest")
