"""Own scans for ``lggseg predict``: NIfTI volumes in, slices that look like the training data out, and back.

The training data (Kaggle LGG, paper section 4.1.1) are axial 256 x 256 slices whose three uint8
channels are the sequences (pre-contrast, FLAIR, post-contrast); a sequence that was not acquired is
stored as a copy of FLAIR. This module turns one patient's NIfTI files into such slices and maps a
per-slice result back onto the input's voxel grid. Every step is a permutation, flip, zero pad or
in-plane resize, so it can be undone exactly; nothing is resampled through-plane and nothing is
registered (the sequences must already share one grid).

Conventions (docs/own-scans.md):

* **Files**: ``<case>_flair.nii[.gz]`` (required), ``<case>_t1.nii[.gz]`` (pre-contrast) and
  ``<case>_t1c.nii[.gz]`` (post-contrast); :func:`find_cases`.
* **Orientation**: the volume is reoriented to RAS with nibabel's orientation transforms (closest
  axes, no interpolation) and cut along S. A TIFF slice is the axial RAS slice shown the DICOM way:
  rows run anterior -> posterior, columns patient right -> left (radiological view), i.e.
  ``slice[r, c] = ras[I-1-c, J-1-r, k]``; slice 1 of a case is the most inferior one
  (:func:`volume_to_slices`, :func:`slices_to_volume`).
* **In-plane size**: a slice is zero-padded to a centred square and resized to 256 x 256 the way the
  dataset pipeline resizes (:func:`fit_slice`); probabilities go back by bilinear resize and crop
  (:func:`unfit_probabilities`). A 256 x 256 slice passes untouched.
* **Intensities**: a volume of integers 0..255 passes unchanged; any other is mapped to 0..255 per
  sequence by :func:`to_uint8` the way the dataset's volumes were (min -> 0, max -> 255; :data:`WINDOWS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lggseg.data.layout import RAW_SIZE
from lggseg.errors import DataError

SEQUENCES = ("pre", "flair", "post")
"""The model's input channels, in order (the Kaggle slices' RGB)."""

FILE_TAGS = {"flair": "flair", "t1": "pre", "t1c": "post"}
"""File name tag ``<case>_<tag>.nii.gz`` -> sequence."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")

WINDOWS: dict[str, tuple[float, float]] = {"pre": (100.0, 255.0), "flair": (100.0, 255.0), "post": (100.0, 255.0)}
"""Per sequence ``(q, value)``: a volume that is not already 0-255 integers is shifted so its minimum is
0 and scaled so that the ``q``-th percentile of its non-zero voxels lands on ``value``. Measured on the
94 cases (experiments/intensity_window.md): every channel of the dataset is its volume scaled min -> 0,
max -> 255 (remapping the cases that way gives back their stored values, median absolute error 0.00;
q = 95..99.5 with the dataset's median p_q as target: errors 3.4-5.7 grey levels), so q = 100, value 255."""

AFFINE_ATOL = 1e-3
"""Sequences whose affines differ by more than this (mm) are not on one grid."""

_NAME = re.compile(r"^(?P<case>.+)_(?P<tag>[A-Za-z0-9]+)\.nii(\.gz)?$", re.IGNORECASE)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _strip(name: str) -> str:
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class ScanCase:
    """One patient's NIfTI files: ``files[sequence]``; FLAIR always, pre/post-contrast optional."""

    case_id: str
    files: dict[str, Path]


def case_from_files(flair: Path, pre: Path | None = None, post: Path | None = None) -> ScanCase:
    """The case of ``--flair F [--pre T1] [--post T1C]``; its id is F's name without ``_flair`` and suffix."""
    flair = Path(flair)
    stem = _strip(flair.name)
    case_id = stem[: -len("_flair")] if stem.lower().endswith("_flair") and len(stem) > 6 else stem
    files = {"flair": flair}
    for seq, p in (("pre", pre), ("post", post)):
        if p is not None:
            files[seq] = Path(p)
    names = [p.name for p in files.values()]
    if len(set(names)) != len(names) and len(set(files.values())) != len(files):
        raise DataError(f"{flair}: the same file is given for two sequences")
    return ScanCase(case_id, files)


