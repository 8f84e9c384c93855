"""Inference-time post-processing: drop predicted regions too small to be tumour.

The paper suppresses noise-like regions smaller than ``7 x 7`` pixels during training with the
outlier-region loss (section 3.4.3; section 4.1.3 found only six such regions among the 3929
ground-truth masks). Removing them after thresholding is the cheap baseline that loss has to
beat, so the evaluation reports every metric with and without it (``postprocess.min_area``).

Beyond the paper, :func:`keep_largest_3d` keeps only the largest connected region of a whole case
(its slices stacked in slice order): an LGG is one mass, so a predicted island on a slice far from
it is a false positive (nnU-Net chooses the same step on validation data when it helps). It is off
by default (``postprocess.largest_3d``); :func:`postprocess_case` applies the configured chain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lggseg.config import PostprocessConfig
from lggseg.evaluation.metrics import components


def remove_small_components(mask: Any, min_area: int, connectivity: int = 8) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_area`` pixels.

    Args:
        mask: bool or integer 2D mask ``(H, W)`` (nonzero = foreground).
        min_area: smallest area kept, >= 0; 0 or 1 keeps everything.
        connectivity: 4 or 8 (scipy.ndimage.label neighbourhoods).

    Returns:
        a new bool ``(H, W)``; an empty mask stays empty. The input is not modified.
    """
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise ValueError(f"min_area must be a non-negative integer, got {min_area!r}")
    labels, areas = components(mask, connectivity)
    if min_area <= 1 or areas.size == 0:
        return labels > 0
    keep = np.concatenate([[False], areas >= min_area])
    return keep[labels]


def keep_largest_3d(volume: Any) -> np.ndarray:
    """The largest 3D connected component of one case.

    Voxels connect across faces, edges and corners (the 26-neighbourhood), so a region touching its
    neighbour slice diagonally stays one region. Ties keep the component labelled first.

    Args:
        volume: ``(D, H, W)`` mask (nonzero = foreground), the case's slices in slice order.

    Returns:
        a new bool ``(D, H, W)``; an empty volume stays empty. The input is not modified.
    """
    from scipy import ndimage

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"keep_largest_3d expects a (slices, H, W) volume, got shape {vol.shape}")
    vol = vol.astype(bool, copy=False)
    labels, n = ndimage.label(vol, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return vol.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def postprocess_case(masks: Any, cfg: PostprocessConfig) -> np.ndarray:
    """``cfg`` applied to one case.

    First components under ``cfg.min_area`` pixels are removed slice by slice (``cfg.connectivity``),
    then, with ``cfg.largest_3d``, only the largest 3D region of the case is kept. A lone slice of
    unknown position is a case of one slice (the 3D step then keeps its largest 2D region).

    Args:
        masks: ``(D, H, W)`` mask (nonzero = foreground), the case's slices in slice order; ``D`` may be 0.
        cfg: ``min_area``, ``connectivity``, ``largest_3d``.

    Returns:
        a new bool ``(D, H, W)``; empty slices stay empty.
    """
    vol = np.asarray(masks).astype(bool, copy=False)
    if vol.ndim != 3:
        raise ValueError(f"postprocess_case expects a (slices, H, W) stack, got shape {vol.shape}")
    if cfg.min_area > 0:
        vol = np.stack([remove_small_components(m, cfg.min_area, cfg.connectivity) for m in vol]) if len(vol) else vol
    return keep_largest_3d(vol) if cfg.largest_3d else vol.copy()


def enabled(cfg: PostprocessConfig) -> bool:
    """Whether ``cfg`` changes anything (else evaluation reports no ``postprocessed`` block)."""
    return cfg.min_area > 0 or cfg.largest_3d
