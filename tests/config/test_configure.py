"""stages/configure.py: one resolved config per variant, rewritten only when its content changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from lggseg.config import canonical, deep_merge, load_run_config, read_params, resolve_variant

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / "stages" / "configure.py"
OLD = 1_000_000_000  # an mtime (2001) that a rewrite would replace


def _configure(params: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STAGE), "--params", str(params), "--out", str(out)], capture_output=True, text=True, cwd=REPO
    )


def _write(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _age(out: Path) -> None:
    for f in out.glob("*.yaml"):
        os.utime(f, ns=(OLD, OLD))


def _rewritten(out: Path) -> set[str]:
    return {f.stem for f in out.glob("*.yaml") if f.stat().st_mtime_ns != OLD}


def test_one_file_per_variant_equal_to_the_resolved_config(tmp_path):
    params = read_params(REPO / "params.yaml")
    out = tmp_path / "configs"
    res = _configure(REPO / "params.yaml", out)
    assert res.returncode == 0, res.stderr
    assert sorted(f.stem for f in out.glob("*.yaml")) == sorted(params["variants"])
    for name in params["variants"]:
        run = resolve_variant(params, name)
        written = load_run_config(out / f"{name}.yaml")
        assert written == canonical(run)
        if "outlier" in run.loss.terms:  # every loss setting is in use: the config is the resolved one
            assert written == run
        else:
            assert written.loss.terms == run.loss.terms and written.model == run.model and written.train == run.train


def test_only_changed_variants_are_rewritten_and_dropped_ones_removed(tmp_path):
    params = read_params(REPO / "params.yaml")
    p = _write(tmp_path / "params.yaml", params)
    out = tmp_path / "configs"
    assert _configure(p, out).returncode == 0
    _age(out)

    assert _configure(p, out).returncode == 0
    assert _rewritten(out) == set()

    # gamma only matters to the variants whose loss has the outlier term
    params["loss"]["gamma"] = 0.5
    _write(p, params)
    assert _configure(p, out).returncode == 0
    with_outlier = {n for n, v in params["variants"].items() if "outlier" in (v.get("loss") or {}).get("terms", [])}
    assert with_outlier and _rewritten(out) == with_outlier

    _age(out)
    del params["variants"]["unet_bce"]
    _write(p, params)
    assert _configure(p, out).returncode == 0
    assert not (out / "unet_bce.yaml").exists()
    assert _rewritten(out) == set()


def test_invalid_params_exit_2_before_writing(tmp_path):
    params = read_params(REPO / "params.yaml")
    params["variants"]["regnet_bce"]["loss"] = {"i": 8}
    out = tmp_path / "configs"
    res = _configure(_write(tmp_path / "params.yaml", params), out)
    assert res.returncode == 2
    assert "loss.i" in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists() or not list(out.glob("*.yaml"))


def test_cpu_profile_overrides_validate(tmp_path):
    params = deep_merge(read_params(REPO / "params.yaml"), read_params(REPO / "params.cpu.yaml"))
    out = tmp_path / "configs"
    assert _configure(_write(tmp_path / "params.yaml", params), out).returncode == 0
    run = load_run_config(out / "regnet_attr_bce_dice.yaml")
    assert (run.common.image_size, run.common.device, run.model.pretrained) == (64, "cpu", False)
