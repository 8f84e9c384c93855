"""New data for ``lggseg predict``: what an input path holds, its slices read and checked, and attribute vectors.

The input is one slice (``.tif``/``.png``), a case folder of the Kaggle layout or a folder of case
folders (a ``kaggle_3m/`` folder), resolved by :func:`resolve_inputs` into :class:`SliceInput` rows;
:func:`read_slice` decodes and checks a slice (and its mask, if any) with the manifest's own checks
(:mod:`lggseg.data.layout`). :class:`AttributeLookup` builds a model's attribute vector for a patient and a
slice position from a ``data.csv``-shaped file, in the model's own attribute names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lggseg.errors import DataError, ModelError

SLICE_SUFFIXES = (".tif", ".tiff", ".png")


_NUMBERED = re.compile(r"^(.+)_([1-9][0-9]*)$")


_ATTR_NAME = re.compile(r"^attr:(.+)=([^=]+)$")


@dataclass(frozen=True)
class SliceInput:
    """One slice to segment."""

    case_id: str
    patient_id: str | None
    slice_index: int | None  # None: a lone slice whose number is unknown
    n_slices: int | None
    image: Path
    mask: Path | None
    out_dir: str  # relative to the output folder ("" or the case id)

    @property
    def stem(self) -> str:
        return self.image.stem

    @property
    def position(self) -> float | None:
        """(n - 1) / (n_slices - 1) as in the manifest (0 for a single-slice case); None when unknown."""
        if self.slice_index is None or self.n_slices is None:
            return None
        return (self.slice_index - 1) / max(self.n_slices - 1, 1)


@dataclass(frozen=True)
class Inputs:
    """What ``--input`` resolved to."""

    kind: str  # slice | case | cases
    slices: list[SliceInput]
    default_attributes: Path | None  # the data.csv of the kaggle_3m folder, when there is one


def _case_slices(case: Path, out_dir: str) -> list[SliceInput]:
    from lggseg.data.layout import CASE_RE, scan_case

    m = CASE_RE.match(case.name)
    if not m:
        raise DataError(f"{case}: folder name is not a case id like TCGA_CS_4941_19960909")
    refs = scan_case(case, m.group(1), require_masks=False)
    root = case.parent
    return [
        SliceInput(
            r.case_id, r.patient_id, r.slice_index, r.n_slices, root / r.image_path,
            root / r.mask_path if r.mask_path else None, out_dir,
        )
        for r in refs
    ]


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names do not start with a dot, sorted."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def _lone_slice(path: Path) -> SliceInput:
    from lggseg.data.layout import CASE_RE

    case_id, index, patient = path.stem, None, None
    if (m := _NUMBERED.match(path.stem)) and (c := CASE_RE.match(m.group(1))):
        case_id, index, patient = m.group(1), int(m.group(2)), c.group(1)
    elif c := CASE_RE.match(path.stem):
        patient = c.group(1)
    mask = next(
        (p for p in (path.with_name(f"{path.stem}_mask{path.suffix}"), path.with_name(f"{path.stem}_mask.tif")) if p.is_file()),
        None,
    )
    return SliceInput(case_id, patient, index, None, path, mask, "")


def resolve_inputs(path: str | Path) -> Inputs:
    """Find and validate the slices of ``path`` (a slice file, a case folder or a folder of cases)."""
    from lggseg.data.layout import CASE_RE

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: input not found")
    if path.is_file():
        if path.suffix.lower() not in SLICE_SUFFIXES:
            raise DataError(f"{path}: not a slice image (expected {', '.join(SLICE_SUFFIXES)}) or a folder")
        if path.stem.endswith("_mask"):
            raise DataError(f"{path}: this is a mask; give the slice image (the mask beside it is used as truth)")
        case = path.parent
        m = _NUMBERED.match(path.stem)
        if m and m.group(1) == case.name and CASE_RE.match(case.name) and path.suffix in (".tif", ".png"):
            # A slice of a case folder: validate the case and take the slice's number and position from it.
            chosen = [s for s in _case_slices(case, "") if s.image.name == path.name]
            return Inputs("slice", chosen, _existing(case.parent / "data.csv"))
        return Inputs("slice", [_lone_slice(path)], None)
    entries = visible_entries(path)
    folders = [p for p in entries if p.is_dir()]
    if folders:
        slices = [s for case in folders for s in _case_slices(case, case.name)]
        return Inputs("cases", slices, _existing(path / "data.csv"))
    if not entries:
        raise DataError(f"{path}: empty input folder (expected slices <case>_<n>.tif or case folders)")
    if not CASE_RE.match(path.name):
        raise DataError(
            f"{path}: neither a case folder (named like TCGA_CS_4941_19960909, holding <case>_<n>.tif) "
            "nor a folder of case folders"
        )
    return Inputs("case", _case_slices(path, path.name), _existing(path.parent / "data.csv"))


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def read_slice(item: SliceInput) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode and validate a slice and its mask (if any) with the manifest's checks, any size (predict resizes):
    ``(uint8 HxWx3, bool HxW | None)``."""
    from lggseg.data.layout import check_image, check_mask, decode_tif, read_file

    image, mode = decode_tif(item.image, read_file(item.image))
    check_image(item.image, image, mode, any_size=True)
    truth = None
    if item.mask is not None:
        mask, mode = decode_tif(item.mask, read_file(item.mask))
        if mask.shape[:2] != image.shape[:2]:
            raise DataError(f"{item.image}: image is {image.shape[1]}x{image.shape[0]} but its mask {item.mask.name} "
                            f"is {mask.shape[1]}x{mask.shape[0]}")
        check_mask(item.mask, mask, mode, image.shape[:2])
        truth = mask == 255
    return np.ascontiguousarray(image), truth


