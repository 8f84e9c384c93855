"""lggseg predict on NIfTI volumes and on slices of any size (issue #22).

The geometry tests stack a case's TIFF slices into NIfTI files under several affines (permuted axes,
flips, LPS vs RAS, anisotropic voxels, an oblique one) with a writer of their own, the documented
convention written out independently of :mod:`lggseg.data.scans`: a TIFF slice's rows run anterior ->
posterior, its columns patient right -> left, slice 1 is the most inferior. The masks of the NIfTI path,
read back through the inverse of that writer, must equal the TIFF path's, slice for slice, and the mask
file must carry the input's affine, qform and sform. A real DeepLabv3+ (timm's tiny
``test_efficientnet``, logits stretched so the masks depend on the image) is not flip- or
transpose-equivariant, so a geometry slip changes its masks. Synthetic cases run everywhere; the same
tests on a real case skip without ../shared/lgg.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lggseg.config import ModelConfig
from lggseg.data.synthetic import generate_demo
from lggseg.models import build_model, save_model
from lggseg.predict import main, preprocess
from test_predict import TINY, BrightModel, copy_case, fake_model_dir, square, write_case

# name -> (file axis d holds RAS axis perm[d], file axis d flipped, RAS voxel sizes in mm, rotation about S in degrees)
AFFINES = {
    "ras_1mm": ((0, 1, 2), (False, False, False), (1.0, 1.0, 1.0), 0.0),
    "lps_dicom_order": ((0, 1, 2), (True, True, False), (0.94, 0.94, 3.3), 0.0),
    "lpi": ((0, 1, 2), (True, True, True), (0.5, 0.5, 5.0), 0.0),
    "sagittal_first_sra": ((2, 0, 1), (False, False, False), (1.0, 1.0, 3.0), 0.0),
    "permuted_flipped_pil": ((1, 2, 0), (True, False, True), (0.8, 0.9, 2.5), 0.0),
    "oblique_7deg_las": ((0, 1, 2), (True, False, False), (1.0, 1.0, 3.0), 7.0),
}
TAGS = {"pre": "t1", "flair": "flair", "post": "t1c"}


# --------------------------------------------------------------------------- the writer (inverse of the reader)


def read_tiff_case(case: Path) -> np.ndarray:
    n = len(list(case.glob(f"{case.name}_*_mask.tif"))) or len(list(case.glob(f"{case.name}_*.tif")))
    return np.stack([np.asarray(Image.open(case / f"{case.name}_{k}.tif")) for k in range(1, n + 1)])


def slices_to_file(slices: np.ndarray, perm, flips) -> np.ndarray:
    """(K, rows, cols[, C]) -> file array: RAS[i, j, k] = slice k [J-1-j, I-1-i], then RAS axes -> file axes."""
    rest = tuple(range(3, slices.ndim))
    ras = slices[:, ::-1, ::-1].transpose(2, 1, 0, *rest)
    data = ras.transpose(*perm, *rest)
    for d in range(3):
        if flips[d]:
            data = np.flip(data, d)
    return np.ascontiguousarray(data)


def file_to_slices(data: np.ndarray, perm, flips) -> np.ndarray:
    for d in range(3):
        if flips[d]:
            data = np.flip(data, d)
    ras = data.transpose(*np.argsort(perm))
    return np.ascontiguousarray(ras[::-1, ::-1].transpose(2, 1, 0))


def file_affine(file_shape, perm, flips, zooms, degrees) -> np.ndarray:
    """Affine of the file array: its voxel index -> the RAS voxel index it came from -> mm."""
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for d in range(3):
        m[perm[d], d] = -1.0 if flips[d] else 1.0
        m[perm[d], 3] = file_shape[d] - 1 if flips[d] else 0
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    ras = np.eye(4)
    ras[:3, :3] = rot @ np.diag(zooms)
    ras[:3, 3] = (-100.0, -120.0, -60.0)
    return ras @ m


def write_nifti_case(slices: np.ndarray, dest: Path, case_id: str, spec, sequences=("pre", "flair", "post")) -> tuple[dict, np.ndarray]:
    """The channels of (K, 256, 256, 3) uint8 slices as ``<case>_{t1,flair,t1c}.nii.gz`` (qform code 1, sform code 2)."""
    perm, flips, zooms, degrees = spec
    dest.mkdir(parents=True, exist_ok=True)
    data = slices_to_file(slices, perm, flips)
    affine = file_affine(data.shape[:3], perm, flips, zooms, degrees)
    files = {}
    for c, seq in enumerate(("pre", "flair", "post")):
        if seq not in sequences:
            continue
        img = nib.Nifti1Image(np.ascontiguousarray(data[..., c]), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=2)
        files[seq] = dest / f"{case_id}_{TAGS[seq]}.nii.gz"
        img.to_filename(str(files[seq]))
    return files, affine


def stretched_tiny_model(slices: np.ndarray, out: Path) -> Path:
    """A random tiny DeepLabv3+ (64 px) whose logits are centred on their median over ``slices`` and scaled by 100:
    masks that depend on the image, neither empty nor full."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(attributes=False, **TINY), 0, 64).eval()
    x = torch.from_numpy(np.stack([preprocess(s, 64) for s in slices]))
    with torch.no_grad():
        median = model(x, None).median()
        conv = model.segmentation_head[0]
        conv.weight.mul_(100.0)
        conv.bias.sub_(median).mul_(100.0)
    save_model(model, out, {"attribute_names": [], "n_attributes": 0, "image_size": 64, "run_config": {"variant": "tiny"},
                            "seed": 0})
    return out


