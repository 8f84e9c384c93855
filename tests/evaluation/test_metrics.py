"""lggseg.evaluation.metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lggseg.evaluation.metrics import (
    SUMMARY_KEYS,
    bootstrap_ci,
    components,
    confusion,
    dice,
    hd95,
    iou,
    noise_components,
    patient_rows,
    slice_stats,
    summarize,
)

H = W = 16


def box(*rects: tuple[int, int, int, int], shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """Boolean mask with the given ``(row0, row1, col0, col1)`` rectangles (half-open) set."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in rects:
        m[r0:r1, c0:c1] = True
    return m


EMPTY = box()

# (pred, truth, tp, fp, fn, dice, iou)
OVERLAP_CASES = [
    pytest.param(EMPTY, EMPTY, 0, 0, 0, 1.0, 1.0, id="both-empty"),
    pytest.param(box((0, 2, 0, 2)), EMPTY, 0, 4, 0, 0.0, 0.0, id="empty-truth-nonempty-pred"),
    pytest.param(EMPTY, box((0, 2, 0, 2)), 0, 0, 4, 0.0, 0.0, id="nonempty-truth-empty-pred"),
    pytest.param(box((0, 4, 0, 4)), box((0, 4, 0, 4)), 16, 0, 0, 1.0, 1.0, id="identical"),
    # pred 4x4, truth its left 4x2 half: 2*8/(16+8) = 2/3, IoU 8/16
    pytest.param(box((0, 4, 0, 4)), box((0, 4, 0, 2)), 8, 8, 0, 2 / 3, 0.5, id="pred-contains-truth"),
    # 2x4 boxes shifted by 2 columns, overlap 2x2: 2*4/(8+8) = 0.5, IoU 4/12
    pytest.param(box((0, 2, 0, 4)), box((0, 2, 2, 6)), 4, 4, 4, 0.5, 1 / 3, id="half-overlap"),
    pytest.param(box((0, 2, 0, 2)), box((5, 7, 5, 7)), 0, 4, 4, 0.0, 0.0, id="disjoint"),
]


@pytest.mark.parametrize(("pred", "truth", "tp", "fp", "fn", "d", "j"), OVERLAP_CASES)
def test_overlap_metrics(pred, truth, tp, fp, fn, d, j):
    c = confusion(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (tp, fp, fn, H * W - tp - fp - fn)
    assert dice(pred, truth) == pytest.approx(d)
    assert iou(pred, truth) == pytest.approx(j)


def test_integer_masks_accepted_and_float_masks_rejected():
    m = box((0, 3, 0, 3))
    assert dice(m.astype(np.uint8), m.astype(np.uint8) * 255) == 1.0
    with pytest.raises(ValueError, match="boolean or integer"):
        dice(m.astype(np.float32), m)
    with pytest.raises(ValueError, match="shapes differ"):
        dice(m, m[:, :-1])


def _line(col: int, rows: tuple[int, int] = (2, 30), shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1], col] = True
    return m


def _pixel(r: int, c: int, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r, c] = True
    return m


# (pred, truth, hd95 in pixels)
HD_CASES = [
    pytest.param(box((2, 9, 2, 9)), box((2, 9, 2, 9)), 0.0, id="identical"),
    # A 3-4-5 triangle between two single pixels.
    pytest.param(_pixel(1, 1), _pixel(4, 5), 5.0, id="pixels-3-4-5"),
    # Two vertical 1-pixel lines k columns apart: every boundary pixel is exactly k away.
    pytest.param(_line(5), _line(8), 3.0, id="lines-offset-3"),
    pytest.param(_line(5), _line(12), 7.0, id="lines-offset-7"),
    # Truth 20x20 square, prediction grown by 1 on every side (22x22). Truth->pred: all 1.
    # Pred->truth: 80 of 84 boundary pixels are 1 away, only the 4 corners are sqrt(2) away
    # (4/84 < 5%), so HD95 is 1 while the plain Hausdorff distance would be sqrt(2).
    pytest.param(box((5, 27, 5, 27), shape=(32, 32)), box((6, 26, 6, 26), shape=(32, 32)), 1.0, id="grown-square"),
]


