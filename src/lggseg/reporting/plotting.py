"""Figures of the report: contour overlays (paper Figs. 7 and 8), dataset and Dice summaries.

The paper draws segmentations as a red ground-truth contour and a green predicted contour over
the MRI slice (Figs. 7 and 8, section 4.2) and shows the predicted probability as a heatmap
(Fig. 7). :func:`overlay` is the one place that draws those contours; ``lggseg predict`` reuses it.
The other functions take plain arrays and numbers (no file parsing: that is ``lggseg.reporting.report``'s
job) and write one PNG each, atomically.

Figures are drawn on :class:`matplotlib.figure.Figure` objects rather than through ``pyplot``, so
no GUI backend or global figure state is involved (the Agg canvas renders the PNG).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from scipy import ndimage

from lggseg.evaluation.metrics import components, dice
from lggseg.io import atomic_path

TRUTH_RGB = (255, 0, 0)
PRED_RGB = (0, 255, 0)
FLAIR_CHANNEL = 1  # Kaggle slices are (pre-contrast, FLAIR, post-contrast) stored as RGB
_CROSS = ndimage.generate_binary_structure(2, 1)


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Inner boundary band of a binary mask, ``thickness`` pixels wide (pixels touching the outside).

    A pixel is on the contour when it belongs to the mask but not to its erosion by a 4-connected
    cross, so the band lies inside the region and a 1-pixel region is all contour. Outside the
    image counts as background: a region cut by the image edge is outlined along it.
    """
    if thickness < 1:
        raise ValueError(f"contour thickness must be >= 1, got {thickness}")
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"contour expects a 2-D mask, got shape {mask.shape}")
    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, structure=_CROSS, iterations=thickness, border_value=0)
    return mask & ~eroded