def tiff_predictions(case: Path, model: Path, out: Path, extra=()) -> np.ndarray:
    args = ["--model", str(model), "--input", str(case), "--output", str(out), "--batch-size", "8", "--device", "cpu"]
    assert main([*args, *extra]) == 0
    n = len(list((out / case.name).glob("*_pred.png")))
    return np.stack([np.asarray(Image.open(out / case.name / f"{case.name}_{k}_pred.png")) > 0 for k in range(1, n + 1)])


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan_synth")
    case = sorted(p for p in generate_demo(root / "raw", n_cases=1, seed=3).iterdir() if p.is_dir())[0]
    slices = read_tiff_case(case)
    model = stretched_tiny_model(slices, root / "model")
    return case, slices, model, tiff_predictions(case, model, root / "tiff")


@pytest.fixture(scope="module")
def real_case(real_kaggle_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scan_real")
    case = copy_case(sorted(p for p in real_kaggle_dir.iterdir() if p.is_dir())[0], root / "in")
    slices = read_tiff_case(case)
    model = stretched_tiny_model(slices, root / "model")
    return case, slices, model, tiff_predictions(case, model, root / "tiff")


def _check_geometry(source, name, tmp_path, capsys):
    case, slices, model, expected = source
    perm, flips, zooms, degrees = spec = AFFINES[name]
    files, affine = write_nifti_case(slices, tmp_path / "nii", case.name, spec)
    out = tmp_path / "out"
    args = ["--model", str(model), "--flair", str(files["flair"]), "--pre", str(files["pre"]), "--post", str(files["post"]),
            "--output", str(out), "--batch-size", "8", "--device", "cpu", "--probabilities"]
    assert main(args) == 0
    assert "research use, not a medical device" in capsys.readouterr().err  # the model card's summary
    seg = nib.load(str(out / f"{case.name}_seg.nii.gz"))
    src = nib.load(str(files["flair"]))
    assert np.array_equal(seg.affine, src.affine) and np.allclose(seg.affine, affine, atol=1e-5)
    assert int(seg.header["qform_code"]) == 1 and int(seg.header["sform_code"]) == 2
    assert np.array_equal(seg.header.get_qform(), src.header.get_qform())
    assert np.array_equal(seg.header.get_sform(), src.header.get_sform())
    data = np.asanyarray(seg.dataobj)
    assert data.dtype == np.uint8 and data.shape == src.shape and set(np.unique(data)) <= {0, 1}
    got = file_to_slices(data, perm, flips)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"{name}: {int((got != expected).sum())} voxels differ from the TIFF path"
    # the comparison means something: masks are neither empty nor full and differ between slices
    assert 0 < expected.sum() < expected.size and len({int(m.sum()) for m in expected}) > 3
    prob = nib.load(str(out / f"{case.name}_prob.nii.gz"))
    assert prob.get_data_dtype() == np.float32 and np.array_equal(prob.affine, src.affine)
    assert np.array_equal(np.asanyarray(prob.dataobj) > 0.5, data.astype(bool))
    row = pd.read_csv(out / "cases.csv").iloc[0]
    assert row["volume_voxels"] == expected.sum()
    assert row["volume_ml"] == pytest.approx(expected.sum() * np.prod(zooms) / 1000)
    assert row["n_axial_slices"] == len(slices) and row["intensity_flair"] == "unchanged"
    assert Image.open(out / f"{case.name}_overlay.png").mode == "RGB"


@pytest.mark.parametrize("name", list(AFFINES))
def test_synthetic_nifti_masks_equal_the_tiff_path(synthetic_case, name, tmp_path, capsys):
    _check_geometry(synthetic_case, name, tmp_path, capsys)


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(AFFINES))
def test_real_nifti_masks_equal_the_tiff_path(real_case, name, tmp_path, capsys):
    _check_geometry(real_case, name, tmp_path, capsys)


