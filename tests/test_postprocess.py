"""lggseg.postprocess.remove_small_components on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from lggseg.postprocess import remove_small_components


def _mask() -> np.ndarray:
    """A 7x7 block (49 px), a 2x3 bar (6 px), a lone pixel, and a diagonal pixel pair."""
    m = np.zeros((20, 20), dtype=bool)
    m[1:8, 1:8] = True
    m[12:14, 2:5] = True
    m[17, 17] = True
    m[10, 10] = m[11, 11] = True
    return m


# (min_area, connectivity, pixels kept)
CASES = [
    (0, 8, 49 + 6 + 1 + 2),  # disabled
    (1, 8, 49 + 6 + 1 + 2),  # every component has >= 1 pixel
    (2, 8, 49 + 6 + 2),  # lone pixel gone; the diagonal pair is one component of 2
    (2, 4, 49 + 6),  # with 4-connectivity the pair is two single pixels
    (7, 8, 49),
    (49, 8, 49),  # area equal to min_area is kept (only smaller ones go)
    (50, 8, 0),
]


@pytest.mark.parametrize(("min_area", "connectivity", "kept"), CASES)
def test_remove_small_components(min_area, connectivity, kept):
    m = _mask()
    out = remove_small_components(m, min_area, connectivity)
    assert out.dtype == bool and out.shape == m.shape
    assert int(out.sum()) == kept
    assert not (out & ~m).any()  # never adds pixels
    assert int(m.sum()) == 58  # input untouched


def test_uint8_mask_and_empty_mask():
    m = _mask().astype(np.uint8)
    assert remove_small_components(m, 7).sum() == 49
    assert not remove_small_components(np.zeros((5, 5), np.uint8), 49).any()


@pytest.mark.parametrize(("min_area", "connectivity"), [(-1, 8), (2.5, 8), (True, 8), (4, 6)])
def test_bad_arguments(min_area, connectivity):
    with pytest.raises(ValueError):
        remove_small_components(_mask(), min_area, connectivity)
