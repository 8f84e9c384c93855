"""Bad input, interruption and security, through the user-facing entry points (issue #5).

Every bad input goes through ``lggseg predict`` (:func:`lggseg.cli.main`) or a stage script's
``main(argv)`` and must give exit status 2, a message that names the file (or parameter) and the
problem, and leave existing outputs byte-for-byte as they were with no partial or temporary output
beside them. Unit-level checks of the same problems live in the modules' own tests; these make
sure the user sees them.

Decisions tested here: grayscale and RGBA slices are refused, not converted (as the manifest does:
the three channels are three MRI sequences); a case folder without any mask is accepted by
``predict`` (new data) but refused by the manifest stage (training data needs truth).
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import json
import os
import pickle
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import lggseg.io
from lggseg.cli import main as cli
from lggseg.config import deep_merge, read_params, resolve_variant
from lggseg.errors import ModelError
from lggseg.io import OutputError, atomic_dir, atomic_path, write_bytes, write_json
from lggseg.models import load_model
from test_predict import attribute_names, copy_case, save_tiny_model, tree_state

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_SLICES = 4  # slices kept per case: small inputs, still several batches
MARKER = b"previous output, must survive"


def load_stage(name: str):
    """``stages/<name>.py`` as a module (its ``main(argv) -> int``)."""
    spec = importlib.util.spec_from_file_location(f"_stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw_template(demo_kaggle_dir, tmp_path_factory) -> Path:
    """Three demo cases of N_SLICES slices each plus the demo data.csv (all six patients)."""
    root = tmp_path_factory.mktemp("raw_template") / "kaggle_3m"
    cases = sorted(p for p in demo_kaggle_dir.iterdir() if p.is_dir())[:3]
    for case in cases:
        copy_case(case, root, N_SLICES)
    shutil.copy(demo_kaggle_dir / "data.csv", root)
    return root


@pytest.fixture(scope="module")
def attr_model(raw_template, tmp_path_factory) -> Path:
    """A tiny attribute-encoder model whose attribute names are those of the template's data.csv."""
    return save_tiny_model(tmp_path_factory.mktemp("attr_model") / "seed_1", attribute_names(raw_template))


@pytest.fixture()
def raw(raw_template, tmp_path) -> Path:
    """A fresh, writable copy of the template for one test to break."""
    return Path(shutil.copytree(raw_template, tmp_path / "in" / "kaggle_3m"))


def previous_output(path: Path) -> Path:
    """A previous ``lggseg predict`` output (or stage output) that a failing run must leave alone."""
    path.mkdir(parents=True)
    (path / "predict.json").write_bytes(MARKER)
    (path / "summary.csv").write_bytes(MARKER)
    (path / "old_pred.png").write_bytes(MARKER)
    return path


def assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert tree_state(out) == before, f"{out} changed"
    strays = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert strays == [], f"temporary outputs left beside {out}: {strays}"