@pytest.mark.slow
def test_missing_sequences_are_flair_copies_and_a_folder_of_cases(synthetic_case, tmp_path):
    """FLAIR alone = the TIFF case whose pre- and post-contrast channels are FLAIR; --input folder names the cases."""
    case, slices, model, _ = synthetic_case
    flair_only = slices.copy()
    flair_only[..., 0] = flair_only[..., 2] = flair_only[..., 1]
    tiff_dir = tmp_path / "tiff_in" / case.name
    tiff_dir.mkdir(parents=True)
    for k, s in enumerate(flair_only, start=1):
        Image.fromarray(s).save(tiff_dir / f"{case.name}_{k}.tif")
    expected = tiff_predictions(tiff_dir, model, tmp_path / "tiff_out", ["--tta"])
    spec = AFFINES["lps_dicom_order"]
    write_nifti_case(slices, tmp_path / "nii", case.name, spec, sequences=("flair",))
    write_nifti_case(slices, tmp_path / "nii", "OTHER_case", spec)
    out = tmp_path / "out"
    assert main(["--model", str(model), "--input", str(tmp_path / "nii"), "--output", str(out), "--batch-size", "8",
                 "--tta"]) == 0
    table = pd.read_csv(out / "cases.csv")
    assert table["case_id"].tolist() == ["OTHER_case", case.name]
    row = table.set_index("case_id").loc[case.name]
    assert row["pre_file"] == row["post_file"] == "(FLAIR copy)"
    got = file_to_slices(np.asanyarray(nib.load(str(out / f"{case.name}_seg.nii.gz")).dataobj), spec[0], spec[1])
    assert np.array_equal(got, expected)
    assert json.loads((out / "predict.json").read_text())["tta"] is True


def test_float_volumes_are_windowed(synthetic_case, tmp_path):
    """A float volume (e.g. scanner units) is mapped to 0-255 per sequence and still segmented."""
    case, slices, model, _ = synthetic_case
    files, _ = write_nifti_case(slices, tmp_path / "nii", case.name, AFFINES["ras_1mm"])
    for path in files.values():
        img = nib.load(str(path))
        scaled = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32) * 7.3 + 11.0, img.affine)
        scaled.to_filename(str(path))
    out = tmp_path / "out"
    assert main(["--model", str(model), "--input", str(files["flair"]), "--output", str(out)]) == 0
    row = pd.read_csv(out / "cases.csv").iloc[0]
    assert all(str(row[f"intensity_{s}"]).startswith("window") for s in ("pre", "flair", "post"))


# --------------------------------------------------------------------------- bad inputs: one line, exit 2, nothing written