class AttributeLookup:
    """Builds the model's attribute vector for a patient and a slice position.

    ``names`` are the model's attribute names (``attr:<Column>=<category>`` one-hot blocks with a
    ``missing`` category, then optionally ``attr:position``), in the model's order.
    """

    def __init__(
        self, names: Sequence[str], csv_path: Path | None, allow_missing: bool, model_dir: Path
    ) -> None:
        from lggseg.data.manifest import MISSING, POSITION, encode_attributes, read_clinical

        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.csv_path = csv_path
        self.allow_missing = allow_missing
        self.model_dir = model_dir
        self.position = self.index.get(POSITION)
        columns: list[str] = []
        for n in self.names:
            if n == POSITION:
                continue
            m = _ATTR_NAME.match(n)
            if not m:
                raise ModelError(f"{model_dir}: model.json has an attribute name {n!r} that is not attr:<Column>=<value>")
            if m.group(1) not in columns:
                columns.append(m.group(1))
        self.columns = columns
        self.missing_names = [f"attr:{c}={MISSING}" for c in columns]
        absent = [n for n in self.missing_names if n not in self.index]
        if absent:
            raise ModelError(f"{model_dir}: model.json attribute names lack {absent} (not written by the manifest encoding)")
        self.onehot: pd.DataFrame | None = None
        self.values: pd.DataFrame | None = None
        if csv_path is not None and columns:
            clinical = read_clinical(csv_path)
            _, self.onehot = encode_attributes(clinical, columns, csv_path)
            self.values = clinical[columns]

    def patient_vector(self, patient: str | None, case_id: str) -> tuple[np.ndarray, bool]:
        """``(one-hot part of the vector, found)`` for ``patient``; position left 0."""
        vec = np.zeros(len(self.names), dtype=np.float32)
        found = self.onehot is not None and patient is not None and patient in self.onehot.index
        if not self.columns:
            return vec, True
        if not found:
            if not self.allow_missing:
                if self.csv_path is None:
                    raise DataError(
                        f"{self.model_dir}: this model uses the attribute encoder (genomic clusters of section 3.2.2) "
                        "but no attributes were given: pass --attributes data.csv, or --allow-missing-attributes "
                        "to use the 'missing' category for every cluster"
                    )
                who = f"patient {patient}" if patient else f"{case_id} (no patient id in its name)"
                raise DataError(
                    f"{self.csv_path}: no row for {who} (case {case_id}); the model in {self.model_dir} needs its "
                    "genomic clusters: add the row, or pass --allow-missing-attributes to use the 'missing' category"
                )
            for n in self.missing_names:
                vec[self.index[n]] = 1.0
            return vec, False
        row = self.onehot.loc[patient]
        for name in row.index[row.to_numpy() == 1]:
            if name not in self.index:
                col = _ATTR_NAME.match(name).group(1)
                known = [n.split("=", 1)[1] for n in self.names if n.startswith(f"attr:{col}=")]
                raise DataError(
                    f"{self.csv_path}: {col} of {patient} is {self.values.at[patient, col]!r}, a category the model in "
                    f"{self.model_dir} never saw in training (known: {known})"
                )
            vec[self.index[name]] = 1.0
        return vec, True

    def slice_vector(self, base: np.ndarray, item: SliceInput) -> np.ndarray:
        if self.position is None:
            return base
        pos = item.position
        if pos is None:
            if not self.allow_missing:
                raise DataError(
                    f"{item.image}: the model uses the slice position, which is unknown for a slice outside a case "
                    "folder (<case>/<case>_<n>.tif); give the case folder, or pass --allow-missing-attributes (position 0.5)"
                )
            pos = 0.5
        out = base.copy()
        out[self.position] = pos
        return out
