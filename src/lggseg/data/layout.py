"""The Kaggle layout, checked: ``kaggle_3m/<case>/<case>_<n>.tif`` (+ ``_mask.tif``) scanned into :class:`SliceRef`
rows, and each TIFF decoded and checked (256x256 RGB uint8 slices; masks with values {0, 255}).

The manifest stage and ``lggseg predict`` read slices through these same functions, so both accept
and refuse the same files. Case folder ``TCGA_CS_4941_19960909`` -> patient ``TCGA_CS_4941``.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lggseg.errors import DataError

RAW_SIZE = 256


CASE_RE = re.compile(r"^([A-Za-z0-9-]+_[A-Za-z0-9-]+_[A-Za-z0-9-]+)_([A-Za-z0-9-]+)$")
"""A case folder name, ``TCGA_CS_4941_19960909``: groups patient (``TCGA_CS_4941``) and date."""


@dataclass(frozen=True)
class SliceRef:
    """One slice of the raw layout, as found on disk."""

    case_id: str
    patient_id: str
    slice_index: int
    n_slices: int
    image_path: str  # relative to the raw dir, POSIX
    mask_path: str


def scan_raw_dir(raw_dir: str | Path) -> list[SliceRef]:
    """Check the folder structure and list the slices sorted by (case_id, slice_index)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: input folder not found")
    entries = sorted(p for p in raw_dir.iterdir() if not p.name.startswith("."))
    cases = [p for p in entries if p.is_dir()]
    if not cases:
        raise DataError(f"{raw_dir}: empty input folder: no case folders (expected <case>/<case>_<n>.tif and data.csv)")
    if not (raw_dir / "data.csv").is_file():
        raise DataError(f"{raw_dir / 'data.csv'}: not found (the clinical/genomic table of the Kaggle layout)")
    refs: list[SliceRef] = []
    for case in cases:
        m = CASE_RE.match(case.name)
        if not m:
            raise DataError(f"{case}: folder name is not a case id like TCGA_CS_4941_19960909")
        refs.extend(scan_case(case, m.group(1)))
    return refs


def scan_case(case: Path, patient: str, require_masks: bool = True) -> list[SliceRef]:
    """Slices of one case folder. ``require_masks=False`` (``lggseg predict``) also accepts a case
    with no mask at all (``mask_path`` is then ""), and PNG slices; a case with some masks must still have all."""
    ext = r"\.tif" if require_masks else r"\.(?:tif|png)"
    pattern = re.compile(rf"^{re.escape(case.name)}_([1-9][0-9]*)(_mask)?{ext}$")
    images: dict[int, str] = {}
    masks: dict[int, str] = {}
    for f in sorted(case.iterdir()):
        if f.name.startswith("."):
            continue
        m = pattern.match(f.name)
        if not m or not f.is_file():
            raise DataError(f"{f}: unexpected entry in a case folder (expected {case.name}_<n>.tif and {case.name}_<n>_mask.tif)")
        found = masks if m.group(2) else images
        if int(m.group(1)) in found:
            raise DataError(f"{f}: slice {m.group(1)} is there twice ({found[int(m.group(1))]} and {f.name})")
        found[int(m.group(1))] = f.name
    if (lonely := sorted(set(images) - set(masks))) and (require_masks or masks):
        k = lonely[0]
        raise DataError(f"{case / images[k]}: image without mask ({case.name}_{k}_mask.tif is missing)")
    if lonely := sorted(set(masks) - set(images)):
        k = lonely[0]
        raise DataError(f"{case / masks[k]}: mask without image ({case.name}_{k}.tif is missing)")
    if not images:
        raise DataError(f"{case}: case folder holds no slices")
    numbers = sorted(images)
    if numbers != list(range(1, len(numbers) + 1)):
        gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise DataError(f"{case}: slice numbers are not contiguous 1..{numbers[-1]}: missing {gaps[:10]}")
    n = len(numbers)
    return [
        SliceRef(case.name, patient, k, n, f"{case.name}/{images[k]}", f"{case.name}/{masks[k]}" if k in masks else "") for k in numbers
    ]


def decode_tif(path: Path, data: bytes) -> tuple[np.ndarray, str]:
    """The pixels of a TIFF's ``data`` and its PIL mode; an undecodable file raises ``DataError`` naming ``path``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im)
            # Pillow silently narrows 16-bit RGB TIFFs to uint8 (dropping the low byte): refuse them.
            bits = getattr(im, "tag_v2", {}).get(258)
            bits = bits if isinstance(bits, tuple) else (bits,) if bits else ()
            if arr.dtype == np.uint8 and any(b != 8 for b in bits):
                raise DataError(f"{path}: {bits[0]}-bit samples (mode {im.mode}); expected uint8 (8-bit) pixels")
            return arr, im.mode
    except UnidentifiedImageError:
        raise DataError(f"{path}: unreadable: not a TIFF (or any image format Pillow knows)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or truncated TIFF ({exc})") from None


def read_file(path: Path) -> bytes:
    """The bytes of ``path``; an unreadable file raises ``DataError`` naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def check_image(path: Path, arr: np.ndarray, mode: str, any_size: bool = False) -> None:
    """Raise ``DataError`` unless ``arr`` is a 256x256 RGB uint8 slice (grayscale and RGBA are refused).

    ``any_size`` (``lggseg predict``, which resizes slices in and back out): any size from 16 x 16 up.
    """
    want = f"expected {'HxW' if any_size else f'{RAW_SIZE}x{RAW_SIZE}'} RGB uint8 (pre-contrast, FLAIR, post-contrast)"
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if arr.ndim == 2 or channels == 1:
        raise DataError(f"{path}: image is single-channel (mode {mode}); {want}; grayscale images are refused, not replicated")
    if channels != 3:
        raise DataError(f"{path}: image has {channels} channels (mode {mode}); {want}; RGBA and others are refused")
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: image has dtype {arr.dtype} (mode {mode}); {want}")
    if (min(arr.shape[:2]) < 16) if any_size else (arr.shape[:2] != (RAW_SIZE, RAW_SIZE)):
        raise DataError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}; {want}")


def check_mask(path: Path, arr: np.ndarray, mode: str, shape: tuple[int, int] = (RAW_SIZE, RAW_SIZE)) -> None:
    """Raise ``DataError`` unless ``arr`` is a single-channel uint8 mask of 0 and 255 of ``shape``.

    ``shape``: that of its image (``RAW_SIZE`` square in the training layout).
    """
    want = f"expected a {shape[1]}x{shape[0]} single-channel uint8 mask with values 0 and 255"
    if arr.ndim != 2:
        raise DataError(f"{path}: mask has shape {arr.shape} (mode {mode}); {want}")
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: mask has dtype {arr.dtype} (mode {mode}); {want}")
    if arr.shape != tuple(shape):
        raise DataError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]}; {want}")
    bad = np.unique(arr[(arr != 0) & (arr != 255)])
    if bad.size:
        raise DataError(f"{path}: mask has values {bad[:5].tolist()} besides 0 and 255; {want}")