def _vol(shape=(20, 22, 6), dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 200, shape).astype(dtype)


def _nii(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(str(path))
    return path


def _shifted() -> np.ndarray:
    a = np.eye(4)
    a[1, 3] = 2.0
    return a


def _truncated(path: Path, gz: bool) -> Path:
    _nii(path, _vol((40, 40, 30), np.int16))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3] if gz else raw[:1000])
    return path


def _png_named_nii(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def _nan(path: Path) -> Path:
    data = _vol().astype(np.float32) * 1.5
    data[3, 3, 3] = np.nan
    return _nii(path, data)


BAD = {
    # name: (files to write under d -> extra arguments, message part)
    "shape mismatch": (lambda d: ["--flair", _nii(d / "a_flair.nii.gz", _vol()), "--pre", _nii(d / "a_t1.nii.gz", _vol((20, 22, 7)))],
                       "shapes differ"),
    "affine mismatch": (lambda d: ["--flair", _nii(d / "a_flair.nii.gz", _vol()),
                                   "--post", _nii(d / "a_t1c.nii.gz", _vol(), _shifted())], "affines differ"),
    "2-D image": (lambda d: ["--flair", _nii(d / "a_flair.nii.gz", _vol((20, 22)))], "expected one 3-D volume"),
    "4-D image": (lambda d: ["--flair", _nii(d / "a_flair.nii.gz", _vol((20, 22, 6, 3)))], "expected one 3-D volume"),
    "garbage bytes": (lambda d: ["--flair", _write(d / "a_flair.nii.gz", b"\x00garbage" * 100)], "unreadable NIfTI"),
    "PNG named .nii": (lambda d: ["--flair", _png_named_nii(d / "a_flair.nii")], "unreadable NIfTI"),
    "not NIfTI": (lambda d: ["--flair", _write(d / "a_flair.mgz", b"\x00" * 400)], "not a NIfTI file"),
    "missing file": (lambda d: ["--flair", d / "none_flair.nii.gz"], "not found"),
    "truncated .nii": (lambda d: ["--flair", _truncated(d / "a_flair.nii", gz=False)], "unreadable NIfTI data"),
    "truncated .nii.gz": (lambda d: ["--flair", _truncated(d / "a_flair.nii.gz", gz=True)], "unreadable NIfTI"),
    "NaN voxels": (lambda d: ["--flair", _nan(d / "a_flair.nii.gz")], "NaN"),
    "unknown sequence": (lambda d: ["--input", _folder(d, ["a_flair.nii.gz", "a_t2.nii.gz"])], "sequence flair, t1, t1c"),
    "no FLAIR": (lambda d: ["--input", _folder(d, ["a_t1.nii.gz", "b_flair.nii.gz"])], "no a_flair.nii.gz"),
    "--pre alone": (lambda d: ["--pre", _nii(d / "a_t1.nii.gz", _vol())], "--pre and --post need --flair"),
    "--input and --flair": (lambda d: ["--input", d, "--flair", _nii(d / "a_flair.nii.gz", _vol())], "not both"),
}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder(d: Path, names: list[str]) -> Path:
    for n in names:
        _nii(d / n, _vol())
    return d


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return stretched_tiny_model(np.zeros((1, 256, 256, 3), np.uint8), tmp_path_factory.mktemp("bad_model") / "m")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_one_line_exit_2_nothing_written(tiny_model, name, tmp_path, capsys):
    make, needle = BAD[name]
    extra = [str(a) for a in make(tmp_path / "in")]
    outs = tmp_path / "outs"
    outs.mkdir()
    rc = main(["--model", str(tiny_model), *extra, "--output", str(outs / "result"), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("lggseg predict: ") and not ln.startswith("lggseg predict: model ")]
    assert rc == 2 and len(lines) == 1, err
    assert needle in lines[0]
    assert list(outs.iterdir()) == []  # not even a temporary folder


# --------------------------------------------------------------------------- slices of other sizes, PNG slices


def test_512_slices_are_resized_in_and_back_out(tmp_path, monkeypatch):
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=256)
    bright = square(40, 90, 100, 180)
    img = np.full((256, 256, 3), 40, np.uint8)
    img[bright, 0] = 255
    case = tmp_path / "in" / "TCGA_AA_0001_20000101"
    case.mkdir(parents=True)
    big = img.repeat(2, axis=0).repeat(2, axis=1)
    Image.fromarray(big).save(case / f"{case.name}_1.tif")
    Image.fromarray(np.kron(bright, np.ones((2, 2))).astype(np.uint8) * 255).save(case / f"{case.name}_1_mask.tif")
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(out)]) == 0
    pred = np.asarray(Image.open(out / case.name / f"{case.name}_1_pred.png")) > 0
    assert pred.shape == (512, 512) and np.array_equal(pred, np.kron(bright, np.ones((2, 2))) > 0)
    assert pd.read_csv(out / "summary.csv")["dice"].tolist() == [1.0]