@pytest.mark.parametrize(("pred", "truth", "expected"), HD_CASES)
def test_hd95_hand_cases(pred, truth, expected):
    assert hd95(pred, truth) == pytest.approx(expected, abs=1e-5)
    assert hd95(truth, pred) == pytest.approx(expected, abs=1e-5)  # symmetric


def _random_blobs(rng: np.random.Generator, shape=(64, 64)) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.random(shape), 3) > 0.52


@pytest.mark.slow  # importing MONAI takes several seconds
@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # raised inside MONAI itself
def test_hd95_agrees_with_monai():
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        pred, truth = _random_blobs(rng), _random_blobs(rng)
        if not pred.any() or not truth.any():
            continue
        ref = compute_hausdorff_distance(pred[None, None], truth[None, None], include_background=True, percentile=95)
        assert hd95(pred, truth) == pytest.approx(float(ref.reshape(-1)[0]), abs=1e-4)
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize(
    ("pred", "truth"),
    [(EMPTY, EMPTY), (box((0, 2, 0, 2)), EMPTY), (EMPTY, box((0, 2, 0, 2)))],
    ids=["both-empty", "empty-truth", "empty-pred"],
)
def test_hd95_undefined_when_a_side_is_empty(pred, truth):
    assert math.isnan(hd95(pred, truth))


# Two diagonal neighbours plus a separate 2x1 bar: 8-connectivity joins the diagonal pair.
DIAG = np.zeros((6, 6), dtype=bool)
DIAG[0, 0] = DIAG[1, 1] = True
DIAG[4, 3:5] = True


@pytest.mark.parametrize(
    ("mask", "connectivity", "areas"),
    [
        (DIAG, 8, [2, 2]),
        (DIAG, 4, [1, 1, 2]),
        (np.zeros((4, 4), bool), 8, []),
        (np.ones((4, 4), bool), 4, [16]),
    ],
    ids=["diag-8", "diag-4", "empty", "full"],
)
def test_components(mask, connectivity, areas):
    labels, got = components(mask, connectivity)
    assert sorted(got.tolist()) == areas
    assert labels.max() == len(areas)
    assert np.array_equal(labels > 0, mask)


def test_components_rejects_bad_connectivity():
    with pytest.raises(ValueError, match="connectivity"):
        components(DIAG, 6)


# Truth: 8x8 block at the top-left. Prediction: the block, a 2x2 blob far away (noise),
# a 3x3 blob overlapping the truth's corner (touching: not noise) and a 7x7 blob far away
# (area 49, not below max_area 49: not noise).
NOISE_TRUTH = box((0, 8, 0, 8), shape=(40, 40))
NOISE_PRED = box((0, 8, 0, 8), (20, 22, 2, 4), (30, 37, 30, 37), shape=(40, 40))
NOISE_TOUCH = box((7, 10, 10, 13), shape=(40, 40)) | box((10, 13, 7, 10), shape=(40, 40))


@pytest.mark.parametrize(
    ("pred", "truth", "max_area", "connectivity", "expected"),
    [
        (NOISE_PRED, NOISE_TRUTH, 49, 8, 1),  # only the 2x2 blob
        (NOISE_PRED, NOISE_TRUTH, 50, 8, 2),  # the 7x7 blob is now small enough too
        (NOISE_PRED, NOISE_TRUTH, 4, 8, 0),  # the 2x2 blob has area 4, not < 4
        (NOISE_PRED, np.zeros((40, 40), bool), 49, 8, 1),  # no truth: the 8x8 block is large, not noise
        (box((6, 9, 6, 9), shape=(40, 40)), NOISE_TRUTH, 49, 8, 0),  # overlaps the truth's corner
        (box((8, 11, 8, 11), shape=(40, 40)), NOISE_TRUTH, 49, 8, 1),  # diagonal neighbour, shares no pixel
        # Two 3x3 squares meeting only at a corner, (9, 10) and (10, 9): one component with
        # 8-connectivity (area 18), two with 4; only the upper one overlaps the truth, at (7, 10).
        (NOISE_TOUCH, box((0, 8, 10, 11), shape=(40, 40)), 49, 8, 0),
        (NOISE_TOUCH, box((0, 8, 10, 11), shape=(40, 40)), 49, 4, 1),
        (EMPTY, NOISE_TRUTH[:16, :16], 49, 8, 0),
    ],
    ids=["2x2", "7x7-included", "area-equal", "no-truth", "overlap", "diagonal-only", "corner-8", "corner-4", "empty-pred"],
)
def test_noise_components(pred, truth, max_area, connectivity, expected):
    assert noise_components(pred, truth, max_area, connectivity) == expected


