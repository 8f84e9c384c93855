"""lggseg.evaluation.postprocess.remove_small_components on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from lggseg.evaluation.postprocess import remove_small_components


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


# --------------------------------------------------------------------------- whole cases


def _volume() -> np.ndarray:
    """4 slices of 10x10: a 3-slice tumour (2x2, 3x3, 2x2), a 5-px island on slice 3, a pixel on slice 0
    touching the tumour of slice 1 only diagonally (across slices and in-plane)."""
    v = np.zeros((4, 10, 10), dtype=bool)
    v[0, 1, 1] = True  # diagonal neighbour of v[1, 2, 2]
    v[1, 2:4, 2:4] = True
    v[2, 2:5, 2:5] = True
    v[3, 2:4, 2:4] = True
    v[3, 8, 5:10] = True  # 5-px island, not connected
    return v


def test_keep_largest_3d_keeps_the_main_region_with_its_diagonal_neighbours():
    from lggseg.evaluation.postprocess import keep_largest_3d

    v = _volume()
    kept = keep_largest_3d(v)
    assert kept.sum() == 1 + 4 + 9 + 4  # the island goes, the diagonal pixel stays (26-neighbourhood)
    assert not kept[3, 8].any() and kept[0, 1, 1]
    assert v[3, 8, 5:].all()  # the input is not modified


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        (np.zeros((3, 5, 5), dtype=bool), 0),  # an empty case stays empty
        (np.ones((1, 4, 4), dtype=bool), 16),  # one region: unchanged
        (np.eye(5, dtype=bool)[None], 5),  # a diagonal line is one 3D region
    ],
)
def test_keep_largest_3d_edge_cases(volume, expected):
    from lggseg.evaluation.postprocess import keep_largest_3d

    assert keep_largest_3d(volume).sum() == expected


def test_keep_largest_3d_needs_a_volume():
    from lggseg.evaluation.postprocess import keep_largest_3d

    with pytest.raises(ValueError, match="volume"):
        keep_largest_3d(np.zeros((5, 5), dtype=bool))


# (min_area, largest_3d, pixels kept of _volume(): 1 + 4 + 9 + 4 in the main region, 5 in the island)
CHAIN = [
    (0, False, 23),
    (2, False, 22),  # per slice: the lone diagonal pixel goes
    (5, False, 9 + 5),  # ... and the 2x2 blobs (4 px); the 5-px island stays
    (0, True, 18),  # the whole main region, island gone
    (2, True, 17),
    (5, True, 9),  # what is left of the main region (3x3) beats the island (5)
]


@pytest.mark.parametrize(("min_area", "largest", "expected"), CHAIN)
def test_postprocess_case_applies_the_configured_chain(min_area, largest, expected):
    from lggseg.config import PostprocessConfig
    from lggseg.evaluation.postprocess import postprocess_case

    cfg = PostprocessConfig(min_area=min_area, largest_3d=largest)
    assert postprocess_case(_volume(), cfg).sum() == expected


# (postprocess settings, whether evaluation reports a `postprocessed` block)
ENABLED = [
    ({"min_area": 0}, False),  # nothing to do: the chain above keeps all 23 pixels
    ({"min_area": 0, "largest_3d": True}, True),
    ({"min_area": 1}, True),  # removes nothing on any mask, but it is a configured step
    ({}, True),  # the default: min_area derived from loss.i, 7 * 7 = 49
]


@pytest.mark.parametrize(("settings", "expected"), ENABLED)
def test_enabled(settings, expected):
    from lggseg.config import PostprocessConfig
    from lggseg.evaluation.postprocess import enabled

    assert enabled(PostprocessConfig(**settings)) is expected
