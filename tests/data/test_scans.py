"""lggseg.data.scans: file naming, header checks, the slice convention by hand, exact inverses, intensities, in-plane fit."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lggseg.data import scans
from lggseg.errors import DataError


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(str(path))
    return path


# --------------------------------------------------------------------------- the slice convention, by hand

NI, NJ, NK = 5, 4, 3
VOLUME = np.arange(NI * NJ * NK, dtype=np.int32).reshape(NI, NJ, NK)


@pytest.mark.parametrize(
    ("name", "affine", "expected"),
    [
        # RAS file: rows run A->P (j reversed), columns R->L (i reversed), slice 1 = k 0 (inferior)
        ("RAS", np.diag([1.0, 1.0, 1.0, 1.0]), lambda d: np.stack([d[::-1, ::-1, k].T for k in range(NK)])),
        # LPS file (DICOM order): the TIFF slice is the transposed file slice, nothing flipped
        ("LPS", np.diag([-1.0, -1.0, 1.0, 1.0]), lambda d: np.stack([d[:, :, k].T for k in range(NK)])),
        # LPI: as LPS, slices in reverse file order
        ("LPI", np.diag([-1.0, -1.0, -1.0, 1.0]), lambda d: np.stack([d[:, :, k].T for k in reversed(range(NK))])),
        # file axes (A, S, R): slice k of RAS is d[:, k, :] with rows = A reversed, columns = R reversed
        ("ASR", np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
         lambda d: np.stack([d[::-1, k, ::-1] for k in range(NJ)])),
    ],
)
def test_slices_by_hand(name, affine, expected):
    ornt = scans.orientation(affine)
    assert "".join(ornt.axcodes) == name
    got = scans.volume_to_slices(VOLUME, ornt)
    assert np.array_equal(got, expected(VOLUME))
    assert np.array_equal(scans.slices_to_volume(got, ornt), VOLUME)


@pytest.mark.parametrize("seed", range(8))
def test_every_orientation_is_inverted_exactly(seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], 3)
    aff = np.eye(4)
    aff[:3, :3] = 0
    for d in range(3):
        aff[perm[d], d] = signs[d] * rng.uniform(0.4, 5.0)  # anisotropic voxels too
    vol = rng.integers(0, 255, (6, 7, 8, 3)).astype(np.uint8)
    ornt = scans.orientation(aff)
    sl = scans.volume_to_slices(vol, ornt)
    assert sl.shape[0] == vol.shape[int(np.flatnonzero(perm == 2)[0])]  # slices along the S axis
    assert np.array_equal(scans.slices_to_volume(sl, ornt), vol)


# --------------------------------------------------------------------------- naming


def test_cases_of_a_folder(tmp_path):
    vol = np.zeros((4, 4, 4), np.uint8)
    for name in ("a_flair.nii.gz", "a_t1.nii.gz", "a_t1c.nii", "b_FLAIR.nii.gz"):
        _save(tmp_path / name, vol)
    cases = scans.find_cases(tmp_path)
    assert [(c.case_id, sorted(c.files)) for c in cases] == [("a", ["flair", "post", "pre"]), ("b", ["flair"])]
    assert [c.case_id for c in scans.find_cases(tmp_path / "a_flair.nii.gz")] == ["a"]
    assert scans.case_from_files(tmp_path / "b_FLAIR.nii.gz").case_id == "b"
    assert scans.case_from_files(tmp_path / "scan.nii.gz").case_id == "scan"


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        (["a_flair.nii.gz", "a_t2.nii.gz"], "sequence flair, t1, t1c"),
        (["a_t1.nii.gz"], "no a_flair.nii.gz"),
        (["a_flair.nii.gz", "a_FLAIR.nii"], "two flair files"),
    ],
)
def test_bad_folders(tmp_path, names, needle):
    for name in names:
        _save(tmp_path / name, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(DataError, match=needle):
        scans.find_cases(tmp_path)


# --------------------------------------------------------------------------- header checks


def _case(tmp_path: Path, flair: np.ndarray, other: np.ndarray, other_affine: np.ndarray) -> scans.ScanCase:
    return scans.ScanCase("c", {"flair": _save(tmp_path / "c_flair.nii.gz", flair),
                                "pre": _save(tmp_path / "c_t1.nii.gz", other, other_affine)})


def test_checks_shape_and_affine(tmp_path):
    vol = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(DataError, match=r"shapes differ \(4, 5, 7\) vs \(4, 5, 6\)"):
        scans.check_case(_case(tmp_path, vol, np.zeros((4, 5, 7), np.uint8), np.eye(4)))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    with pytest.raises(DataError, match="affines differ"):
        scans.check_case(_case(tmp_path, vol, vol, shifted))
    nearly = np.eye(4)
    nearly[0, 3] = 1e-5  # float noise of a converter: the same grid
    assert set(scans.check_case(_case(tmp_path, vol, vol, nearly))) == {"flair", "pre"}


@pytest.mark.parametrize(
    ("write", "needle"),
    [
        (lambda p: _save(p, np.zeros((4, 4), np.uint8)), "expected one 3-D volume"),
        (lambda p: _save(p, np.zeros((4, 4, 4, 2), np.uint8)), "expected one 3-D volume"),
        (lambda p: p.write_bytes(b"not an image at all" * 20), "unreadable NIfTI"),
        (lambda p: p.write_bytes(b""), "unreadable NIfTI"),
    ],
)
def test_bad_files(tmp_path, write, needle):
    path = tmp_path / "x_flair.nii.gz"
    write(path)
    with pytest.raises(DataError, match=needle) as err:
        scans.load_header(path, "flair")
    assert "\n" not in str(err.value)


def test_four_d_with_one_volume_is_three_d(tmp_path):
    img = scans.load_header(_save(tmp_path / "x.nii.gz", np.ones((3, 4, 5, 1), np.uint8)), "flair")
    assert scans.read_data(img, tmp_path / "x.nii.gz").shape == (3, 4, 5)


def test_not_nifti_and_nan(tmp_path):
    (tmp_path / "x.mgz").write_bytes(b"\0" * 400)
    with pytest.raises(DataError, match="not a NIfTI file"):
        scans.load_header(tmp_path / "x.mgz", "flair")
    with pytest.raises(DataError, match="not found"):
        scans.load_header(tmp_path / "missing_flair.nii.gz", "flair")
    data = np.ones((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    path = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataError, match="NaN"):
        scans.read_data(scans.load_header(path, "flair"), path)


def test_truncated_data(tmp_path):
    path = _save(tmp_path / "t.nii", np.ones((20, 20, 20), np.int16))
    path.write_bytes(path.read_bytes()[:2000])
    img = scans.load_header(path, "flair")  # the header alone is fine
    with pytest.raises(DataError, match="unreadable NIfTI data"):
        scans.read_data(img, path)


# --------------------------------------------------------------------------- intensities


def test_uint8_values_pass_unchanged_whatever_the_dtype():
    vol = np.arange(256, dtype=np.int16).reshape(4, 8, 8)
    for v in (vol, vol.astype(np.float32), vol.astype(np.uint8)):
        out, how = scans.to_uint8(v, "flair")
        assert how == "unchanged" and out.dtype == np.uint8 and np.array_equal(out, vol)


def test_window_by_hand():
    q, value = scans.WINDOWS["flair"]
    vol = np.zeros((10, 10, 10), np.float32) - 100.0  # background at the minimum -> 0
    vol[2:8, 2:8, 2:8] = np.linspace(0, 2000, 216).reshape(6, 6, 6)
    out, how = scans.to_uint8(vol, "flair")
    shifted = vol.astype(np.float64) + 100
    top = np.percentile(shifted[shifted > 0], q)
    assert np.array_equal(out, np.clip(np.rint(shifted * value / top), 0, 255).astype(np.uint8))
    assert out[0, 0, 0] == 0 and out.max() == min(255, round(2100 * value / top)) and "window" in how
    assert scans.to_uint8(np.full((3, 3, 3), 7.5), "pre")[0].max() == 0  # constant: nothing to scale


# --------------------------------------------------------------------------- in-plane fit


def test_fit_is_identity_at_256_and_pads_centred():
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    out, fit = scans.fit_slice(img)
    assert out is img and fit.identity
    prob = np.random.default_rng(1).random((256, 256)).astype(np.float32)
    assert scans.unfit_probabilities(prob, fit) is prob
    small = np.full((256, 200, 3), 9, np.uint8)
    out, fit = scans.fit_slice(small)
    assert (fit.side, fit.top, fit.left) == (256, 0, 28)
    assert out.shape == (256, 256, 3) and out[:, :28].max() == 0 and out[:, 28:228].min() == 9 and out[:, 228:].max() == 0
    assert np.array_equal(scans.unfit_probabilities(prob, fit), prob[:, 28:228])


def test_512_goes_to_256_by_area_and_back_by_bilinear():
    base = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    big = base.repeat(2, axis=0).repeat(2, axis=1)
    out, fit = scans.fit_slice(big)
    assert np.array_equal(out, base)  # area averaging of 2x2 equal pixels
    mask = np.zeros((256, 256), np.float32)
    mask[40:90, 100:180] = 1
    back = scans.unfit_probabilities(mask, fit)
    # bilinear 2x: every output pixel has weight >= 3/4 on its own source pixel, so > 0.5 is the nearest upscale
    assert back.shape == (512, 512) and np.array_equal(back > 0.5, np.kron(mask, np.ones((2, 2))) > 0.5)
    batch = scans.unfit_probabilities(np.stack([mask, 1 - mask]), fit)
    assert batch.shape == (2, 512, 512) and np.allclose(batch[0], back)
