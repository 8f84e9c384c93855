"""Shared fixtures: paths to the real LGG copy (skipped when absent), small generated data, and the CPU
bf16 set-up a test needs.

A CPU with native bf16 (AVX512-BF16/AMX) trains under bf16 autocast, one without it in float32
(:func:`lggseg.training.step.step_setup`), so a test whose assertions depend on the precision states its
set-up: ``@pytest.mark.cpu_bf16("off")`` (or ``"native"``) sets ``LGGSEG_CPU_BF16`` for that test (and
the subprocesses it starts), whatever the machine. A test marked ``bf16path`` instead follows the switch
and asserts per precision; ``make test`` runs those once under ``LGGSEG_CPU_BF16=off`` and once under
``=native``, so both code paths are checked on either machine type (bf16 is emulated where the CPU
lacks it: slower, same code).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# LGGSEG_SHARED_LGG points a git worktree (whose ../shared is elsewhere) at the copy; tests only.
SHARED_LGG = Path(os.environ.get("LGGSEG_SHARED_LGG") or REPO.parent / "shared" / "lgg")


def pytest_report_header(config) -> str:
    """Which CPU type and switch the run had (CI runs on both types); read without importing torch."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    return f"LGGSEG_CPU_BF16={os.environ.get('LGGSEG_CPU_BF16') or 'auto'}; this CPU has native bf16: {native}"


@pytest.fixture(autouse=True)
def _cpu_bf16_marker(request, monkeypatch) -> None:
    """``@pytest.mark.cpu_bf16("off" | "native" | "auto")``: the test runs under that ``LGGSEG_CPU_BF16``.

    Every test runs without the unsafe channels_last opt-in of the caller's environment (tests set it themselves).
    """
    monkeypatch.delenv("LGGSEG_CPU_CHANNELS_LAST", raising=False)
    marker = request.node.get_closest_marker("cpu_bf16")
    if marker is not None:
        from lggseg.runtime import CPU_BF16_ENV, CPU_BF16_SWITCHES

        (switch,) = marker.args
        assert switch in CPU_BF16_SWITCHES, switch
        monkeypatch.setenv(CPU_BF16_ENV, switch)


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