def test_slice_stats_counts_match_functions():
    pred, truth = NOISE_PRED, NOISE_TRUTH
    s = slice_stats(pred, truth, noise_max_area=49)
    assert s["truth_pixels"] == 64
    assert s["pred_pixels"] == 64 + 4 + 49
    assert s["intersection"] == 64
    assert s["dice"] == pytest.approx(dice(pred, truth))
    assert s["iou"] == pytest.approx(iou(pred, truth))
    assert s["hd95"] == pytest.approx(hd95(pred, truth))
    assert s["noise_components"] == 1


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_identical_patients_gives_zero_width_interval():
    values = np.array([0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    lo, hi = bootstrap_ci(values, groups, n_samples=200, seed=1)
    assert lo == pytest.approx(0.7) and hi == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        # Patients A (one slice, Dice 0) and B (three slices, Dice 1). Resampling two patients:
        # AA (p=1/4) -> 0, AB/BA (1/2) -> 3/4 pooled, BB (1/4) -> 1. The 2.5th percentile lies
        # in the AA mass and the 97.5th in the BB mass: [0, 1].
        (0.95, (0.0, 1.0)),
        # The 30th and 70th percentiles both fall inside the AB mass (cumulative 1/4 .. 3/4).
        (0.40, (0.75, 0.75)),
    ],
)
def test_bootstrap_two_patients(level, expected):
    values = np.array([0.0, 1.0, 1.0, 1.0])
    groups = np.array(["A", "B", "B", "B"])
    lo, hi = bootstrap_ci(values, groups, n_samples=4000, seed=7, level=level)
    assert (lo, hi) == pytest.approx(expected)


def test_bootstrap_is_seeded_and_ordered():
    rng = np.random.default_rng(0)
    values = rng.random(60)
    groups = np.repeat(np.arange(12), 5)
    a = bootstrap_ci(values, groups, n_samples=300, seed=3)
    assert a == bootstrap_ci(values, groups, n_samples=300, seed=3)
    assert a[0] < values.mean() < a[1]
    wide = bootstrap_ci(values, groups, n_samples=300, seed=3, level=0.99)
    assert wide[0] <= a[0] and wide[1] >= a[1]


def test_bootstrap_empty_and_bad_input():
    assert all(math.isnan(v) for v in bootstrap_ci([], [], n_samples=10))
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ci([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], ["a"], level=1.0)


# ----------------------------------------------------------------------------- summarize


def _row(patient, slice_index, truth, pred, inter, hd=math.nan, noise=0):
    from lggseg.evaluation.metrics import dice_from_counts, iou_from_counts

    return {
        "patient_id": patient,
        "case_id": f"{patient}_case",
        "slice_index": slice_index,
        "truth_pixels": truth,
        "pred_pixels": pred,
        "intersection": inter,
        "dice": dice_from_counts(inter, truth, pred),
        "iou": iou_from_counts(inter, truth, pred),
        "hd95": hd,
        "noise_components": noise,
    }


