"""Contour overlays (red truth, green prediction) and the report's plot functions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lggseg.reporting.plotting import (
    PRED_RGB,
    TRUTH_RGB,
    DiceBar,
    contour,
    overlay,
    plot_component_sizes,
    plot_dice_by_variant,
    plot_encoder_grid,
    plot_loss_comparison,
    plot_validation_curves,
)


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


# (mask, thickness, expected number of contour pixels) worked out by hand
CONTOUR_CASES = [
    (square(9, 3, 3, 1), 1, 1),  # a single pixel is all contour
    (square(9, 3, 3, 2), 1, 4),  # 2x2: every pixel touches the outside
    (square(9, 2, 2, 3), 1, 8),  # 3x3: ring of 8 around the centre
    (square(9, 2, 2, 5), 1, 16),  # 5x5: 25 - 9 interior
    (square(9, 2, 2, 5), 2, 24),  # 5x5, 2 px band: only the centre is left
    (square(9, 0, 0, 4), 1, 12),  # 4x4 in the corner: the image border counts as outside, so 16 - 4
    (np.zeros((9, 9), bool), 1, 0),
]


@pytest.mark.parametrize(("mask", "thickness", "n"), CONTOUR_CASES)
def test_contour_pixel_counts(mask, thickness, n):
    c = contour(mask, thickness)
    assert int(c.sum()) == n
    assert not (c & ~mask).any()  # the band lies inside the region


def test_overlay_colours_truth_red_prediction_green_and_leaves_the_rest():
    image = np.full((12, 12, 3), 77, dtype=np.uint8)
    truth = square(12, 1, 1, 5)  # rows/cols 1..5
    pred = square(12, 4, 4, 5)  # rows/cols 4..8, overlapping the truth
    out = overlay(image, truth, pred)
    assert out.dtype == np.uint8 and out.shape == (12, 12, 3)
    assert tuple(out[1, 1]) == TRUTH_RGB  # truth corner
    assert tuple(out[1, 3]) == TRUTH_RGB  # truth top edge
    assert tuple(out[8, 8]) == PRED_RGB  # prediction corner
    assert tuple(out[4, 5]) == PRED_RGB  # on both contours: prediction drawn on top
    assert tuple(out[6, 6]) == (77, 77, 77)  # prediction interior
    assert tuple(out[3, 3]) == (77, 77, 77)  # truth interior
    assert tuple(out[10, 10]) == (77, 77, 77)  # background
    assert (image == 77).all()  # input untouched


def test_overlay_accepts_grey_images_and_missing_masks():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = overlay(image, None, square(8, 2, 2, 3))
    assert out.shape == (8, 8, 3)
    assert tuple(out[2, 2]) == PRED_RGB
    assert tuple(out[3, 3]) == (image[3, 3],) * 3
    assert (overlay(image, None, None) == image[..., None]).all()


def test_overlay_accepts_0_255_masks():
    out = overlay(np.zeros((6, 6, 3), np.uint8), square(6, 1, 1, 3).astype(np.uint8) * 255, None)
    assert tuple(out[1, 1]) == TRUTH_RGB


@pytest.mark.parametrize(
    ("image", "mask", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), bool), "uint8"),
        (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), bool), r"\(H, W\) or \(H, W, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((7, 8), bool), "does not match"),
    ],
)
def test_overlay_rejects_bad_inputs(image, mask, match):
    with pytest.raises(ValueError, match=match):
        overlay(image, mask, None)


# --------------------------------------------------------------------------- figures


@pytest.fixture
def slices():
    rng = np.random.default_rng(1)
    k, s = 2, 64
    truth = np.stack([square(s, 20, 20, 16 + 4 * i) for i in range(k)])
    image = rng.integers(0, 120, (k, s, s, 3), dtype=np.uint8)
    prob = np.clip(truth * 0.9 + rng.random((k, s, s)) * 0.2, 0, 1).astype(np.float32)
    return [f"TCGA_XX_0000_20000101_{i}" for i in range(k)], image, truth, prob


def _png_ok(path, min_bytes=5_000):
    assert path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_loss_comparison_and_encoder_grid_are_written(tmp_path, slices):
    ids, image, truth, prob = slices
    w, h = _png_ok(plot_loss_comparison(ids, image, truth, [("BCE", prob), ("BCE + Dice + Outlier", prob ** 2)], 0.5,
                                        tmp_path / "f7.png", note="DEMO"))
    assert w > h  # 4 columns, 2 rows
    w8, h8 = _png_ok(plot_encoder_grid(ids, image, truth, [("a", prob > 0.5), ("b", prob > 0.8), ("c", prob > 0.9)],
                                       tmp_path / "f8.png"))
    assert w8 > h8  # ground truth + 3 model columns, 2 rows


def test_figure_rejects_mismatched_slice_counts(tmp_path, slices):
    ids, image, truth, prob = slices
    with pytest.raises(ValueError, match="probability maps for 2 slices"):
        plot_loss_comparison(ids, image, truth, [("BCE", prob[:1])], 0.5, tmp_path / "f7.png")
    assert not (tmp_path / "f7.png").exists()


def test_component_sizes_and_dice_bars_are_written(tmp_path):
    areas = {"4-connected": np.array([3, 40, 60, 900, 5000]), "8-connected": np.array([40, 60, 900, 5000])}
    below = {"4-connected": "2 with area < 49 px", "8-connected": "1 with area < 49 px"}
    _png_ok(plot_component_sizes(areas, below, tmp_path / "c.png", side=7))
    bars = [
        DiceBar("a", 91.0, (90.0, 92.0), 89.0, (87.0, 90.5), paper=92.8),
        DiceBar("b", 85.0, None, 80.0, None),  # no CI, no paper row
    ]
    _png_ok(plot_dice_by_variant(bars, tmp_path / "d.png"))


def test_validation_curves_are_written_with_or_without_curves(tmp_path):
    panels = {"Table 3": [("a seed 23", [0.5, 0.6, 0.605, 0.61]), ("b seed 23", [0.4, 0.7, 0.5])],
              "Table 4": [("c seed 23", [0.2])]}
    _png_ok(plot_validation_curves(panels, tmp_path / "v.png", last=3, tolerance=0.01))
    _png_ok(plot_validation_curves({}, tmp_path / "empty.png", last=3, tolerance=0.01))


def test_empty_inputs_are_errors(tmp_path):
    with pytest.raises(ValueError):
        plot_dice_by_variant([], tmp_path / "d.png")
    with pytest.raises(ValueError):
        plot_component_sizes({}, {}, tmp_path / "c.png", side=7)