def overlay(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    thickness: int = 1,
) -> np.ndarray:
    """The slice as uint8 RGB with a red ground-truth contour and a green predicted contour.

    ``image`` is uint8 ``(H, W)`` or ``(H, W, 3)``; ``truth``/``pred`` are ``(H, W)`` masks (bool or
    {0, 1}/{0, 255}) or ``None`` to leave one out. Where the contours coincide the prediction (green)
    is drawn on top, as in the paper's figures.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"overlay expects a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"overlay expects an (H, W) or (H, W, 3) image, got shape {img.shape}")
    out = img.copy()
    for mask, colour in ((truth, TRUTH_RGB), (pred, PRED_RGB)):
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"overlay: mask shape {mask.shape} does not match image shape {img.shape[:2]}")
        out[contour(mask > 0, thickness)] = colour
    return out


def save_figure(fig: Figure, dest: str | Path, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG at ``dest`` atomically, as a 256-colour palette image.

    The report's PNGs are committed to git (``cache: false`` in dvc.yaml); an MRI grid saved as
    true colour takes several MB, the adaptive palette a fraction of that with no visible loss
    (the figures hold grey levels, two contour colours and one colour map).
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    buf.seek(0)
    with Image.open(buf) as img:
        pal = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_path(dest, suffix=".png") as tmp:
        pal.save(tmp, format="PNG", optimize=True)
    return Path(dest)


def _suptitle(fig: Figure, title: str, note: str) -> None:
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize=13, fontweight="bold")


def _contour_legend(fig: Figure) -> None:
    handles = [
        Line2D([], [], color="red", lw=2.5, label="ground truth"),
        Line2D([], [], color="lime", lw=2.5, label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=10, bbox_to_anchor=(0.5, 0.0))


def _caption(ax, text: str) -> None:
    ax.text(
        0.02, 0.03, text, transform=ax.transAxes, fontsize=8, color="white", va="bottom", ha="left",
        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"},
    )


def _check_slices(ids: Sequence[str], images: np.ndarray, truth: np.ndarray) -> None:
    if len(ids) == 0:
        raise ValueError("no figure slices to draw")
    if len(images) != len(ids) or len(truth) != len(ids):
        raise ValueError(f"{len(ids)} slice ids but {len(images)} images and {len(truth)} masks")


def _background(image: np.ndarray, channel: int | None) -> np.ndarray:
    """One channel as grey, or the slice as stored when ``channel`` is None.

    Shown as stored, a FLAIR-bright tumour is green (FLAIR is the green channel), which hides the
    green prediction contour; the grey FLAIR channel keeps both contours visible.
    """
    return image if channel is None or image.ndim == 2 else image[..., channel]


def plot_loss_comparison(
    ids: Sequence[str],
    images: np.ndarray,
    truth: np.ndarray,
    models: Sequence[tuple[str, np.ndarray]],
    threshold: float,
    dest: str | Path,
    note: str = "",
    thickness: int = 2,
    connectivity: int = 8,
    channel: int | None = FLAIR_CHANNEL,
) -> Path:
    """Paper Fig. 7: per model a segmentation column (contours) and a probability-heatmap column.

    ``models`` is ``[(label, prob (K, H, W) in [0, 1]), ...]``; rows are the K slices. Each
    segmentation panel is captioned with that slice's Dice and its number of predicted components
    (the noise the outlier loss is meant to remove).
    """
    _check_slices(ids, images, truth)
    k, n = len(ids), len(models)
    fig = Figure(figsize=(2.6 * 2 * n + 0.8, 2.6 * k + 1.3))
    axes = fig.subplots(k, 2 * n, squeeze=False)
    heat = None
    for m, (label, prob) in enumerate(models):
        prob = np.asarray(prob, dtype=np.float32)
        if prob.shape[0] != k:
            raise ValueError(f"{label}: {prob.shape[0]} probability maps for {k} slices")
        for r in range(k):
            pred = prob[r] > threshold  # same rule as lggseg.evaluation.evaluate
            seg_ax, heat_ax = axes[r, 2 * m], axes[r, 2 * m + 1]
            seg_ax.imshow(overlay(_background(images[r], channel), truth[r], pred, thickness))
            _caption(seg_ax, f"Dice {dice(pred, truth[r] > 0):.3f} | {components(pred, connectivity)[1].size} comp.")
            # Darker = more confident tumour, as in the paper's heatmaps.
            heat = heat_ax.imshow(prob[r], cmap="magma_r", vmin=0.0, vmax=1.0, interpolation="nearest")
            if r == 0:
                seg_ax.set_title(f"{label}\nsegmentation", fontsize=10)
                heat_ax.set_title(f"{label}\nprobability", fontsize=10)
        for ax in axes[:, 2 * m : 2 * m + 2].ravel():
            ax.set_xticks([])
            ax.set_yticks([])
    for r, sid in enumerate(ids):
        axes[r, 0].set_ylabel(sid, fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.9, top=1 - 1.0 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        wspace=0.04, hspace=0.06)
    cax = fig.add_axes((0.92, 0.25, 0.015, 0.5))
    cbar = fig.colorbar(heat, cax=cax)
    cbar.set_label("predicted tumour probability")
    _suptitle(fig, "Loss comparison on test slices (cf. paper Fig. 7)", note)
    _contour_legend(fig)
    return save_figure(fig, dest)


def plot_encoder_grid(
    ids: Sequence[str],
    images: np.ndarray,
    truth: np.ndarray,
    models: Sequence[tuple[str, np.ndarray]],
    dest: str | Path,
    note: str = "",
    thickness: int = 2,
    channel: int | None = FLAIR_CHANNEL,
) -> Path:
    """Paper Fig. 8: rows = slices, first column the ground truth alone, then one column per model.

    ``models`` is ``[(label, pred mask (K, H, W)), ...]``; each panel is captioned with its Dice.
    """
    _check_slices(ids, images, truth)
    k, n = len(ids), len(models)
    fig = Figure(figsize=(2.1 * (n + 1), 2.1 * k + 1.4))
    axes = fig.subplots(k, n + 1, squeeze=False)
    for r in range(k):
        axes[r, 0].imshow(overlay(_background(images[r], channel), truth[r], None, thickness))
        axes[r, 0].set_ylabel(ids[r], fontsize=8)
        _caption(axes[r, 0], f"{int(np.count_nonzero(truth[r]))} px tumour")
    axes[0, 0].set_title("ground truth" + (" (FLAIR)" if channel == FLAIR_CHANNEL else ""), fontsize=10)
    for m, (label, pred) in enumerate(models):
        pred = np.asarray(pred).astype(bool)
        if pred.shape[0] != k:
            raise ValueError(f"{label}: {pred.shape[0]} masks for {k} slices")
        axes[0, m + 1].set_title(label, fontsize=10)
        for r in range(k):
            axes[r, m + 1].imshow(overlay(_background(images[r], channel), truth[r], pred[r], thickness))
            _caption(axes[r, m + 1], f"Dice {dice(pred[r], truth[r] > 0):.3f}")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.04, right=0.99, top=1 - 1.0 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        wspace=0.03, hspace=0.05)
    _suptitle(fig, "Segmentations by encoder on test slices (cf. paper Fig. 8)", note)
    _contour_legend(fig)
    return save_figure(fig, dest)


def plot_component_sizes(
    areas: dict[str, np.ndarray],
    below: dict[str, str],
    dest: str | Path,
    side: int,
    note: str = "",
) -> Path:
    """Histogram of ground-truth component areas on a log axis, one step line per convention.

    ``areas`` maps a convention label (e.g. ``"8-connected"``) to its component areas in pixels;
    ``below`` maps the same label to the legend text saying how many are smaller than ``side x side``
    (``evaluate.noise_side``; the paper's 7x7, section 4.1.3).
    """
    if not areas:
        raise ValueError("no component areas to plot")
    every = np.concatenate([np.asarray(a, dtype=float) for a in areas.values()])
    if every.size == 0 or (every <= 0).any():
        raise ValueError("component areas must be positive and non-empty")
    bins = np.logspace(0, np.log10(every.max()) + 0.05, 40)
    fig = Figure(figsize=(8.5, 5.0))
    ax = fig.subplots()
    min_area = side * side
    ax.axvspan(bins[0], min_area, color="0.85", zorder=0, label=f"smaller than {side}x{side} = {min_area} px")
    for label, a in areas.items():
        ax.hist(np.asarray(a, float), bins=bins, histtype="step", lw=2, label=f"{label}: {len(a)} components:\n{below[label]}")
    ax.axvline(min_area, color="black", ls="--", lw=1.5)
    ax.set_xscale("log")
    # Log counts: the few small regions the paper talks about would be invisible on a linear axis.
    ax.set_yscale("log")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("ground-truth component area (pixels, log scale)")
    ax.set_ylabel("number of components (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    ax.set_title("Sizes of ground-truth tumour regions (connected components of the masks)" + (f"\n{note}" if note else ""))
    return save_figure(fig, dest)


@dataclass(frozen=True)
class DiceBar:
    """One variant of the Dice bar chart: values in percent, CIs as ``(lo, hi)`` or ``None``."""

    label: str
    slice_mean: float
    slice_ci: tuple[float, float] | None
    patient_3d: float
    patient_ci: tuple[float, float] | None
    paper: float | None = None


def plot_dice_by_variant(bars: Sequence[DiceBar], dest: str | Path, note: str = "") -> Path:
    """Horizontal bars of test Dice per variant (slice-mean and patient-3D) with 95% bootstrap CIs.

    The paper's DSC for the matching table row is marked with a black diamond. The Dice axis is
    cut a little below the lowest CI so that differences of a point or two stay visible; the axis
    label says where it starts.
    """
    if not bars:
        raise ValueError("no variants to plot")
    n = len(bars)
    y = np.arange(n)[::-1].astype(float)
    h = 0.38
    fig = Figure(figsize=(10.0, 1.0 + 0.62 * n + 0.8))
    ax = fig.subplots()
    lows = []
    for offset, attr, ci_attr, colour, name in (
        (h / 2, "slice_mean", "slice_ci", "tab:blue", "slice-mean Dice"),
        (-h / 2, "patient_3d", "patient_ci", "tab:orange", "patient-3D Dice"),
    ):
        vals = np.array([getattr(b, attr) for b in bars])
        err = np.zeros((2, n))
        for i, b in enumerate(bars):
            ci = getattr(b, ci_attr)
            if ci is not None:
                err[:, i] = (max(vals[i] - ci[0], 0.0), max(ci[1] - vals[i], 0.0))
                lows.append(ci[0])
        lows.extend(vals.tolist())
        ax.barh(y + offset, vals, height=h, color=colour, alpha=0.85, label=f"ours: {name} (95% bootstrap CI)",
                xerr=err, error_kw={"ecolor": "black", "capsize": 3, "lw": 1})
        for yi, v, e in zip(y + offset, vals, err[1], strict=True):
            ax.text(v + e + 0.25, yi, f"{v:.2f}", va="center", ha="left", fontsize=8)
    paper = [(yi, b.paper) for yi, b in zip(y, bars, strict=True) if b.paper is not None]
    if paper:
        ax.scatter([p for _, p in paper], [yi for yi, _ in paper], marker="D", color="black", zorder=5, s=30,
                   label="paper DSC (Wan et al. 2023)")
        lows.extend(p for _, p in paper)
    lo = max(0.0, float(np.floor(min(lows) / 5.0) * 5.0 - 5.0))
    ax.set_xlim(lo, 101.0)
    ax.set_yticks(y)
    ax.set_yticklabels([b.label for b in bars], fontsize=9)
    ax.set_xlabel(f"test Dice (%)  [axis starts at {lo:.0f}%]")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
    ax.set_title("Test Dice by training variant" + (f" - {note}" if note else ""), pad=28)
    return save_figure(fig, dest)


def plot_validation_curves(
    panels: dict[str, Sequence[tuple[str, Sequence[float]]]],
    dest: str | Path,
    last: int,
    tolerance: float,
    note: str = "",
) -> Path:
    """Validation Dice per epoch, one panel per paper table, one line per run (variant and seed).

    ``panels`` maps a panel title to ``[(run label, Dice per epoch in [0, 1]), ...]``. A run whose last
    ``last`` epochs lie within ``tolerance`` (the levelling-off criterion of
    :mod:`lggseg.reporting.paired`) is drawn solid, any other dashed, so an undertrained table shows at a
    glance. An empty ``panels`` draws one panel that says no curve was recorded.
    """
    titles = list(panels) or ["no validation curve recorded"]
    # constrained layout: the legends under the panels and the two-line titles would overlap otherwise
    cols = min(2, len(titles))
    rows = -(-len(titles) // cols)
    fig = Figure(figsize=(6.6 * cols, 6.0 * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in grid[len(titles):]:
        ax.set_visible(False)
    for ax, title in zip(grid, titles, strict=False):
        runs = panels.get(title, [])
        for label, curve in runs:
            y = 100 * np.asarray(curve, dtype=float)
            tail = y[-last:]
            flat = len(y) >= last and (tail.max() - tail.min()) <= 100 * tolerance + 1e-7
            ax.plot(np.arange(1, len(y) + 1), y, marker="o", ms=3, lw=1.6, ls="-" if flat else "--",
                    label=f"{label} ({'levelled' if flat else 'not levelled'})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice (%)")
        ax.grid(alpha=0.3)
        if runs:
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
        else:
            ax.text(0.5, 0.5, "no validation curve recorded", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Validation Dice per epoch (solid: the last {last} epochs within {100 * tolerance:g} Dice point(s))"
                 + (f"\n{note}" if note else ""), fontsize=11)
    return save_figure(fig, dest)
