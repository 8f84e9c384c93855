"""One error root: every error meant for a user is an ``LggsegError``, and every stage says it in one line.

A full disk at the moment an output is put in place (the final ``os.replace`` of :mod:`lggseg.io`) is
an :class:`~lggseg.errors.OutputError`; the stage scripts catch ``LggsegError`` only, so fetch,
manifest, evaluate and report print one line naming the output and exit with status 2, and leave no
output and no temporary file behind.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import lggseg.io
from lggseg import errors
from lggseg.config import ConfigError
from lggseg.errors import LggsegError, OutputError

REPO = Path(__file__).resolve().parents[1]


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"_errors_stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_user_error_has_one_root():
    for name in ("ConfigError", "OutputError", "DataError", "FetchError", "ModelError", "TrainingError"):
        assert issubclass(getattr(errors, name), LggsegError), name
    # still what callers caught before the one root
    assert issubclass(ConfigError, ValueError) and issubclass(OutputError, OSError)
    assert lggseg.io.OutputError is OutputError


def test_stage_scripts_catch_only_the_root():
    for script in sorted((REPO / "stages").glob("*.py")):
        text = script.read_text()
        if "except" in text:
            assert "except LggsegError as exc" in text, script.name
            assert "USER_ERRORS" not in text and "OutputError" not in text, script.name


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def _full_disk(monkeypatch):
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lggseg.io.os, "replace", no_space)


def _one_line(err: str, prefix: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "No space left on device" in lines[0], err


def test_fetch_on_a_full_disk(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("fetch: {source: demo, demo_cases: 3}\n")
    before = _files(tmp_path)
    _full_disk(monkeypatch)
    rc = load_stage("fetch").main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw"),
                                   "--fingerprint", str(tmp_path / "metrics" / "fetch.json")])
    monkeypatch.undo()
    _one_line(capsys.readouterr().err, "fetch:")
    assert rc == 2 and _files(tmp_path) - before <= {Path("metrics")}


def test_manifest_on_a_full_disk(demo_kaggle_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("common: {image_size: 64}\n")
    before = _files(tmp_path)
    _full_disk(monkeypatch)
    rc = load_stage("manifest").main(["--params", str(tmp_path / "params.yaml"), "--raw", str(demo_kaggle_dir),
                                      "--out", str(tmp_path / "manifest"), "--summary", str(tmp_path / "data.json")])
    monkeypatch.undo()
    _one_line(capsys.readouterr().err, "manifest:")
    assert rc == 2 and _files(tmp_path) == before


@pytest.mark.slow
def test_evaluate_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from lggseg.config import CommonConfig, ManifestConfig, ModelConfig
    from lggseg.data.manifest import build_manifest
    from lggseg.data.store import load_store
    from lggseg.data.synthetic import generate_demo
    from lggseg.models import build_model, save_model

    raw = generate_demo(tmp_path / "raw", n_cases=3, seed=0)
    build_manifest(raw, tmp_path / "manifest", CommonConfig(image_size=64), ManifestConfig(split_fractions=(0.34, 0.33, 0.33)))
    store = load_store(tmp_path / "manifest")
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", pretrained=False), len(store.attribute_names), image_size=64)
    save_model(model, tmp_path / "models" / "seed_3", {"attribute_names": store.attribute_names, "seed": 3})
    (tmp_path / "params.yaml").write_text("common: {device: cpu}\nevaluate: {batch_size: 8, bootstrap_samples: 100}\n")
    (tmp_path / "out").mkdir()
    _full_disk(monkeypatch)
    rc = load_stage("evaluate").main([
        "--params", str(tmp_path / "params.yaml"), "--variant", "v", "--models", str(tmp_path / "models"),
        "--data", str(tmp_path / "manifest"), "--metrics", str(tmp_path / "out" / "v.json"),
        "--rows", str(tmp_path / "out" / "eval"),
    ])
    monkeypatch.undo()
    _one_line(capsys.readouterr().err, "evaluate@v:")
    assert rc == 2 and _files(tmp_path / "out") == set()


def test_report_on_a_full_disk(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "tests" / "reporting"))
    from test_report import PARAMS, write_inputs

    dirs = write_inputs(tmp_path, PARAMS)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    before = _files(tmp_path)
    _full_disk(monkeypatch)
    rc = load_stage("report").main([
        "--params", str(tmp_path / "params.yaml"), "--metrics", str(dirs["metrics"]), "--eval", str(dirs["eval"]),
        "--manifest", str(dirs["manifest"]), "--tables", str(dirs["metrics"] / "tables.md"), "--plots", str(dirs["plots"]),
    ])
    monkeypatch.undo()
    _one_line(capsys.readouterr().err, "report:")
    assert rc == 2 and _files(tmp_path) == before
