"""The report's inputs, read and checked: ``metrics/<variant>.json`` (:func:`load_metrics`), the figure slices,
the ground-truth components, and :class:`Result` (a variant's resolved config and metrics).

Anything the report needs and cannot read is a :class:`~lggseg.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lggseg.config import RunConfig, is_number, resolve_variant, variant_names
from lggseg.data import manifest
from lggseg.errors import DataError
from lggseg.evaluation.metrics import SUMMARY_KEYS

# The scalar keys the evaluate stage writes (its intervals and the HD95 bookkeeping count aside).
SCALAR_KEYS = tuple(k for k in SUMMARY_KEYS if not k.endswith("_ci95") and k != "hd95_n_undefined")


FRACTION_KEYS = frozenset(
    {"dice_slice_mean", "iou_slice_mean", "dice_tumour_slices", "dice_patient_3d", "dice_micro", "empty_fp_rate"}
)


# NaN in lggseg.evaluation.metrics (e.g. no truth-empty slice for empty_fp_rate) is written as null.
NULLABLE_KEYS = frozenset({"dice_tumour_slices", "dice_patient_3d", "hd95_px", "empty_fp_rate", "noise_components_per_slice"})


CI_KEYS = ("dice_slice_mean_ci95", "dice_patient_3d_ci95")


def _check_block(block: Any, path: Path, where: str, require_ci: bool) -> None:
    if not isinstance(block, Mapping):
        raise DataError(f"{path}: {where or 'top level'} must be a JSON object, got {type(block).__name__}")
    prefix = f"{where}." if where else ""
    missing = [k for k in SCALAR_KEYS if k not in block]
    if missing:
        raise DataError(f"{path}: missing key(s) {[prefix + k for k in missing]}")
    for key in SCALAR_KEYS:
        v = block[key]
        if v is None and key in NULLABLE_KEYS:
            continue
        if not is_number(v):
            raise DataError(f"{path}: {prefix}{key} must be a finite number, got {v!r}")
        if key in FRACTION_KEYS and not 0.0 <= v <= 1.0:
            raise DataError(f"{path}: {prefix}{key} = {v!r} is not a fraction in [0, 1]")
        if v < 0:
            raise DataError(f"{path}: {prefix}{key} = {v!r} is negative")
    if block["n_test_slices"] < 1 or block["n_test_patients"] < 1:
        raise DataError(f"{path}: {prefix}n_test_slices / n_test_patients must be positive")
    for key in CI_KEYS:
        if key not in block:
            if require_ci:
                raise DataError(f"{path}: missing key {prefix}{key}")
            continue
        ci = block[key]
        if ci is None or (isinstance(ci, list) and all(c is None for c in ci)):
            continue  # undefined interval (no values to resample)
        if not (isinstance(ci, list) and len(ci) == 2 and all(is_number(c) for c in ci)):
            raise DataError(f"{path}: {prefix}{key} must be [lo, hi], got {ci!r}")
        if not 0.0 <= ci[0] <= ci[1] <= 1.0:
            raise DataError(f"{path}: {prefix}{key} = {ci!r} is not an interval inside [0, 1]")


def data_sha(metrics: Mapping[str, Any]) -> str | None:
    """The sha256 of the raw data a metrics file was measured on (``provenance.data.fingerprint``), if recorded."""
    fingerprint = (((metrics.get("provenance") or {}).get("data") or {}).get("fingerprint") or {})
    return fingerprint.get("sha256") if isinstance(fingerprint, Mapping) else None


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read and validate one ``metrics/<variant>.json`` (layout in docs/ARCHITECTURE.md)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found (run the evaluate stage for this variant first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    return check_metrics(data, path)


def check_metrics(data: Any, path: str | Path) -> dict[str, Any]:
    """Validate one variant's metrics (the content of ``metrics/<variant>.json``); ``path`` names it in errors."""
    path = Path(path)
    _check_block(data, path, "", require_ci=True)
    # Absent when postprocess.min_area is 0 (post-processing disabled).
    if "postprocessed" in data:
        _check_block(data["postprocessed"], path, "postprocessed", require_ci=False)
        if not is_number(data["postprocessed"].get("min_area")):
            raise DataError(f"{path}: postprocessed.min_area must be a number")
    if "provenance" in data and not isinstance(data["provenance"], Mapping):
        raise DataError(f"{path}: provenance must be a JSON object, got {type(data['provenance']).__name__}")
    seeds = data.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise DataError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(seeds) > 1 and not isinstance(data.get("seed_std"), Mapping):
        raise DataError(f"{path}: {len(seeds)} seeds but no 'seed_std' object")
    for where, block in (("", data), ("postprocessed.", data.get("postprocessed") or {})):
        std = block.get("seed_std", {})
        if not isinstance(std, Mapping):
            raise DataError(f"{path}: {where}seed_std must be an object")
        bad = {k: v for k, v in std.items() if not (v is None or is_number(v))}
        if bad:
            raise DataError(f"{path}: {where}seed_std values must be numbers, got {bad}")
    return data