def run_predict(capsys, model: Path, inp: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = cli(["predict", "--model", str(model), "--input", str(inp), "--output", str(out), "--batch-size", "3", *extra])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- bad slices and case folders


def _case(raw: Path, k: int = 1) -> Path:
    return sorted(p for p in raw.iterdir() if p.is_dir())[k]


def _slice(raw: Path, n: int = 2, mask: bool = False, k: int = 1) -> Path:
    case = _case(raw, k)
    return case / f"{case.name}_{n}{'_mask' if mask else ''}.tif"


def truncate(raw):
    p = _slice(raw)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p, "unreadable or truncated"


def garbage(raw):
    p = _slice(raw)
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return p, "unreadable"


def wrong_shape(raw):
    p = _slice(raw)
    Image.fromarray(np.zeros((128, 192, 3), np.uint8)).save(p)
    return p, "image is 192x128"


def sixteen_bit_rgb(raw):
    p = _slice(raw)
    tifffile.imwrite(p, np.full((256, 256, 3), 1000, np.uint16))
    return p, "16-bit"


def float_slice(raw):
    p = _slice(raw)
    tifffile.imwrite(p, np.zeros((256, 256), np.float32))
    return p, "single-channel"


def grayscale(raw):
    p = _slice(raw)
    Image.open(p).convert("L").save(p)
    return p, "single-channel"


def rgba(raw):
    p = _slice(raw)
    Image.open(p).convert("RGBA").save(p)
    return p, "4 channels"


def mask_values(raw):
    p = _slice(raw, mask=True)
    m = np.asarray(Image.open(p)).copy()
    m[5, 5] = 128
    Image.fromarray(m).save(p)
    return p, r"values \[128\] besides 0 and 255"


def mask_rgb(raw):
    p = _slice(raw, mask=True)
    Image.open(p).convert("RGB").save(p)
    return p, "mask has shape"


def image_without_mask(raw):
    _slice(raw, n=3, mask=True).unlink()
    return _slice(raw, n=3), "image without mask"


def mask_without_image(raw):
    _slice(raw, n=3).unlink()
    return _slice(raw, n=3, mask=True), "mask without image"


def slice_gap(raw):
    case = _case(raw)
    for suffix in ("", "_mask"):
        (case / f"{case.name}_{N_SLICES}{suffix}.tif").rename(case / f"{case.name}_{N_SLICES + 2}{suffix}.tif")
    return case, rf"not contiguous 1..{N_SLICES + 2}: missing \[{N_SLICES}, {N_SLICES + 1}\]"


def stray_file(raw):
    p = _case(raw) / "notes.txt"
    p.write_text("hello")
    return p, "unexpected entry"


def case_missing_from_csv(raw):
    case = _case(raw)
    patient = "_".join(case.name.split("_")[:3])
    lines = (raw / "data.csv").read_text().splitlines(keepends=True)
    (raw / "data.csv").write_text("".join(line for line in lines if not line.startswith(patient)))
    return raw / "data.csv", f"no row for patient {patient}"


def _set_cluster(raw, value):
    case = _case(raw)
    patient = "_".join(case.name.split("_")[:3])
    lines = (raw / "data.csv").read_text().splitlines(keepends=True)
    header = lines[0].strip().split(",")
    col = header.index("CNCluster")
    out = []
    for line in lines:
        if line.startswith(patient):
            cells = line.rstrip("\n").split(",")
            cells[col] = value
            line = ",".join(cells) + "\n"
        out.append(line)
    (raw / "data.csv").write_text("".join(out))
    return raw / "data.csv"


def cluster_not_a_number(raw):
    return _set_cluster(raw, "high"), "CNCluster of .* is 'high', not a number"


def cluster_negative(raw):
    return _set_cluster(raw, "-1"), "CNCluster of .* is '-1'; expected a non-negative integer"


def cluster_fraction(raw):
    return _set_cluster(raw, "2.5"), "CNCluster of .* is '2.5'; expected a non-negative integer"


BAD_DATA = [
    truncate, garbage, wrong_shape, sixteen_bit_rgb, float_slice, grayscale, rgba, mask_values, mask_rgb,
    image_without_mask, mask_without_image, slice_gap, stray_file, case_missing_from_csv,
    cluster_not_a_number, cluster_negative, cluster_fraction,
]


@pytest.mark.parametrize("breaker", BAD_DATA, ids=lambda f: f.__name__)
def test_bad_data_through_predict(capsys, raw, attr_model, tmp_path, breaker):
    path, problem = breaker(raw)
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    code, err = run_predict(capsys, attr_model, raw, out)
    assert code == 2
    assert str(path) in err
    assert re.search(problem, err), err[-500:]
    assert_untouched(out, before)


@pytest.fixture(scope="module")
def manifest_stage():
    return load_stage("manifest")


@pytest.mark.parametrize("breaker", BAD_DATA, ids=lambda f: f.__name__)
def test_bad_data_through_the_manifest_stage(capsys, raw, tmp_path, manifest_stage, breaker):
    path, problem = breaker(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"common": {"image_size": 64}}))
    store = previous_output(tmp_path / "manifest")
    summary = tmp_path / "metrics" / "data.json"
    summary.parent.mkdir()
    summary.write_bytes(MARKER)
    before = tree_state(store)
    code = manifest_stage.main(
        ["--params", str(tmp_path / "params.yaml"), "--raw", str(raw), "--out", str(store), "--summary", str(summary)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and re.search(problem, err), err[-500:]
    assert_untouched(store, before)
    assert summary.read_bytes() == MARKER


def test_unseen_cluster_category_through_predict(capsys, raw, attr_model, tmp_path):
    csv = _set_cluster(raw, "9")  # a valid category number the model never saw in training
    code, err = run_predict(capsys, attr_model, raw, tmp_path / "out")
    assert code == 2 and str(csv) in err and "is '9', a category the model" in err
    assert not (tmp_path / "out").exists()


def test_missing_patient_is_allowed_with_the_flag(capsys, raw, attr_model, tmp_path):
    case_missing_from_csv(raw)
    code, err = run_predict(capsys, attr_model, _case(raw), tmp_path / "out", "--allow-missing-attributes")
    assert code == 0 and "using the 'missing' category" in err
    assert (tmp_path / "out" / "summary.csv").is_file()


def _empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _a_mask(root: Path) -> Path:
    return _slice(root / "kaggle_3m", mask=True)


def _a_jpeg(root: Path) -> Path:
    (root / "scan.jpg").write_bytes(b"\xff\xd8\xff")
    return root / "scan.jpg"


def _a_folder_of_files(root: Path) -> Path:
    (root / "docs").mkdir()
    (root / "docs" / "readme.txt").write_text("x")
    return root / "docs"


@pytest.mark.parametrize(("make", "needle"), [
    (_empty_folder, "empty input folder"),
    (lambda root: root / "no_such_input", "input not found"),
    (_a_mask, "this is a mask"),
    (_a_jpeg, "not a slice image"),
    (_a_folder_of_files, "neither a case folder"),
])
def test_bad_input_paths(capsys, raw, attr_model, tmp_path, make, needle):
    inp = make(raw.parent)
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    code, err = run_predict(capsys, attr_model, inp, out)
    assert code == 2 and str(inp) in err and needle in err, err
    assert_untouched(out, before)


def test_case_without_masks_predict_accepts_and_manifest_refuses(capsys, raw, attr_model, tmp_path, manifest_stage):
    case = _case(raw)
    for m in case.glob("*_mask.tif"):
        m.unlink()
    code, _ = run_predict(capsys, attr_model, case, tmp_path / "out")
    assert code == 0
    (tmp_path / "params.yaml").write_text("common: {image_size: 64}\n")
    code = manifest_stage.main(["--params", str(tmp_path / "params.yaml"), "--raw", str(raw), "--out", str(tmp_path / "m"),
                                "--summary", str(tmp_path / "d.json")])
    assert code == 2 and "image without mask" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad model directories


class _Boom:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _break_model(kind: str, model: Path, tmp_path: Path) -> tuple[Path, str]:
    weights, meta = model / "model.safetensors", model / "model.json"
    if kind == "missing weights":
        weights.unlink()
        return weights, "model weights not found"
    if kind == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return weights, "unreadable or corrupt weights"
    if kind == "mismatched weights":
        other = save_tiny_model(tmp_path / "other", ["attr:A=1", "attr:A=missing"], image_size=64)
        shutil.copy(other / "model.safetensors", weights)
        return weights, "does not match the model described by"
    if kind == "pickle instead of safetensors":
        with open(weights, "wb") as fh:
            pickle.dump({"x": _Boom(str(tmp_path / "PWNED"))}, fh)
        return weights, "unreadable or corrupt weights"
    if kind == "missing model.json":
        meta.unlink()
        return model, "not a model directory"
    if kind == "malformed model.json":
        meta.write_text("{not json")
        return meta, "unreadable model metadata"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "missing weights", "corrupt weights", "mismatched weights", "pickle instead of safetensors",
    "missing model.json", "malformed model.json",
])
def test_bad_model_dirs(capsys, raw, attr_model, tmp_path, kind):
    model = Path(shutil.copytree(attr_model, tmp_path / "model"))
    path, needle = _break_model(kind, model, tmp_path)
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    code, err = run_predict(capsys, model, raw, out)
    assert code == 2 and str(path) in err and needle in err, err
    assert_untouched(out, before)
    assert not (tmp_path / "PWNED").exists()