# Patient P: a big tumour slice segmented well, a small one missed, an empty slice left empty.
# Patient Q: a tumour slice half found, an empty slice with a false positive (2 noise blobs).
ROWS = pd.DataFrame(
    [
        _row("P", 1, truth=100, pred=100, inter=90, hd=2.0),  # dice 0.9, iou 90/110
        _row("P", 2, truth=10, pred=0, inter=0),  # dice 0, hd undefined
        _row("P", 3, truth=0, pred=0, inter=0),  # dice 1
        _row("Q", 1, truth=40, pred=20, inter=20, hd=6.0),  # dice 40/60, iou 0.5
        _row("Q", 2, truth=0, pred=5, inter=0, noise=2),  # dice 0
    ]
)


def test_summarize_hand_table():
    s = summarize(ROWS, bootstrap_samples=200, bootstrap_seed=0)
    assert list(s) == list(SUMMARY_KEYS)
    slice_dice = [0.9, 0.0, 1.0, 2 / 3, 0.0]
    assert s["dice_slice_mean"] == pytest.approx(np.mean(slice_dice))
    assert s["iou_slice_mean"] == pytest.approx(np.mean([90 / 110, 0.0, 1.0, 0.5, 0.0]))
    assert s["dice_tumour_slices"] == pytest.approx(np.mean([0.9, 0.0, 2 / 3]))
    # P volume: 2*90/(110+100) ; Q volume: 2*20/(40+25)
    assert s["dice_patient_3d"] == pytest.approx(np.mean([180 / 210, 40 / 65]))
    # pooled: 2*110/(150+125)
    assert s["dice_micro"] == pytest.approx(220 / 275)
    assert s["hd95_px"] == pytest.approx(4.0)
    assert s["hd95_n_undefined"] == 1
    assert s["empty_fp_rate"] == pytest.approx(0.5)
    assert s["noise_components_per_slice"] == pytest.approx(2 / 5)
    assert (s["n_test_slices"], s["n_test_patients"]) == (5, 2)
    lo, hi = s["dice_slice_mean_ci95"]
    assert lo <= s["dice_slice_mean"] <= hi
    # Two patients: resamples PP, PQ, QQ -> the interval spans Q's mean to P's mean.
    assert (lo, hi) == pytest.approx((np.mean(slice_dice[3:]), np.mean(slice_dice[:3])))
    assert s["dice_patient_3d_ci95"] == pytest.approx([40 / 65, 180 / 210])


@pytest.mark.parametrize(
    ("rows", "key", "expected"),
    [
        # Every slice has tumour: no empty slice, so the false-positive rate is undefined.
        (ROWS[ROWS["truth_pixels"] > 0], "empty_fp_rate", math.nan),
        # No slice has tumour: tumour-slice Dice and HD95 are undefined.
        (ROWS[ROWS["truth_pixels"] == 0], "dice_tumour_slices", math.nan),
        (ROWS[ROWS["truth_pixels"] == 0], "hd95_px", math.nan),
        (ROWS[ROWS["truth_pixels"] == 0], "hd95_n_undefined", 0),
        # All-empty and nothing predicted: every Dice reading is 1.
        (ROWS[(ROWS["truth_pixels"] == 0) & (ROWS["pred_pixels"] == 0)], "dice_micro", 1.0),
        (ROWS[(ROWS["truth_pixels"] == 0) & (ROWS["pred_pixels"] == 0)], "dice_patient_3d", 1.0),
    ],
    ids=["no-empty-slices", "no-tumour-dice", "no-tumour-hd", "no-tumour-hd-n", "all-empty-micro", "all-empty-3d"],
)
def test_summarize_undefined_and_degenerate(rows, key, expected):
    got = summarize(rows, bootstrap_samples=100)[key]
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


def test_patient_3d_differs_from_slice_mean():
    p = patient_rows(ROWS).set_index("patient_id")
    assert p.loc["P", "dice_3d"] == pytest.approx(180 / 210)
    assert p.loc["P", "dice_slice_mean"] == pytest.approx(np.mean([0.9, 0.0, 1.0]))
    assert p.loc["Q", "n_tumour_slices"] == 1
    assert p.loc["Q", "noise_components"] == 2


def test_summarize_names_missing_columns():
    with pytest.raises(ValueError, match="hd95"):
        summarize(ROWS.drop(columns=["hd95"]))