def find_cases(path: Path) -> list[ScanCase]:
    """The cases of a ``<case>_flair.nii.gz`` file (its ``_t1``/``_t1c`` siblings join it) or of a folder of such files."""
    path = Path(path)
    if path.is_file():
        m = _NAME.match(path.name)
        if not m or m.group("tag").lower() != "flair":
            raise DataError(f"{path}: a NIfTI input file must be named <case>_flair.nii.gz (or use --flair)")
        found = _group([p for p in path.parent.iterdir() if p.is_file() and is_nifti(p)], path.parent, strict=False)
        return [c for c in found if c.case_id == m.group("case")]
    files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and is_nifti(p))
    return _group(files, path, strict=True)


def _group(files: list[Path], folder: Path, strict: bool) -> list[ScanCase]:
    cases: dict[str, dict[str, Path]] = {}
    for f in sorted(files):
        m = _NAME.match(f.name)
        tag = m.group("tag").lower() if m else None
        if tag not in FILE_TAGS:
            if strict:
                raise DataError(
                    f"{f}: not named <case>_<sequence>.nii.gz with sequence {', '.join(FILE_TAGS)} "
                    "(t1 = pre-contrast, t1c = post-contrast)"
                )
            continue
        seq = FILE_TAGS[tag]
        case = cases.setdefault(m.group("case"), {})
        if seq in case:
            raise DataError(f"{f}: {m.group('case')} has two {tag} files ({case[seq].name} and {f.name})")
        case[seq] = f
    for case_id, seqs in cases.items():
        if "flair" not in seqs:
            raise DataError(f"{folder}: case {case_id} has no {case_id}_flair.nii.gz (FLAIR is required)")
    if not cases:
        raise DataError(f"{folder}: no <case>_flair.nii.gz files")
    return [ScanCase(c, {s: seqs[s] for s in SEQUENCES if s in seqs}) for c, seqs in sorted(cases.items())]


# --------------------------------------------------------------------------- reading and checking


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_header(path: Path, sequence: str) -> Any:
    """The nibabel image of ``path`` (data not read yet); DataError unless a readable 3-D NIfTI file."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {sequence} file not found" if not path.exists() else f"{path}: not a file")
    if not is_nifti(path):
        raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz expected; convert DICOM with dcm2niix)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # any failure to parse a user's file is bad input  # noqa: BLE001
        raise DataError(f"{path}: unreadable NIfTI ({_first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image (nibabel reads it as {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
        raise DataError(f"{path}: image of shape {shape}; expected one 3-D volume (x, y, z)")
    return img


def check_case(case: ScanCase) -> dict[str, Any]:
    """Headers of every sequence, checked to share FLAIR's shape and affine (no registration is done)."""
    imgs = {seq: load_header(p, seq) for seq, p in case.files.items()}
    ref = imgs["flair"]
    for seq, img in imgs.items():
        if seq == "flair":
            continue
        where = f"{case.files[seq]} ({seq}) vs {case.files['flair']} (flair)"
        if tuple(img.shape[:3]) != tuple(ref.shape[:3]):
            raise DataError(
                f"{where}: shapes differ {tuple(img.shape[:3])} vs {tuple(ref.shape[:3])}; "
                "co-register the sequences to the FLAIR grid first (no registration is done)"
            )
        if not np.allclose(img.affine, ref.affine, rtol=0, atol=AFFINE_ATOL):
            diff = float(np.abs(img.affine - ref.affine).max())
            raise DataError(
                f"{where}: affines differ (by up to {diff:.3g}); "
                "co-register the sequences to the FLAIR grid first (no registration is done)"
            )
    return imgs