@pytest.mark.parametrize(("h", "w"), [(300, 300), (200, 300), (300, 180)])
def test_png_slices_of_any_size(tmp_path, monkeypatch, h, w):
    """A case folder of PNG slices (and masks) of h x w: padded to a square, resized to 256 and back."""
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=256)
    truth = np.zeros((h, w), bool)
    truth[h // 4 : h // 2, w // 3 : w // 3 + 60] = True
    img = np.full((h, w, 3), 40, np.uint8)
    img[truth, 0] = 255
    case = tmp_path / "in" / "TCGA_AA_0002_20000101"
    case.mkdir(parents=True)
    for k in (1, 2):
        Image.fromarray(img).save(case / f"{case.name}_{k}.png")
        Image.fromarray(truth.astype(np.uint8) * 255).save(case / f"{case.name}_{k}_mask.png")
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(out)]) == 0
    pred = np.asarray(Image.open(out / case.name / f"{case.name}_1_pred.png")) > 0
    assert pred.shape == (h, w)
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["dice"] > 0.95).all()
    assert not pred[: h // 4 - 3].any() and not pred[h // 2 + 3 :].any()  # nothing far from the region


def test_a_case_of_mixed_sizes_is_refused(tmp_path, monkeypatch, capsys):
    model_dir = fake_model_dir(tmp_path, monkeypatch, BrightModel(), image_size=256)
    case = write_case(tmp_path / "in", "TCGA_AA_0003_20000101", [(square(1, 5, 1, 5), None)])
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(case / f"{case.name}_2.tif")
    assert main(["--model", str(model_dir), "--input", str(case), "--output", str(tmp_path / "out")]) == 2
    assert "must share one size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_attribute_models_get_the_patients_clusters_and_each_slices_position(tmp_path, monkeypatch):
    names = ["attr:A=1", "attr:A=2", "attr:A=missing", "attr:position"]
    model = BrightModel()
    model_dir = fake_model_dir(tmp_path, monkeypatch, model, names=names, image_size=256)
    slices = np.full((5, 256, 256, 3), 40, np.uint8)
    files, _ = write_nifti_case(slices, tmp_path / "nii", "TCGA_AA_0001_20000101", AFFINES["lps_dicom_order"])
    (tmp_path / "data.csv").write_text("Patient,A\nTCGA_AA_0001,2\n")
    args = ["--model", str(model_dir), "--flair", str(files["flair"]), "--output", str(tmp_path / "out"), "--batch-size", "2"]
    assert main([*args, "--attributes", str(tmp_path / "data.csv")]) == 0
    seen = torch.cat(model.seen).tolist()
    assert seen == [[0, 1, 0, p] for p in (0.0, 0.25, 0.5, 0.75, 1.0)]  # slice 1 (inferior) at position 0
    assert main(args) == 2  # the model needs the clusters: --attributes or --allow-missing-attributes
    model.seen.clear()
    assert main([*args, "--allow-missing-attributes"]) == 0
    assert torch.cat(model.seen)[:, :3].tolist() == [[0, 0, 1]] * 5
