"""Segmentation metrics on boolean masks and their test-split summary.

The paper reports the Dice similarity coefficient (section 4.1.2, eq. 14) and IoU (Tables 2-4)
without saying how they are averaged; this module computes every reading that matters
(slice mean, tumour-slice mean, patient 3D Dice, pooled "micro" Dice) plus two measures the
paper asks for in its conclusion: a count of noise-like predicted regions (the target of the
outlier loss, section 3.4.3: components smaller than ``7 x 7``) and the 95th-percentile
Hausdorff distance of the boundary (MONAI's definition, computed with scipy distance transforms).

Empty-mask rules (every function documents its own):

* ``dice`` / ``iou``: both masks empty -> 1.0 (nothing to find, nothing predicted);
  exactly one empty -> 0.0.
* ``hd95``: undefined (NaN) when either mask is empty; :func:`summarize` averages it over
  tumour slices with a non-empty prediction and reports how many tumour slices were left out
  (``hd95_n_undefined``).

All per-slice functions are pure numpy on 2D masks; :func:`summarize` works on the per-slice
row table alone (no masks), so it can be re-run on ``data/eval/<variant>/slices.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import ndimage

SLICE_COLUMNS = (
    "patient_id",
    "case_id",
    "slice_index",
    "truth_pixels",
    "pred_pixels",
    "intersection",
    "dice",
    "iou",
    "hd95",
    "noise_components",
)
"""Columns :func:`summarize` needs in the per-slice row table."""

SUMMARY_KEYS = (
    "dice_slice_mean",
    "iou_slice_mean",
    "dice_tumour_slices",
    "dice_patient_3d",
    "dice_micro",
    "hd95_px",
    "hd95_n_undefined",
    "empty_fp_rate",
    "noise_components_per_slice",
    "n_test_slices",
    "n_test_patients",
    "dice_slice_mean_ci95",
    "dice_patient_3d_ci95",
)
"""Keys of the dict returned by :func:`summarize`, in output order."""

HEADLINE_KEYS = ("dice_slice_mean", "dice_tumour_slices", "dice_patient_3d", "dice_micro", "empty_fp_rate")
"""The five numbers a short summary shows (the workspace's closing lines, an ablation row)."""

_CROSS = ndimage.generate_binary_structure(2, 1)


class Confusion(NamedTuple):
    """Pixel counts of a binary prediction against the truth."""

    tp: int
    fp: int
    fn: int
    tn: int


def _as_mask(mask: Any, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        # Probabilities must be thresholded explicitly; silently treating 0.3 as True hides bugs.
        raise ValueError(f"{name}: expected a boolean or integer mask, got dtype {arr.dtype}")
    return arr != 0


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    return p, t


def _ratio_or_one(num: float, den: float) -> float:
    """``num / den``, and 1.0 when ``den`` is 0 (both masks empty)."""
    return 1.0 if den == 0 else float(num) / float(den)


def dice_from_counts(intersection: float, truth_pixels: float, pred_pixels: float) -> float:
    """Eq. 14 from counts: ``2|X n Y| / (|X| + |Y|)``; 1.0 when both are empty."""
    return _ratio_or_one(2.0 * intersection, truth_pixels + pred_pixels)


def iou_from_counts(intersection: float, truth_pixels: float, pred_pixels: float) -> float:
    """``|X n Y| / |X u Y|``; 1.0 when both are empty."""
    return _ratio_or_one(intersection, truth_pixels + pred_pixels - intersection)


def confusion(pred: Any, truth: Any) -> Confusion:
    """True/false positive/negative pixel counts.

    Args:
        pred: predicted mask, bool or integer (nonzero = foreground; floats are refused).
        truth: ground-truth mask of the same shape and kinds.

    Returns:
        :class:`Confusion` of ints (all zero but ``tn`` for two empty masks).
    """
    p, t = _pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return Confusion(tp=tp, fp=fp, fn=fn, tn=int(p.size) - tp - fp - fn)


def dice(pred: Any, truth: Any) -> float:
    """Dice coefficient (eq. 14).

    Args:
        pred: predicted mask, bool or integer (nonzero = foreground; floats are refused).
        truth: ground-truth mask of the same shape and kinds.

    Returns:
        float in [0, 1]; both masks empty -> 1.0, exactly one empty -> 0.0.
    """
    c = confusion(pred, truth)
    return dice_from_counts(c.tp, c.tp + c.fn, c.tp + c.fp)


def iou(pred: Any, truth: Any) -> float:
    """Intersection over union.

    Args:
        pred: predicted mask, bool or integer (nonzero = foreground; floats are refused).
        truth: ground-truth mask of the same shape and kinds.

    Returns:
        float in [0, 1]; both masks empty -> 1.0, exactly one empty -> 0.0.
    """
    c = confusion(pred, truth)
    return iou_from_counts(c.tp, c.tp + c.fn, c.tp + c.fp)


def boundary(mask: Any) -> np.ndarray:
    """Boundary pixels of a mask: the mask minus its binary erosion by a 4-connected cross.

    Args:
        mask: bool or integer 2D mask ``(H, W)``.

    Returns:
        bool ``(H, W)``; pixels on the image border count as boundary (outside is background), an
        empty mask has none.
    """
    m = _as_mask(mask, "mask")
    return m & ~ndimage.binary_erosion(m, structure=_CROSS, border_value=0)


def hd95(pred: Any, truth: Any) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the mask boundaries, in pixels.

    The definition of MONAI's ``compute_hausdorff_distance(percentile=95)`` (the test suite
    checks the two agree): boundary pixels are each mask minus its erosion (:func:`boundary`),
    Euclidean distances go from each boundary pixel to the nearest boundary pixel of the other
    mask (``scipy.ndimage.distance_transform_edt``), and the result is the larger of the two
    directed 95th percentiles (linear interpolation). Computed with scipy because importing
    MONAI costs seconds.

    Args:
        pred: predicted 2D mask ``(H, W)``, bool or integer (nonzero = foreground; floats are refused).
        truth: ground-truth mask of the same shape and kinds.

    Returns:
        float, pixels; NaN when either mask is empty (the distance to nothing is undefined).
    """
    p, t = _pair(pred, truth)
    if p.ndim != 2:
        raise ValueError(f"hd95 expects 2D masks, got shape {p.shape}")
    if not p.any() or not t.any():
        return math.nan
    # Every boundary pixel lies inside the union's bounding box, so crop to it (exact, and fast).
    rows, cols = np.nonzero(p | t)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    edge_p, edge_t = boundary(p)[box], boundary(t)[box]
    p_to_t = ndimage.distance_transform_edt(~edge_t)[edge_p]
    t_to_p = ndimage.distance_transform_edt(~edge_p)[edge_t]
    return float(max(np.percentile(p_to_t, 95), np.percentile(t_to_p, 95)))


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def components(mask: Any, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a 2D mask.

    Args:
        mask: bool or integer ``(H, W)``.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

    Returns:
        ``(labels, areas)``: ``scipy.ndimage.label``'s int32 ``(H, W)`` image (0 = background,
        1..n = components) and int ``(n,)`` with ``areas[k - 1]`` the pixel count of component
        ``k``; an empty mask gives all-zero labels and ``areas`` of length 0.
    """
    m = _as_mask(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"components expects a 2D mask, got shape {m.shape}")
    labels, n = ndimage.label(m, structure=_structure(connectivity))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, areas


def noise_components(pred: Any, truth: Any, max_area: int, connectivity: int = 8) -> int:
    """Number of predicted components with area ``< max_area`` that share no pixel with the truth.

    These are the isolated noise-like regions the outlier loss targets (section 3.4.3, with
    ``max_area = noise_side**2 = 49``). A small component overlapping the truth is a (poor)
    detection, not noise, so it is not counted.

    Args:
        pred: predicted 2D mask ``(H, W)``, bool or integer (nonzero = foreground; floats are refused).
        truth: ground-truth mask of the same shape and kinds.
        max_area: components with fewer pixels than this count.
        connectivity: 4 or 8.

    Returns:
        int >= 0; 0 for an empty prediction.
    """
    p, t = _pair(pred, truth)
    labels, areas = components(p, connectivity)
    if areas.size == 0:
        return 0
    touches = np.zeros(areas.size + 1, dtype=bool)
    touches[np.unique(labels[t])] = True
    small = areas < max_area
    return int(np.count_nonzero(small & ~touches[1:]))


def slice_stats(pred: Any, truth: Any, *, noise_max_area: int, connectivity: int = 8) -> dict[str, float | int]:
    """Every per-slice quantity :func:`summarize` needs (the metric columns of a slice row).

    Args:
        pred: predicted 2D mask ``(H, W)``, bool or integer (nonzero = foreground; floats are refused).
        truth: ground-truth mask of the same shape and kinds.
        noise_max_area: ``max_area`` of :func:`noise_components`.
        connectivity: 4 or 8.

    Returns:
        ``truth_pixels``, ``pred_pixels``, ``intersection`` (ints), ``dice``, ``iou`` (1.0 when both
        masks are empty), ``hd95`` (NaN when either is empty) and ``noise_components``.
    """
    p, t = _pair(pred, truth)
    c = confusion(p, t)
    truth_px, pred_px = c.tp + c.fn, c.tp + c.fp
    return {
        "truth_pixels": truth_px,
        "pred_pixels": pred_px,
        "intersection": c.tp,
        "dice": dice_from_counts(c.tp, truth_px, pred_px),
        "iou": iou_from_counts(c.tp, truth_px, pred_px),
        "hd95": hd95(p, t),
        "noise_components": noise_components(p, t, noise_max_area, connectivity),
    }


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_samples: int = 1000,
    seed: int = 23,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(values)`` resampling whole groups (patients).

    Each replicate draws as many groups as there are, with replacement, and pools the values
    of every drawn group (a group drawn twice contributes its values twice), so slices of one
    patient are never treated as independent.

    Args:
        values: float ``(N,)``, one value per row (slice or patient).
        groups: ``(N,)`` group label of each value (patient id).
        stat: statistic of a pooled replicate (default the mean).
        n_samples, seed, level: replicates, generator seed, interval level in (0, 1).

    Returns:
        ``(lo, hi)``: the ``(1-level)/2`` and ``(1+level)/2`` percentiles of the replicate
        statistics; ``(nan, nan)`` when there are no values.
    """
    vals = np.asarray(values, dtype=float)
    grp = np.asarray(groups)
    if vals.ndim != 1 or grp.shape != vals.shape:
        raise ValueError(f"values and groups must be 1D of the same length, got {vals.shape} and {grp.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples!r}")
    if vals.size == 0:
        return (math.nan, math.nan)
    _, codes = np.unique(grp, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(codes.max() + 2))
    members = [order[bounds[g] : bounds[g + 1]] for g in range(len(bounds) - 1)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(n_samples, len(members)))
    stats = np.array([stat(vals[np.concatenate([members[g] for g in row])]) for row in draws], dtype=float)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def _check_columns(rows: pd.DataFrame) -> None:
    missing = [c for c in SLICE_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"slice rows lack column(s) {missing}; need {list(SLICE_COLUMNS)}")


def patient_rows(slice_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: summed counts, 3D Dice/IoU of the whole volume, slice-mean Dice.

    The 3D scores sum intersections and sizes over the patient's slices before dividing, so a
    patient with no tumour and no predicted pixel scores 1.0 (same rule as a slice).
    """
    _check_columns(slice_rows)
    g = slice_rows.groupby("patient_id", sort=True)
    out = pd.DataFrame(
        {
            "n_slices": g.size(),
            "n_tumour_slices": g["truth_pixels"].apply(lambda s: int((s > 0).sum())),
            "truth_pixels": g["truth_pixels"].sum(),
            "pred_pixels": g["pred_pixels"].sum(),
            "intersection": g["intersection"].sum(),
            "dice_slice_mean": g["dice"].mean(),
            "noise_components": g["noise_components"].sum(),
        }
    )
    out["dice_3d"] = [
        dice_from_counts(i, t, p) for i, t, p in zip(out["intersection"], out["truth_pixels"], out["pred_pixels"], strict=True)
    ]
    out["iou_3d"] = [
        iou_from_counts(i, t, p) for i, t, p in zip(out["intersection"], out["truth_pixels"], out["pred_pixels"], strict=True)
    ]
    return out.reset_index()


def _mean_or_nan(x: pd.Series | np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if x.size else math.nan


def summarize(
    slice_rows: pd.DataFrame,
    *,
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 23,
    level: float = 0.95,
) -> dict[str, Any]:
    """The test-split metrics (keys :data:`SUMMARY_KEYS`) from per-slice rows alone.

    * ``dice_slice_mean`` / ``iou_slice_mean``: mean over all slices (empty/empty counts 1).
    * ``dice_tumour_slices``: mean Dice over slices with non-empty truth.
    * ``dice_patient_3d``: mean over patients of the Dice of the whole volume.
    * ``dice_micro``: Dice of all pixels pooled.
    * ``hd95_px``: mean HD95 over tumour slices with a non-empty prediction;
      ``hd95_n_undefined`` tumour slices had an empty prediction and are left out.
    * ``empty_fp_rate``: share of truth-empty slices with any predicted pixel.
    * ``noise_components_per_slice``: mean count of isolated small predicted components.
    * ``*_ci95``: ``[lo, hi]`` patient-level percentile bootstrap (``level`` = 0.95 by default).

    Undefined values (e.g. no truth-empty slice for ``empty_fp_rate``) are NaN.
    """
    _check_columns(slice_rows)
    if len(slice_rows) == 0:
        raise ValueError("summarize: no slice rows")
    rows = slice_rows
    tumour = rows["truth_pixels"].to_numpy() > 0
    has_pred = rows["pred_pixels"].to_numpy() > 0
    patients = patient_rows(rows)
    inter, truth_px, pred_px = (float(rows[c].sum()) for c in ("intersection", "truth_pixels", "pred_pixels"))
    hd = rows["hd95"].to_numpy(dtype=float)[tumour & has_pred]
    ci = {"n_samples": bootstrap_samples, "seed": bootstrap_seed, "level": level}
    return {
        "dice_slice_mean": _mean_or_nan(rows["dice"]),
        "iou_slice_mean": _mean_or_nan(rows["iou"]),
        "dice_tumour_slices": _mean_or_nan(rows["dice"].to_numpy()[tumour]),
        "dice_patient_3d": _mean_or_nan(patients["dice_3d"]),
        "dice_micro": dice_from_counts(inter, truth_px, pred_px),
        "hd95_px": _mean_or_nan(hd),
        "hd95_n_undefined": int(np.count_nonzero(tumour & ~has_pred)),
        "empty_fp_rate": _mean_or_nan(has_pred[~tumour]),
        "noise_components_per_slice": _mean_or_nan(rows["noise_components"]),
        "n_test_slices": int(len(rows)),
        "n_test_patients": int(patients.shape[0]),
        "dice_slice_mean_ci95": list(bootstrap_ci(rows["dice"], rows["patient_id"], **ci)),
        "dice_patient_3d_ci95": list(bootstrap_ci(patients["dice_3d"], patients["patient_id"], **ci)),
    }