def read_data(img: Any, path: Path) -> np.ndarray:
    """The voxel values (scaling applied) as a 3-D array; DataError if truncated or not finite."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: unreadable NIfTI data ({_first_line(exc)})") from None
    data = data.reshape(data.shape[:3])
    if data.dtype.kind == "c" or data.dtype.kind not in "biuf":
        raise DataError(f"{path}: voxel type {data.dtype} is not a real number")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return data


# --------------------------------------------------------------------------- intensities


def to_uint8(data: np.ndarray, sequence: str) -> tuple[np.ndarray, str]:
    """``(uint8 volume, how)``: 0-255 integers unchanged, anything else windowed by :data:`WINDOWS`."""
    lo, hi = float(data.min()), float(data.max())
    integral = data.dtype.kind in "biu" or bool(np.all(np.equal(np.mod(data, 1), 0)))
    if integral and lo >= 0 and hi <= 255:
        return data.astype(np.uint8), "unchanged"
    q, value = WINDOWS[sequence]
    shifted = data.astype(np.float64) - lo
    inside = shifted[shifted > 0]
    top = float(np.percentile(inside, q)) if inside.size else 0.0
    if top <= 0:
        return np.zeros(data.shape, np.uint8), "constant volume -> 0"
    out = np.clip(np.rint(shifted * (value / top)), 0, 255).astype(np.uint8)
    return out, f"window: (x - {lo:.6g}) * {value:g} / {top:.6g} (p{q:g} of non-zero voxels -> {value:g})"


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """How the input's voxel axes map to RAS (:func:`volume_to_slices`) and back."""

    to_ras: np.ndarray  # nibabel ornt (3, 2)
    from_ras: np.ndarray
    axcodes: tuple[str, ...]  # the input's, e.g. ("L", "P", "S")


def orientation(affine: np.ndarray) -> Orientation:
    from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation, ornt_transform

    start, ras = io_orientation(affine), axcodes2ornt(("R", "A", "S"))
    return Orientation(ornt_transform(start, ras), ornt_transform(ras, start), tuple(aff2axcodes(affine)))


def volume_to_slices(volume: np.ndarray, ornt: Orientation) -> np.ndarray:
    """``(x, y, z[, C])`` on the input grid -> ``(K, rows, cols[, C])`` TIFF-oriented axial slices, inferior first."""
    from nibabel.orientations import apply_orientation

    ras = apply_orientation(volume, ornt.to_ras)
    # RAS (i: R, j: A, k: S) -> rows anterior->posterior (J-1-j), columns right->left (I-1-i).
    order = (2, 1, 0, *range(3, ras.ndim))
    return np.ascontiguousarray(np.flip(ras, (0, 1)).transpose(order))


def slices_to_volume(slices: np.ndarray, ornt: Orientation) -> np.ndarray:
    """The inverse of :func:`volume_to_slices`: ``(K, rows, cols[, C])`` -> the input grid."""
    from nibabel.orientations import apply_orientation

    order = (2, 1, 0, *range(3, slices.ndim))
    ras = np.flip(slices.transpose(order), (0, 1))
    return np.ascontiguousarray(apply_orientation(ras, ornt.from_ras))


# --------------------------------------------------------------------------- in-plane size


@dataclass(frozen=True)
class Fit:
    """Where an ``h x w`` slice went: zero-padded into a ``side`` square at (top, left), then resized to 256."""

    h: int
    w: int
    side: int
    top: int
    left: int

    @property
    def identity(self) -> bool:
        return self.h == self.w == RAW_SIZE


def fit_of(h: int, w: int) -> Fit:
    side = max(h, w)
    return Fit(h, w, side, (side - h) // 2, (side - w) // 2)


def fit_slice(image: np.ndarray) -> tuple[np.ndarray, Fit]:
    """An ``(h, w, 3)`` uint8 slice as the dataset's 256 x 256: centred zero pad to a square, area resize."""
    from lggseg.data.dataset import resize_pair

    fit = fit_of(*image.shape[:2])
    if fit.identity:
        return image, fit
    square = np.zeros((fit.side, fit.side, *image.shape[2:]), dtype=image.dtype)
    square[fit.top : fit.top + fit.h, fit.left : fit.left + fit.w] = image
    if fit.side != RAW_SIZE:
        square, _ = resize_pair(square, square[..., 0], RAW_SIZE)
    return np.ascontiguousarray(square), fit


def unfit_probabilities(prob: np.ndarray, fit: Fit) -> np.ndarray:
    """``(256, 256)`` (or ``(B, 256, 256)``) probabilities back onto the ``h x w`` slice: bilinear resize, crop."""
    if fit.identity:
        return prob
    import torch
    import torch.nn.functional as F

    p = np.asarray(prob, dtype=np.float32)
    batch = p.ndim == 3
    t = torch.from_numpy(np.ascontiguousarray(p if batch else p[None]))[:, None]
    if fit.side != t.shape[-1]:
        t = F.interpolate(t, size=(fit.side, fit.side), mode="bilinear", align_corners=False)
    out = t[:, 0, fit.top : fit.top + fit.h, fit.left : fit.left + fit.w].numpy()
    return np.ascontiguousarray(out if batch else out[0])
