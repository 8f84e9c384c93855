"""Large-file guard: data, weights and anything big never enter git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
FORBIDDEN_SUFFIXES = {".tif", ".tiff", ".npy", ".npz", ".pt", ".pth", ".ckpt", ".safetensors", ".zip", ".webp"}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


def test_no_large_files_tracked():
    big = [str(p.relative_to(REPO)) for p in _tracked() if p.is_file() and p.stat().st_size > MAX_BYTES]
    assert big == [], f"files over {MAX_BYTES} bytes are tracked by git (put data/weights under DVC): {big}"


def test_no_data_or_weights_tracked():
    bad = [str(p.relative_to(REPO)) for p in _tracked() if p.suffix.lower() in FORBIDDEN_SUFFIXES]
    assert bad == [], f"data or weight files are tracked by git: {bad}"


def test_package_never_names_shared_folder():
    offenders = []
    for folder in ("src", "stages"):
        for path in (REPO / folder).rglob("*.py"):
            if "../shared" in path.read_text() or "/shared/lgg" in path.read_text():
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"src/ and stages/ must not depend on ../shared: {offenders}"
