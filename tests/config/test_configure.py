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
    assert (run.common.image_size, run.common.device, run.model.pretrained) == (96, "cpu", False)
    assert run.seeds == (23, 24, 25)  # the noise floor: this variant alone, three seeds


# The recipe of params.cpu.yaml (issue 21): settings every variant must share, so that a table compares
# only what it is about. A (section, field) listed here that differs between two variants fails.
RECIPE = [("train", f) for f in ("epochs", "max_minutes", "batch_size", "lr", "lr_schedule", "warmup_epochs",
                                 "empty_slice_fraction", "epoch_slices", "amp", "augment", "weight_decay")]
RECIPE += [("common", "image_size"), ("model", "pretrained"), ("model", "decoder_channels")]


def test_cpu_profile_is_one_recipe_for_all_twelve_variants():
    base = read_params(REPO / "params.yaml")
    params = deep_merge(base, read_params(REPO / "params.cpu.yaml"))
    assert list(params["variants"]) == list(base["variants"]) and len(params["variants"]) == 12
    runs = {name: resolve_variant(params, name) for name in params["variants"]}
    for section, field in RECIPE:
        values = {name: repr(getattr(getattr(run, section), field)) for name, run in runs.items()}
        assert len(set(values.values())) == 1, (section, field, values)
    one = runs["regnet_bce"]
    assert (one.common.image_size, one.train.epochs, one.train.empty_slice_fraction) == (96, 8, 0.33)
    assert (one.train.lr_schedule, one.train.augment.extra, one.model.pretrained) == ("cosine", True, False)
    # the paper's models are kept: encoders and heads as in params.yaml
    for name, run in runs.items():
        plain = resolve_variant(base, name)
        assert (run.model.arch, run.model.encoder, run.model.attributes, run.loss.terms) == \
            (plain.model.arch, plain.model.encoder, plain.model.attributes, plain.loss.terms), name
    # only the noise-floor variant has three seeds; the outlier variants reach full gamma in the plan
    assert {n: r.seeds for n, r in runs.items() if r.seeds != (23,)} == {"regnet_attr_bce_dice": (23, 24, 25)}
    outl = runs["regnet_attr_bce_dice_outlier"].loss
    assert outl.gamma_warmup_fraction + outl.gamma_ramp_fraction < 1
