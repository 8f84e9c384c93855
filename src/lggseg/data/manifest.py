"""The ``manifest`` stage: validate the raw Kaggle layout once and turn it into a slice store.

Output (``docs/ARCHITECTURE.md``, "Manifest store"), written atomically into ``out_dir``:

* ``manifest.csv``: one row per slice ordered by (case_id, slice_index) with the patient, the slice
  position, the paths, the tumour pixel count, the split and the attribute vector of paper section
  3.2.2: a one-hot block per column of ``common.attribute_columns`` (categories = the values seen in
  ``data.csv`` for that column, sorted, plus an explicit ``missing``) and, with ``common.use_position``,
  ``attr:position`` = (slice_index - 1) / (n_slices - 1) (0 for a single-slice case);
* ``images.npy`` (uint8 ``(N, 256, 256, 3)``) and ``masks.npy`` (uint8 ``(N, 256, 256)`` in {0, 1}),
  filled through ``np.lib.format.open_memmap`` so that training never decodes a TIFF;
* ``store.json`` and ``components.csv`` (below).

Split (section 4.1.3: 70/15/15, seed 23): the sorted patient ids are permuted with
``numpy.random.default_rng(manifest.split_seed)``; the first ``n - n_val - n_test`` go to train, then
val, then test, with ``n_val = round(0.15 n)`` and ``n_test = round(0.15 n)`` (half rounds up, each
split gets at least one unit), so no patient is in two splits. ``split_unit: slice`` splits the slices
in the same way instead; it exists only to measure how much patient leakage inflates the scores.

Validation: every problem stops the build with :class:`lggseg.errors.DataError` naming the file and the
problem, and nothing is written: missing or empty input folder, missing ``data.csv``, a folder or file
that does not follow the layout, an image without mask or mask without image, slice numbers that are
not 1..n, an unreadable or truncated TIFF, an image that is not 256x256 RGB uint8, a mask that is not
256x256 single-channel uint8 with values in {0, 255}, a case whose patient has no ``data.csv`` row, a
duplicated patient row, and attribute values that are not non-negative integers (empty, ``NA`` and
``NaN`` cells are "missing"). Grayscale (``L``) and RGBA images are refused rather than converted: the
three channels are three different MRI sequences, so replicating one channel or dropping alpha would
silently feed the model something else than the paper's input.

Dataset analysis of section 4.1.3 ("six segmentation regions smaller than 7x7", with s = ``small_side``):
the ground-truth connected components of every mask (``scipy.ndimage.label``, 4- and 8-connectivity)
with their pixel areas and bounding boxes go to ``components.csv``; the summary counts, per
connectivity, the components with

* ``area_lt_side_sq``: fewer than s*s pixels (less area than a full s x s square);
* ``bbox_le_side``: bounding box height <= s and width <= s (the region fits inside one s x s window,
  the window of the outlier loss, eq. 4-8);
* ``bbox_lt_side``: bounding box height < s and width < s (strictly smaller than s x s both ways);

plus ``slices_with_area_lt_side_sq`` (slices holding such a component) and, independent of
connectivity, ``slices_tumour_lt_side_sq`` (slices whose whole tumour has fewer than s*s pixels).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from lggseg.config import CommonConfig, ManifestConfig
from lggseg.data.fetch import FINGERPRINT_NAME, csv_delimiter, fingerprint
from lggseg.data.layout import (
    RAW_SIZE,
    SliceRef,
    check_image,
    check_mask,
    decode_tif,
    read_file,
    scan_raw_dir,
)
from lggseg.data.store import SPLITS
from lggseg.errors import DataError
from lggseg.io import atomic_dir, write_csv, write_json

MISSING = "missing"
POSITION = "attr:position"
_MISSING_TOKENS = {"", "na", "nan", "n/a", "null", "none"}
_STRUCTURES = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}
COMPONENT_COLUMNS = ["row", "case_id", "slice_index", "split", "connectivity", "component", "area", "y0", "x0", "height", "width"]


# --------------------------------------------------------------------------- layout


# --------------------------------------------------------------------------- data.csv and attributes


def read_clinical(path: str | Path) -> pd.DataFrame:
    """``data.csv`` as strings indexed by ``Patient`` (comma- or semicolon-separated, LF or CRLF)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=csv_delimiter(lines[0]), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: not a valid CSV table ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if "Patient" not in frame.columns:
        raise DataError(f"{path}: no 'Patient' column (columns: {list(frame.columns)[:6]}...)")
    frame = frame.apply(lambda col: col.str.strip())
    dup = frame["Patient"][frame["Patient"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: patient {dup.iloc[0]!r} has more than one row")
    return frame.set_index("Patient")


def _category(path: Path, column: str, patient: str, value: str) -> int | None:
    if value.lower() in _MISSING_TOKENS:
        return None
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{path}: {column} of {patient} is {value!r}, not a number") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise DataError(f"{path}: {column} of {patient} is {value!r}; expected a non-negative integer category")
    return int(number)


def encode_attributes(
    clinical: pd.DataFrame, columns: Sequence[str], path: str | Path = "data.csv"
) -> tuple[list[str], pd.DataFrame]:
    """One-hot attribute names and a per-patient 0/1 frame (index: patient, columns: names)."""
    path = Path(path)
    missing_cols = [c for c in columns if c not in clinical.columns]
    if missing_cols:
        raise DataError(f"{path}: column(s) {missing_cols} from common.attribute_columns not found")
    names: list[str] = []
    blocks = []
    for col in columns:
        values = [_category(path, col, p, v) for p, v in clinical[col].items()]
        cats = sorted({v for v in values if v is not None})
        col_names = [f"attr:{col}={c}" for c in cats] + [f"attr:{col}={MISSING}"]
        pos = {c: i for i, c in enumerate(cats)}
        onehot = np.zeros((len(values), len(col_names)), dtype=np.uint8)
        onehot[np.arange(len(values)), [len(cats) if v is None else pos[v] for v in values]] = 1
        blocks.append(onehot)
        names.extend(col_names)
    matrix = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(clinical), 0), np.uint8)
    return names, pd.DataFrame(matrix, index=clinical.index, columns=names)