def test_several_seeds_need_a_choice(capsys, raw, attr_model, tmp_path):
    variant = tmp_path / "models" / "v"
    for s in (1, 2):
        shutil.copytree(attr_model, variant / f"seed_{s}")
    code, err = run_predict(capsys, variant, raw, tmp_path / "out")
    assert code == 2 and "choose one with --seed" in err
    code, err = run_predict(capsys, variant, raw, tmp_path / "out", "--seed", "5")
    assert code == 2 and "no model for seed 5" in err
    code, _ = run_predict(capsys, variant, _case(raw), tmp_path / "out", "--seed", "2")
    assert code == 0
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["model_dir"].endswith("seed_2")


@pytest.mark.parametrize(("args", "needle"), [
    (["--threshold", "1.5"], "--threshold must be in (0, 1)"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--postprocess-min-area", "-3"], "--postprocess-min-area must be a non-negative integer"),
])
def test_nonsense_options(capsys, raw, attr_model, tmp_path, args, needle):
    code, err = run_predict(capsys, attr_model, raw, tmp_path / "out", *args)
    assert code == 2 and needle in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- unwritable output, full disk


def test_output_under_a_regular_file(capsys, raw, attr_model, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, err = run_predict(capsys, attr_model, raw, out)
    assert code == 2 and str(out) in err and f"{blocker} is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_full_disk_at_the_final_rename(capsys, raw, attr_model, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    before = tree_state(out)

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lggseg.io.os, "replace", no_space)
    code, err = run_predict(capsys, attr_model, _case(raw), out)
    monkeypatch.undo()
    assert code == 2 and str(out) in err and "No space left on device" in err
    assert_untouched(out, before)


def test_full_disk_while_writing_images(capsys, raw, attr_model, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    real_save = Image.Image.save
    calls = []

    def fill_up(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) > 7:  # a few files in, as a disk would fill
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", fill_up)
    code, err = run_predict(capsys, attr_model, raw, out)
    monkeypatch.undo()
    assert code == 2 and str(out) in err and "No space left on device" in err, err
    assert_untouched(out, before)


# --------------------------------------------------------------------------- atomic writes (lggseg.io)


def test_failure_inside_an_atomic_write_leaves_no_file(tmp_path):
    dest = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text('{"dice": 0.8')  # half written
        raise RuntimeError("died mid-write")
    assert list(tmp_path.iterdir()) == []
    dest.write_bytes(MARKER)
    with pytest.raises(ValueError):
        write_json(dest, {"dice": float("nan")})  # refused before anything is written
    assert dest.read_bytes() == MARKER and list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_full_disk_in_atomic_writers(tmp_path, monkeypatch, where):
    dest = tmp_path / "out.bin"
    dest.write_bytes(MARKER)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lggseg.io.os, where, no_space)
    with pytest.raises(OutputError, match=rf"cannot write {dest}: No space left on device"):
        write_bytes(dest, b"new content" * 1000)
    monkeypatch.undo()
    assert dest.read_bytes() == MARKER and sorted(tmp_path.iterdir()) == [dest]


def test_full_disk_in_atomic_dir_keeps_the_old_folder(tmp_path, monkeypatch):
    dest = previous_output(tmp_path / "store")
    before = tree_state(dest)
    real_replace = os.replace

    def no_space(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(lggseg.io.os, "replace", no_space)
    with pytest.raises(OutputError, match="No space left on device"), atomic_dir(dest) as tmp:
        (tmp / "images.npy").write_bytes(b"x" * 100)
    monkeypatch.undo()
    # the old folder was moved aside before the failed rename: it must be back (or never moved)
    assert dest.is_dir(), "atomic_dir lost the previous output when the final rename failed"
    assert_untouched(dest, before)


KILLED_WRITER = """
import os, signal, sys
import lggseg.io as io
def die(fd):
    os.kill(os.getpid(), signal.SIGKILL)
io.os.fsync = die
io.write_bytes(sys.argv[1], b"x" * 10_000_000)
"""


def test_writer_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    dest = tmp_path / "model.safetensors"
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dest)], capture_output=True, env=ENV)
    assert res.returncode == -signal.SIGKILL
    assert not dest.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".model.safetensors.") and n.endswith(".tmp") for n in leftovers), leftovers