@dataclass(frozen=True)
class FigureSlices:
    """The fixed test slices every variant predicts for the figures (``figure_slices.npz``)."""

    ids: list[str]
    image: np.ndarray  # uint8 (K, H, W, 3)
    truth: np.ndarray  # bool (K, H, W)
    prob: np.ndarray  # float32 (K, H, W)


def load_figure_slices(path: str | Path) -> FigureSlices:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: figure slices not found (written by the evaluate stage)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("ids", "image", "truth", "prob") if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; has {sorted(z.files)}")
            ids, image, truth, prob = (z[k] for k in ("ids", "image", "truth", "prob"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from None
    return check_figure_slices(ids, image, truth, prob, path)


def check_figure_slices(ids: np.ndarray, image: np.ndarray, truth: np.ndarray, prob: np.ndarray,
                        path: str | Path) -> FigureSlices:
    """Validated :class:`FigureSlices` from the arrays of a ``figure_slices.npz`` (``path`` names it in errors)."""
    k = len(ids)
    if k == 0:
        raise DataError(f"{path}: holds no slices")
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[0] != k or image.shape[3] != 3:
        raise DataError(f"{path}: image must be uint8 (K, H, W, 3) with K = {k}, got {image.dtype} {image.shape}")
    hw = image.shape[1:3]
    if truth.shape != (k, *hw) or prob.shape != (k, *hw):
        raise DataError(f"{path}: truth {truth.shape} and prob {prob.shape} must both be {(k, *hw)}")
    prob = prob.astype(np.float32)
    if not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1:
        raise DataError(f"{path}: prob must hold probabilities in [0, 1]")
    return FigureSlices([str(i) for i in ids], image, truth.astype(bool), prob)


COMPONENT_NEEDED = ("row", "connectivity", "area", "height", "width")


def load_components(path: str | Path) -> pd.DataFrame:
    """Read ``components.csv`` of the manifest store: one row per ground-truth connected component."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ground-truth component table not found (written by the manifest stage)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    missing = [c for c in COMPONENT_NEEDED if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; has {list(table.columns)}")
    if table.empty:
        raise DataError(f"{path}: holds no components")
    try:
        values = table[list(COMPONENT_NEEDED)].to_numpy(dtype=float)
    except ValueError:
        raise DataError(f"{path}: non-numeric values in {list(COMPONENT_NEEDED)}") from None
    if not np.isfinite(values).all() or (values[:, 2:] <= 0).any():
        raise DataError(f"{path}: areas and bounding-box sides must be positive numbers")
    bad = sorted(set(table["connectivity"]) - {4, 8})
    if bad:
        raise DataError(f"{path}: connectivity must be 4 or 8, found {bad}")
    return table


def component_counts(table: pd.DataFrame, side: int) -> dict[int, dict[str, int]]:
    """``{connectivity: counts}`` of components smaller than ``side x side`` under each convention.

    ``side`` is ``evaluate.noise_side`` (by default ``loss.i``, the paper's 7).

    The conventions (area, bounding box <= side, bounding box < side) are those of
    :func:`lggseg.data.manifest.small_component_counts`, the numbers ``metrics/data.json`` also reports.
    """
    counts = manifest.small_component_counts(table, side)
    return {conn: counts[f"conn{conn}"] for conn in (4, 8) if (table["connectivity"] == conn).any()}


def below_text(c: Mapping[str, int], side: int) -> str:
    """The counts of ground-truth components below the ``side`` x ``side`` noise size, in words."""
    return (f"{c['area_lt_side_sq']} with area < {side * side} px, {c['bbox_le_side']} with bounding box <= {side}x{side}, "
            f"{c['bbox_lt_side']} with bounding box < {side}x{side}")


@dataclass(frozen=True)
class Result:
    """One training variant: its resolved configuration and validated metrics."""

    name: str
    run: RunConfig
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        return self.run.label or self.name


def load_results(params: Mapping[str, Any], metrics_dir: str | Path) -> list[Result]:
    """Resolve every variant of ``params`` and load its metrics file (all must exist)."""
    metrics_dir = Path(metrics_dir)
    names = variant_names(params)
    return [Result(n, resolve_variant(params, n), load_metrics(metrics_dir / f"{n}.json"))
            for n in tqdm(names, desc="metrics", unit="variant", leave=False)]


def load_available(params: Mapping[str, Any], metrics_dir: str | Path) -> tuple[list[Result], list[Result]]:
    """``(results, absent)``: the variants of ``params`` whose ``<variant>.json`` exists in ``metrics_dir``,
    loaded and checked, and the others as :class:`Result` with empty metrics (not run yet: the report marks
    their rows "not run"). A metrics file that exists must be valid; at least one must exist."""
    metrics_dir = Path(metrics_dir)
    present, absent = [], []
    for name in variant_names(params):
        run, path = resolve_variant(params, name), metrics_dir / f"{name}.json"
        if path.is_file():
            present.append(Result(name, run, load_metrics(path)))
        else:
            absent.append(Result(name, run, {}))
    if not present:
        raise DataError(f"{metrics_dir}: no variant of the params has a metrics file (<variant>.json; "
                        "run the evaluate stage for at least one variant first)")
    return present, absent