# --------------------------------------------------------------------------- split


def assign_splits(n_units: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split labels (``train``/``val``/``test``) for ``n_units`` sorted units; see the module docstring."""
    if n_units < 3:
        raise DataError(f"need at least 3 units to split into train/val/test, found {n_units}")
    n_val = max(1, math.floor(fractions[1] * n_units + 0.5))
    n_test = max(1, math.floor(fractions[2] * n_units + 0.5))
    n_train = n_units - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n_units} units leave no training unit with split fractions {tuple(fractions)}")
    order = np.random.default_rng(seed).permutation(n_units)
    labels = np.empty(n_units, dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train : n_train + n_val]] = "val"
    labels[order[n_train + n_val :]] = "test"
    return labels


# --------------------------------------------------------------------------- components


def mask_components(mask: np.ndarray, connectivity: int) -> list[tuple[int, int, int, int, int]]:
    """``(area, y0, x0, height, width)`` of each connected component of a boolean mask."""
    labels, n = ndimage.label(mask, structure=_STRUCTURES[connectivity])
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    out = []
    for area, (sy, sx) in zip(areas, ndimage.find_objects(labels), strict=True):
        out.append((int(area), sy.start, sx.start, sy.stop - sy.start, sx.stop - sx.start))
    return out


def small_component_counts(components: pd.DataFrame, side: int) -> dict:
    """Counts of components "smaller than side x side" under each convention (module docstring)."""
    out: dict = {"side": int(side)}
    for conn in (4, 8):
        sub = components[components["connectivity"] == conn]
        small_area = sub["area"] < side * side
        out[f"conn{conn}"] = {
            "components": int(len(sub)),
            "area_lt_side_sq": int(small_area.sum()),
            "bbox_le_side": int(((sub["height"] <= side) & (sub["width"] <= side)).sum()),
            "bbox_lt_side": int(((sub["height"] < side) & (sub["width"] < side)).sum()),
            "slices_with_area_lt_side_sq": int(sub.loc[small_area, "row"].nunique()),
        }
    return out


def small_tumour_slices(tumour_pixels: pd.Series, side: int) -> int:
    """Slices whose whole tumour (all components together) has fewer than side*side pixels."""
    return int(((tumour_pixels > 0) & (tumour_pixels < side * side)).sum())


# --------------------------------------------------------------------------- decoding


@dataclass
class _Decoded:
    digests: dict[str, tuple[int, str]]
    tumour_pixels: int
    components: dict[int, list[tuple[int, int, int, int, int]]]


def _decode_slice(raw_dir: Path, ref: SliceRef, row: int, images: np.ndarray, masks: np.ndarray) -> _Decoded:
    digests = {}
    arrays = []
    for rel, check in ((ref.image_path, check_image), (ref.mask_path, check_mask)):
        path = raw_dir / rel
        data = read_file(path)
        # Hash what we decode, so the store's fingerprint costs no second read of the TIFFs.
        digests[rel] = (len(data), hashlib.sha256(data).hexdigest())
        arr, mode = decode_tif(path, data)
        check(path, arr, mode)
        arrays.append(arr)
    image, mask = arrays
    fg = mask == 255
    images[row] = image
    masks[row] = fg
    n_fg = int(fg.sum())
    comps = {c: mask_components(fg, c) for c in (4, 8)} if n_fg else {4: [], 8: []}
    return _Decoded(digests, n_fg, comps)


def _decode_all(raw_dir: Path, refs: list[SliceRef], images: np.ndarray, masks: np.ndarray) -> list[_Decoded]:
    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_slice, raw_dir, ref, i, images, masks) for i, ref in enumerate(refs)]
        out = []
        try:
            # In submission order, so the reported bad file is the first one in sorted order.
            for fut in tqdm(futures, desc="decode slices", unit="slice", leave=False):
                out.append(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out


# --------------------------------------------------------------------------- build


def fetched_source(raw_dir: Path) -> str | None:
    """The source kind (kaggle | demo | local) the fetch stage recorded beside ``raw_dir``, else None.

    Results carry it (``store.json`` -> ``provenance``) so that synthetic and real numbers cannot pass
    for each other; a raw folder that fetch did not write has no record and gives None.
    """
    try:
        record = json.loads((raw_dir.parent / FINGERPRINT_NAME).read_text())
    except (OSError, ValueError):
        return None
    source = record.get("source") if isinstance(record, dict) else None
    return str(source) if source else None


def build_manifest(
    raw_dir: str | Path, out_dir: str | Path, common: CommonConfig, cfg: ManifestConfig, small_side: int = 7
) -> dict:
    """Validate ``raw_dir`` (a ``kaggle_3m`` folder), write the store to ``out_dir``; return the summary."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    refs = scan_raw_dir(raw_dir)
    csv_path = raw_dir / "data.csv"
    clinical = read_clinical(csv_path)
    names, onehot = encode_attributes(clinical, common.attribute_columns, csv_path)
    for ref in refs:
        if ref.patient_id not in clinical.index:
            raise DataError(f"{csv_path}: no row for patient {ref.patient_id} (case folder {raw_dir / ref.case_id})")

    table = pd.DataFrame([vars(r) for r in refs])
    table.insert(0, "row", np.arange(len(table)))
    denom = (table["n_slices"] - 1).clip(lower=1)
    table.insert(5, "position", (table["slice_index"] - 1) / denom)
    n = len(table)

    with atomic_dir(out_dir) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, RAW_SIZE, RAW_SIZE, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, RAW_SIZE, RAW_SIZE))
        decoded = _decode_all(raw_dir, refs, images, masks)
        images.flush()
        masks.flush()
        del images, masks

        table["tumour_pixels"] = [d.tumour_pixels for d in decoded]
        table["has_tumour"] = (table["tumour_pixels"] > 0).astype(int)
        if cfg.split_unit == "patient":
            patients = sorted(table["patient_id"].unique())
            labels = dict(zip(patients, assign_splits(len(patients), cfg.split_fractions, cfg.split_seed), strict=True))
            table["split"] = table["patient_id"].map(labels)
        else:
            table["split"] = assign_splits(n, cfg.split_fractions, cfg.split_seed)
        attrs = onehot.loc[table["patient_id"]].to_numpy()
        attr_frame = pd.DataFrame(attrs, columns=names)
        attribute_names = list(names)
        if common.use_position:
            attr_frame[POSITION] = table["position"].to_numpy()
            attribute_names.append(POSITION)
        table = pd.concat([table, attr_frame], axis=1)

        comp_rows = [
            (row, ref.case_id, ref.slice_index, table.at[row, "split"], conn, k, *c)
            for row, (ref, d) in enumerate(zip(refs, decoded, strict=True))
            for conn in (4, 8)
            for k, c in enumerate(d.components[conn], start=1)
        ]
        components = pd.DataFrame(comp_rows, columns=COMPONENT_COLUMNS)

        known = {rel: dig for d in decoded for rel, dig in d.digests.items()}
        fp = fingerprint(raw_dir, source="raw", known=known)
        fp.pop("source")
        write_csv(tmp / "manifest.csv", table)
        write_csv(tmp / "components.csv", components)
        write_json(
            tmp / "store.json",
            {
                "n_slices": n,
                "height": RAW_SIZE,
                "width": RAW_SIZE,
                "attribute_names": attribute_names,
                "attribute_columns": list(common.attribute_columns),
                "fingerprint": fp,
                "source": fetched_source(raw_dir),
                "split_unit": cfg.split_unit,
                "split_seed": cfg.split_seed,
            },
        )
    return _summary(table, components, attribute_names, small_side)


def _summary(table: pd.DataFrame, components: pd.DataFrame, attribute_names: list[str], side: int) -> dict:
    splits = {}
    for split in SPLITS:
        sub = table[table["split"] == split]
        splits[split] = {
            "cases": int(sub["case_id"].nunique()),
            "patients": int(sub["patient_id"].nunique()),
            "slices": int(len(sub)),
            "tumour_slices": int(sub["has_tumour"].sum()),
        }
    return {
        "n_cases": int(table["case_id"].nunique()),
        "n_patients": int(table["patient_id"].nunique()),
        "n_slices": int(len(table)),
        "n_tumour_slices": int(table["has_tumour"].sum()),
        "n_attributes": len(attribute_names),
        "splits": splits,
        "small_components": {
            **small_component_counts(components, side),
            "slices_tumour_lt_side_sq": small_tumour_slices(table["tumour_pixels"], side),
        },
    }


# --------------------------------------------------------------------------- store

