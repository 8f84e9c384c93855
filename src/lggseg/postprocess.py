"""Inference-time post-processing: drop predicted regions too small to be tumour.

The paper suppresses noise-like regions smaller than ``7 x 7`` pixels during training with the
outlier-region loss (section 3.4.3; section 4.1.3 found only six such regions among the 3929
ground-truth masks). Removing them after thresholding is the cheap baseline that loss has to
beat, so the evaluation reports every metric with and without it (``postprocess.min_area``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lggseg.metrics import components


def remove_small_components(mask: Any, min_area: int, connectivity: int = 8) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_area`` pixels.

    ``connectivity`` is 4 or 8 (scipy.ndimage.label neighbourhoods). ``min_area`` 0 (or 1) keeps
    everything. Returns a new boolean array; the input is not modified.
    """
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise ValueError(f"min_area must be a non-negative integer, got {min_area!r}")
    labels, areas = components(mask, connectivity)
    if min_area <= 1 or areas.size == 0:
        return labels > 0
    keep = np.concatenate([[False], areas >= min_area])
    return keep[labels]