# --------------------------------------------------------------------------- nonsense params, rejected before any work

BAD_PARAMS = [
    ({"loss": {"i": 21, "j": 7}}, "loss.i must be smaller than loss.j"),
    ({"loss": {"i": 7, "j": 7}}, "loss.i must be smaller than loss.j"),
    ({"loss": {"i": 6}}, "loss.i must be a positive odd integer"),
    ({"loss": {"j": 20}}, "loss.j must be a positive odd integer"),
    ({"loss": {"i": -3}}, "loss.i must be a positive odd integer"),
    ({"loss": {"i": 0}}, "loss.i must be a positive odd integer"),
    ({"loss": {"alpha": -1.0}}, "loss.alpha must be a non-negative number"),
    ({"loss": {"gamma": -0.5}}, "loss.gamma must be a non-negative number"),
    ({"manifest": {"split_fractions": [0.7, 0.2, 0.2]}}, "manifest.split_fractions must sum to 1"),
    ({"manifest": {"split_fractions": [0.9, 0.1, 0.0]}}, "manifest.split_fractions must be 3 positive numbers"),
    ({"common": {"image_size": 200}}, "common.image_size must be a positive multiple of 16"),
    ({"common": {"image_size": 0}}, "common.image_size must be a positive multiple of 16"),
]


