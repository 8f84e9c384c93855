"""Bad slices, case folders and data.csv through the user-facing entry points: ``lggseg predict`` and the
manifest stage read slices through :mod:`lggseg.data.layout`, so both refuse the same files.

Each breaker damages a fresh copy of the demo template (``raw`` in conftest.py) and returns the path
the message must name and a pattern of the problem; the run must exit 2 and leave the previous output
byte-for-byte as it was (:func:`helpers.assert_untouched`). Unit-level checks of the same problems are
in ``test_manifest.py``.

Decisions tested here: grayscale and RGBA slices are refused, not converted (as the manifest does:
the three channels are three MRI sequences); a case folder without any mask is accepted by
``predict`` (new data) but refused by the manifest stage (training data needs truth).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from helpers import MARKER, N_SLICES, assert_untouched, case_dir, previous_output, run_predict, slice_path
from test_predict import tree_state


def truncate(raw):
    p = slice_path(raw)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p, "unreadable or truncated"


def garbage(raw):
    p = slice_path(raw)
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return p, "unreadable"


def wrong_shape(raw):
    p = slice_path(raw)
    Image.fromarray(np.zeros((128, 192, 3), np.uint8)).save(p)
    return p, "image is 192x128"


def sixteen_bit_rgb(raw):
    p = slice_path(raw)
    tifffile.imwrite(p, np.full((256, 256, 3), 1000, np.uint16))
    return p, "16-bit"


def float_slice(raw):
    p = slice_path(raw)
    tifffile.imwrite(p, np.zeros((256, 256), np.float32))
    return p, "single-channel"


def grayscale(raw):
    p = slice_path(raw)
    Image.open(p).convert("L").save(p)
    return p, "single-channel"


def rgba(raw):
    p = slice_path(raw)
    Image.open(p).convert("RGBA").save(p)
    return p, "4 channels"


def mask_values(raw):
    p = slice_path(raw, mask=True)
    m = np.asarray(Image.open(p)).copy()
    m[5, 5] = 128
    Image.fromarray(m).save(p)
    return p, r"values \[128\] besides 0 and 255"


def mask_rgb(raw):
    p = slice_path(raw, mask=True)
    Image.open(p).convert("RGB").save(p)
    return p, "mask has shape"


def image_without_mask(raw):
    slice_path(raw, n=3, mask=True).unlink()
    return slice_path(raw, n=3), "image without mask"


def mask_without_image(raw):
    slice_path(raw, n=3).unlink()
    return slice_path(raw, n=3, mask=True), "mask without image"


def slice_gap(raw):
    case = case_dir(raw)
    for suffix in ("", "_mask"):
        (case / f"{case.name}_{N_SLICES}{suffix}.tif").rename(case / f"{case.name}_{N_SLICES + 2}{suffix}.tif")
    return case, rf"not contiguous 1..{N_SLICES + 2}: missing \[{N_SLICES}, {N_SLICES + 1}\]"


def stray_file(raw):
    p = case_dir(raw) / "notes.txt"
    p.write_text("hello")
    return p, "unexpected entry"


def case_missing_from_csv(raw):
    case = case_dir(raw)
    patient = "_".join(case.name.split("_")[:3])
    lines = (raw / "data.csv").read_text().splitlines(keepends=True)
    (raw / "data.csv").write_text("".join(line for line in lines if not line.startswith(patient)))
    return raw / "data.csv", f"no row for patient {patient}"


def _set_cluster(raw, value):
    case = case_dir(raw)
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
    code, err = run_predict(capsys, attr_model, case_dir(raw), tmp_path / "out", "--allow-missing-attributes")
    assert code == 0 and "using the 'missing' category" in err
    assert (tmp_path / "out" / "summary.csv").is_file()


def _empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _a_mask(root: Path) -> Path:
    return slice_path(root / "kaggle_3m", mask=True)


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
    case = case_dir(raw)
    for m in case.glob("*_mask.tif"):
        m.unlink()
    code, _ = run_predict(capsys, attr_model, case, tmp_path / "out")
    assert code == 0
    (tmp_path / "params.yaml").write_text("common: {image_size: 64}\n")
    code = manifest_stage.main(["--params", str(tmp_path / "params.yaml"), "--raw", str(raw), "--out", str(tmp_path / "m"),
                                "--summary", str(tmp_path / "d.json")])
    assert code == 2 and "image without mask" in capsys.readouterr().err