def _bad_params(tmp_path: Path, override: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(read_params(REPO / "params.yaml"), override), sort_keys=False))
    return path


@pytest.mark.parametrize(("override", "needle"), BAD_PARAMS)
def test_configure_stage_rejects_nonsense(capsys, tmp_path, override, needle):
    configs = previous_output(tmp_path / "configs")
    before = tree_state(configs)
    code = load_stage("configure").main(["--params", str(_bad_params(tmp_path, override)), "--out", str(configs)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("configure: ") and err.count("\n") == 1
    assert_untouched(configs, before)


@pytest.mark.parametrize(("override", "needle"), [p for p in BAD_PARAMS if set(p[0]) & {"manifest", "common"}])
def test_manifest_stage_rejects_nonsense_before_reading_data(capsys, tmp_path, manifest_stage, override, needle):
    store = previous_output(tmp_path / "manifest")
    before = tree_state(store)
    # the raw folder does not exist: the params error must come first, before any data is touched
    args = ["--params", str(_bad_params(tmp_path, override)), "--raw", str(tmp_path / "no_such_raw"),
            "--out", str(store), "--summary", str(tmp_path / "data.json")]
    code = manifest_stage.main(args)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "no_such_raw" not in err
    assert_untouched(store, before)
    assert not (tmp_path / "data.json").exists()


@pytest.mark.parametrize(("override", "needle"), [BAD_PARAMS[0], BAD_PARAMS[2], BAD_PARAMS[6], BAD_PARAMS[10]])
def test_train_stage_rejects_an_edited_config(capsys, tmp_path, override, needle):
    good = resolve_variant(read_params(REPO / "params.yaml"), "regnet_attr_bce_dice_outlier").to_dict()
    good["common"] = {**good["common"], **override.get("common", {})}
    good["loss"] = {**good["loss"], **override.get("loss", {})}
    cfg = tmp_path / "regnet_attr_bce_dice_outlier.yaml"
    cfg.write_text(yaml.safe_dump(good, sort_keys=False))
    models = tmp_path / "models"
    args = ["--variant", "regnet_attr_bce_dice_outlier", "--config", str(cfg), "--data", str(tmp_path / "none"), "--out", str(models)]
    code = load_stage("train").main(args)
    assert code == 2 and needle in capsys.readouterr().err
    assert not models.exists()


# --------------------------------------------------------------------------- archives (fetch stage)


def _zip(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """``(name, bytes)`` files and ``(name, "->target")`` symlinks, plus a plausible data.csv."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kaggle_3m/data.csv", "Patient,RNASeqCluster\nTCGA_AA_0001,1\n")
        for name, content in members:
            if isinstance(content, str):
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, content.removeprefix("->"))
            else:
                zf.writestr(name, content)
    return path


@pytest.mark.parametrize(("members", "needle"), [
    ([("kaggle_3m/../../escaped.txt", b"x")], "'..' in path"),
    ([("/tmp/lggseg_absolute_escape.txt", b"x")], "absolute path"),
    ([("kaggle_3m/link", "->../../../etc")], "target escapes the destination"),
    ([("kaggle_3m/link", "->/etc/passwd")], "target escapes the destination"),
    ([("kaggle_3m/dir", "->."), ("kaggle_3m/dir/../../x.txt", b"x")], "kaggle_3m/dir/../../x.txt"),
])
def test_fetch_stage_refuses_unsafe_zips(capsys, tmp_path, members, needle):
    archive = _zip(tmp_path / "lgg.zip", members)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": {"source": str(archive)}}))
    raw = tmp_path / "data" / "raw"
    (raw / "kaggle_3m").mkdir(parents=True)
    (raw / "kaggle_3m" / "data.csv").write_bytes(MARKER)
    (raw / "fingerprint.json").write_bytes(MARKER)
    before = tree_state(raw)
    code = load_stage("fetch").main(
        ["--params", str(tmp_path / "params.yaml"), "--out", str(raw), "--fingerprint", str(tmp_path / "fetch.json")]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(archive) in err and needle in err, err
    assert_untouched(raw, before)
    assert not (tmp_path / "fetch.json").exists()
    assert not Path("/tmp/lggseg_absolute_escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "lgg.zip", "params.yaml"]


# --------------------------------------------------------------------------- security


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _sources() -> list[Path]:
    return sorted([*(REPO / "src").rglob("*.py"), *(REPO / "stages").rglob("*.py")])


def test_no_pickle_loading_anywhere():
    """torch.load only with weights_only=True; no pickle/joblib/dill; numpy never allow_pickle=True."""
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve") for n in names):
                    problems.append(f"{path}:{node.lineno}: imports {names}")
        for call, name in _calls(tree):
            kw = {k.arg: k.value for k in call.keywords}
            weights_only = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if name.split(".")[-2:] == ["torch", "load"] and not weights_only:
                problems.append(f"{path}:{call.lineno}: {name} without weights_only=True")
            if name.endswith("load_state_dict") and name.startswith("timm") and not weights_only:
                problems.append(f"{path}:{call.lineno}: {name} without weights_only=True")
            if name.endswith(("read_pickle", "jit.load")):
                problems.append(f"{path}:{call.lineno}: {name}")
            allow = kw.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{path}:{call.lineno}: {name}(allow_pickle=...)")
    assert problems == []


def test_model_weights_are_safetensors(attr_model):
    assert sorted(p.name for p in attr_model.iterdir()) == ["MODEL_CARD.md", "model.json", "model.safetensors"]
    load_file(str(attr_model / "model.safetensors"))  # a safetensors file, not a pickle


def test_load_model_never_unpickles(attr_model, tmp_path):
    model = Path(shutil.copytree(attr_model, tmp_path / "m"))
    torch.save({"x": _Boom(str(tmp_path / "PWNED"))}, model / "model.safetensors")
    with pytest.raises(ModelError, match="unreadable or corrupt weights"):
        load_model(model)
    assert not (tmp_path / "PWNED").exists()


def test_archive_extraction_has_one_implementation():
    """Only lggseg.data.archive extracts archives; nothing calls extractall/extract/unpack_archive or tarfile."""
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for call, name in _calls(tree):
            if name.split(".")[-1] in ("extractall", "extract", "unpack_archive"):
                offenders.append(f"{path}:{call.lineno}: {name}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and "tarfile" in ([a.name for a in node.names] + [getattr(node, "module", "")]):
                offenders.append(f"{path}:{node.lineno}: imports tarfile")
        text = path.read_text()
        if "zf.open(" in text and path.name != "archive.py":
            offenders.append(f"{path}: reads zip members itself")
    assert offenders == []
    fetch_src = (REPO / "src" / "lggseg" / "data" / "fetch.py").read_text()
    assert "safe_extract_zip(" in fetch_src


SECRET_KEY = "fake-secret-123"
SECRET_USER = "fake-user-secret-456"


def test_kaggle_credentials_never_leak(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"fetch": {"source": "kaggle"}}))
    env = {k: v for k, v in ENV.items() if not k.startswith("KAGGLE")}
    env.update(
        HOME=str(tmp_path / "home"), KAGGLEHUB_CACHE=str(tmp_path / "cache"), XDG_CACHE_HOME=str(tmp_path / "xdg"),
        KAGGLE_USERNAME=SECRET_USER, KAGGLE_KEY=SECRET_KEY,
    )
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "fetch.py"), "--params", "params.yaml", "--out", "data/raw",
         "--fingerprint", "metrics/fetch.json"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0  # offline (or a fake token): it must fail
    assert res.stderr.startswith("fetch: ")
    for secret in (SECRET_KEY, SECRET_USER):
        assert secret not in res.stdout + res.stderr
        leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == []


# --------------------------------------------------------------------------- interruption (SIGKILL)


def tiny_run_config(path: Path, epochs: int) -> Path:
    over = {
        "common": {"image_size": 64, "device": "cpu"},
        "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 32, "attribute_hidden": 16},
        "loss": {"gamma_warmup_epochs": 1, "gamma_ramp_epochs": 0},
        "train": {"epochs": epochs, "batch_size": 4, "num_workers": 0, "cpu_threads": 1, "log_every": 2},
        "seeds": [3],
    }
    run = resolve_variant(deep_merge(read_params(REPO / "params.yaml"), over), "regnet_attr_bce_dice_outlier")
    path.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    return path


def _train_stage(cfg: Path, store: Path, out: Path, log: Path) -> tuple[subprocess.Popen, float]:
    """Start the stage; return it once its epoch progress bar shows (training has begun) and that time."""
    args = [sys.executable, str(REPO / "stages" / "train.py"), "--variant", "regnet_attr_bce_dice_outlier",
            "--config", str(cfg), "--data", str(store), "--out", str(out)]
    # a file, not a pipe: a full pipe would stall the stage
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=fh, env=ENV, cwd=out.parent)
    while proc.poll() is None and b"epoch/s" not in log.read_bytes():
        time.sleep(0.01)
    return proc, time.perf_counter()


def _state(seed_dir: Path) -> str:
    """What a killed run left: nothing, the checkpoint of an epoch, or the finished model."""
    if (seed_dir / "result.json").is_file():
        return "finished"
    state = seed_dir / "checkpoint" / "state.json"
    return f"checkpoint after epoch {json.loads(state.read_text())['epoch']}" if state.is_file() else "no checkpoint"


@pytest.mark.slow
def test_train_stage_killed_at_random_points_resumes_to_the_same_result(demo_kaggle_dir, tmp_path):
    """SIGKILL ``stages/train.py`` at 4 seeded random moments of its training loop, rerunning it
    each time, then let it finish: result and weights equal those of an uninterrupted run (CPU)."""
    from lggseg.config import CommonConfig, ManifestConfig
    from lggseg.data.manifest import build_manifest

    raw = tmp_path / "kaggle_3m"
    for case in sorted(p for p in demo_kaggle_dir.iterdir() if p.is_dir())[:3]:
        copy_case(case, raw)
    shutil.copy(demo_kaggle_dir / "data.csv", raw)
    store = tmp_path / "store"
    build_manifest(raw, store, CommonConfig(image_size=64), ManifestConfig())
    cfg = tiny_run_config(tmp_path / "run.yaml", epochs=6)

    (tmp_path / "ref").mkdir()
    proc, started = _train_stage(cfg, store, tmp_path / "ref" / "models", tmp_path / "ref.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    training = time.perf_counter() - started

    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "models"
    rng = random.Random(20240505)
    kills = []
    for k in range(4):
        log = tmp_path / f"run{k}.log"
        proc, started = _train_stage(cfg, store, out, log)
        # a quarter of the loop at most, so the four kills spread over the whole run
        delay = rng.uniform(0.0, training / 4)
        time.sleep(max(0.0, started + delay - time.perf_counter()))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((round(delay, 2), proc.returncode, _state(out / "seed_3")))
    proc, _ = _train_stage(cfg, store, out, tmp_path / "final.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-2000:]
    print(f"uninterrupted training loop {training:.2f}s; kills (s into the loop, exit, state left): {kills}")
    assert sum(code == -signal.SIGKILL for _, code, _ in kills) >= 2, kills

    a, b = tmp_path / "ref" / "models" / "seed_3", out / "seed_3"
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    for key in ("final", "best_epoch", "best_val_dice", "fingerprint"):
        assert ra[key] == rb[key], key
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (b / "checkpoint").exists()
    assert json.loads((out / "summary.json").read_text())["best_val_dice_mean"] == ra["best_val_dice"]


KILLED_PREDICT = """
import os, signal, sys
import lggseg.predict as P
calls = []
real = P._save_png
def save(path, array):
    calls.append(path)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, array)
P._save_png = save
sys.exit(P.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_predict_killed_mid_run_leaves_previous_output(raw, attr_model, tmp_path):
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    args = ["--model", str(attr_model), "--input", str(raw), "--output", str(out), "--batch-size", "2"]
    res = subprocess.run([sys.executable, "-c", KILLED_PREDICT, *args], capture_output=True, env=ENV)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert tree_state(out) == before
    # a killed process cannot clean up: only a hidden temporary folder may remain, never a complete-looking DIR
    strays = [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
    assert all(p.name.endswith(".tmp") and not (p / "summary.csv").exists() for p in strays)
