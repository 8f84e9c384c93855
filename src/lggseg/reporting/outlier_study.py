"""What the outlier-region loss does, on synthetic inputs (paper section 4.3 and Figure 9).

Two experiments, both on the implementation in :mod:`lggseg.losses`:

* **Figure 9.** :func:`figure9_image` builds the paper's 100x100 test image (five white areas:
  1 a full 7x7 block, exactly the noise size; 2 a sparse lattice of 9 pixels in a 7x7 box, the lowest
  density; 3 a plus sign and 4 an L shape, other shapes under 7x7; 5 a 28x28 square, a "normal"
  region). :func:`outlier_map` runs eq. 11 on it with the image as the prediction, and
  :func:`render_figure9` draws input and loss map side by side. The paper states that areas 1-4 get a
  loss value (area 2 the highest, area 1 lower with higher values on its edges) and area 5 none.
  The map drawn is eq. 12's density part, ``-DensityMap``, on the pixels where it is non-zero; all other
  pixels have no outlier value.
* **Blob study** (:func:`blob_study`). A prediction holds the true region plus a small isolated
  false-positive blob; the target holds the true region only. Taking gradient steps on the logits
  themselves with one loss at a time shows the direction each loss pushes the blob: plain BCE, the
  paper's eq. 12 (soft and hard counts), its density part ``-DensityMap`` alone, and our
  ``isolated_bce``.

:func:`run_figure9` runs both and writes the PNGs and a JSON summary (stage ``figure9``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lggseg.config import LossConfig
from lggseg.io import atomic_path, write_json
from lggseg.losses import bce_loss, density_map, isolated_bce_loss, outlier_loss, outlier_parts

FIGURE9_SIZE = 100
FIGURE9_I, FIGURE9_J = 7, 21  # the paper's Figure 9 settings, whatever params.yaml says

# (row, col) of each area's top-left corner; every small area is > (j-1)/2 = 10 pixels from any other
# white pixel, so each is judged on its own, as in the paper's figure.
_AREA_ORIGINS = {1: (14, 8), 2: (14, 32), 3: (14, 56), 4: (14, 80), 5: (50, 36)}


def _area_shapes() -> dict[int, np.ndarray]:
    full = np.ones((7, 7), dtype=bool)
    sparse = np.zeros((7, 7), dtype=bool)
    sparse[::3, ::3] = True  # 9 single pixels on a 3-pixel lattice
    plus = np.zeros((7, 7), dtype=bool)
    plus[2:5, :] = True
    plus[:, 2:5] = True  # arms 3 wide, 33 pixels
    ell = np.zeros((6, 6), dtype=bool)
    ell[:, :2] = True
    ell[-2:, :] = True  # 20 pixels
    return {1: full, 2: sparse, 3: plus, 4: ell, 5: np.ones((28, 28), dtype=bool)}


def figure9_areas() -> np.ndarray:
    """Label image ``(100, 100)`` int: 0 background, 1-5 the areas of Figure 9."""
    labels = np.zeros((FIGURE9_SIZE, FIGURE9_SIZE), dtype=np.int64)
    for area, shape in _area_shapes().items():
        r, c = _AREA_ORIGINS[area]
        h, w = shape.shape
        labels[r : r + h, c : c + w][shape] = area
    return labels


def figure9_image() -> np.ndarray:
    """The 100x100 test image of section 4.3 as float32 in {0, 1} (1 = white = predicted foreground)."""
    return (figure9_areas() > 0).astype(np.float32)


def _as_batch(image: np.ndarray) -> Tensor:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"outlier_map: expected a 2-D image, got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError("outlier_map: image values must be probabilities in [0, 1]")
    return torch.from_numpy(arr.copy())[None, None]


def outlier_map(image: np.ndarray, cfg: LossConfig) -> np.ndarray:
    """DensityMap of eq. 11 for ``image`` taken as the predicted probabilities X (``(H, W)`` in [0, 1]).

    Eq. 12's per-pixel outlier value is ``BCE - DensityMap``; pixels where this map is 0 get no
    outlier value.
    """
    with torch.no_grad():
        return outlier_parts(_as_batch(image), cfg).density_map[0, 0].numpy()


def figure9_config(cfg: LossConfig) -> LossConfig:
    """``cfg`` with the paper's Figure 9 windows (i = 7, j = 21)."""
    return dataclasses.replace(cfg, i=FIGURE9_I, j=FIGURE9_J)


def figure9_summary(cfg: LossConfig) -> dict[str, Any]:
    """Per-area statistics of the Figure 9 DensityMap (JSON-able)."""
    cfg = figure9_config(cfg)
    labels = figure9_areas()
    dmap = outlier_map(figure9_image(), cfg)
    areas: dict[str, Any] = {}
    for area in range(1, 6):
        vals = dmap[labels == area]
        hit = vals[vals > 0]
        areas[f"area{area}"] = {
            "pixels": int(vals.size),
            "pixels_with_value": int(hit.size),
            "density_min": float(hit.min()) if hit.size else 0.0,
            "density_max": float(hit.max()) if hit.size else 0.0,
            "density_mean": float(hit.mean()) if hit.size else 0.0,
        }
    return {
        "i": cfg.i,
        "j": cfg.j,
        "threshold": cfg.threshold,
        "smooth": cfg.smooth,
        "areas": areas,
        "background_pixels_with_value": int((dmap[labels == 0] > 0).sum()),
    }


def render_figure9(path: str | Path, cfg: LossConfig) -> Path:
    """Draw the Figure 9 input and its outlier map (``-DensityMap``) side by side to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = figure9_config(cfg)
    image = figure9_image()
    labels = figure9_areas()
    dmap = outlier_map(image, cfg)
    value = np.ma.masked_where(dmap <= 0, -dmap)

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 5.4), constrained_layout=True)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("Input: prediction X (white = 1)")
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#27408b")
    im = axes[1].imshow(value, cmap=cmap, interpolation="nearest")
    axes[1].set_title(
        f"Outlier value -DensityMap (eq. 11-12), i={cfg.i}, j={cfg.j}, T={cfg.threshold}\n"
        "lighter = higher loss; blue = no outlier value (mask 0)",
        fontsize=10,
    )
    # Outline area 5, which gets no value, so that it is still visible on the right.
    axes[1].contour(labels == 5, levels=[0.5], colors="#ff9f1c", linewidths=0.8, linestyles="--")
    cbar = fig.colorbar(im, ax=axes[1], shrink=0.85)
    cbar.set_label("-DensityMap")
    for area in range(1, 6):
        rows, cols = np.nonzero(labels == area)
        r, c = rows.min(), cols.mean()
        for ax in axes:
            ax.text(
                c,
                r - 2.5,
                str(area),
                color="#ff9f1c",
                fontsize=13,
                fontweight="bold",
                ha="center",
                va="bottom",
            )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- blob study

STUDY_SIZE = 64
_REGION = (slice(8, 32), slice(8, 32))  # 24x24 true region
_BLOB = (slice(46, 50), slice(46, 50))  # 4x4 false positive, 14 pixels from the region
_NEAR = (slice(36, 60), slice(36, 60))  # the blob and 10 pixels (j=21's reach) around it
_START_LOGIT = 4.0  # p = 0.982 inside, 0.018 outside: a confident, "essentially stable" prediction


def _study_tensors() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    target = torch.zeros(1, 1, STUDY_SIZE, STUDY_SIZE)
    target[0, 0][_REGION] = 1.0
    pred = target.clone()
    pred[0, 0][_BLOB] = 1.0
    logits = (pred * 2 - 1) * _START_LOGIT
    blob = torch.zeros_like(target, dtype=torch.bool)
    blob[0, 0][_BLOB] = True
    near = torch.zeros_like(blob)
    near[0, 0][_NEAR] = True
    return logits, target, blob, near, target.bool()


def _study_losses(cfg: LossConfig) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    paper = dataclasses.replace(cfg, outlier_mode="paper", counts="soft")
    paper_hard = dataclasses.replace(paper, counts="hard")
    iso = dataclasses.replace(cfg, outlier_mode="isolated_bce")

    def density_only(logits: Tensor, target: Tensor) -> Tensor:
        dmap = density_map(logits, paper)
        return -(dmap.mean() if paper.reduction == "mean" else dmap.flatten(1).sum(1).mean())

    return {
        "bce": bce_loss,
        "outlier_paper_soft": lambda lg, t: outlier_loss(lg, t, paper),
        "outlier_paper_hard": lambda lg, t: outlier_loss(lg, t, paper_hard),
        "density_only_soft": density_only,
        "isolated_bce": lambda lg, t: isolated_bce_loss(lg, t, iso),
    }


def _snapshot(logits: Tensor, blob: Tensor, near: Tensor, region: Tensor) -> dict[str, float]:
    prob = torch.sigmoid(logits.detach())
    return {
        "blob_mean_prob": float(prob[blob].mean()),
        "near_blob_mass": float(prob[near].sum()),  # soft predicted area around and in the blob
        "near_blob_area": int((prob[near] > 0.5).sum()),  # pixels predicted white there
        "region_mean_prob": float(prob[region].mean()),
        "far_background_mean_prob": float(prob[~(near | region)].mean()),
    }


def _optimise(
    loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: str, steps: int, lr: float
) -> tuple[list[dict[str, float]], Tensor]:
    logits0, target, blob, near, region = _study_tensors()
    logits = logits0.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=lr) if optimizer == "sgd" else torch.optim.Adam([logits], lr=lr)
    history = [_snapshot(logits, blob, near, region)]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(logits, target).backward()
        opt.step()
        history.append(_snapshot(logits, blob, near, region))
    return history, torch.sigmoid(logits.detach())[0, 0]


def blob_study(
    cfg: LossConfig, steps: int = 50, sgd_lr: float | None = None, adam_lr: float = 0.1, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run each loss alone on the blob set-up with SGD and with Adam on the logits.

    SGD's learning rate defaults to ``H * W`` so that a mean-reduced loss moves each logit by its
    per-pixel gradient (BCE: ``sigmoid(logit) - target`` per step). Returns ``(summary, curves)``:
    a JSON-able summary with the numbers before, after the first step (``after_one_step``: the
    direction and size of one gradient step) and after the last, and a verdict per run; and the
    per-step histories and final probability maps for :func:`render_blob_study`.
    """
    if steps < 1:
        raise ValueError(f"blob_study: steps must be >= 1, got {steps}")
    lrs = {"sgd": float(sgd_lr if sgd_lr is not None else STUDY_SIZE * STUDY_SIZE), "adam": float(adam_lr)}
    losses = _study_losses(cfg)
    summary: dict[str, Any] = {
        "setup": {
            "image": [STUDY_SIZE, STUDY_SIZE],
            "true_region_pixels": 24 * 24,
            "blob_pixels": 16,
            "blob_gap_to_region_px": 14,
            "near_blob_box_pixels": 24 * 24,  # the blob dilated by 10 pixels, where near_blob_* is measured
            "start_logit": _START_LOGIT,
            "steps": steps,
            "lr": lrs,
            "i": cfg.i,
            "j": cfg.j,
            "threshold": cfg.threshold,
            "reduction": cfg.reduction,
        }
    }
    curves: dict[str, Any] = {"history": {}, "final": {}}
    runs = [(opt, name) for opt in lrs for name in losses]
    threads = torch.get_num_threads()
    # 64x64 tensors: intra-op threads only add synchronisation, which costs ~100x on a busy machine.
    torch.set_num_threads(1)
    try:
        results = [
            _optimise(losses[name], opt, steps, lrs[opt])
            for opt, name in tqdm(runs, desc="blob study", disable=not progress)
        ]
    finally:
        torch.set_num_threads(threads)
    for (opt, name), (history, final) in zip(runs, results, strict=True):
        before, after = history[0], history[-1]
        change = after["near_blob_mass"] - before["near_blob_mass"]
        verdict = "shrinks" if change < -1e-6 else "grows" if change > 1e-6 else "unchanged"
        summary.setdefault(opt, {})[name] = {
            "before": before,
            "after_one_step": history[1],
            "after": after,
            "near_blob_mass_change": change,
            "verdict": verdict,
        }
        curves["history"].setdefault(opt, {})[name] = history
        curves["final"].setdefault(opt, {})[name] = final.numpy()
    return summary, curves


def render_blob_study(path: str | Path, curves: dict[str, Any]) -> Path:
    """Blob probability and nearby predicted mass per step (SGD, Adam), and the maps after Adam."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves["history"]["sgd"])
    # Several losses coincide (eq. 12 is BCE plus a tiny density term), so vary the dashes too.
    styles = ["-", "--", ":", "-", "-."]
    fig = plt.figure(figsize=(13, 10.5), constrained_layout=True)
    grid = fig.add_gridspec(3, len(names), height_ratios=[1, 1, 0.9])
    half = len(names) // 2
    metrics = [
        ("blob_mean_prob", "mean p on the 4x4 blob", "linear"),
        ("near_blob_mass", "sum of p, blob + 10 px", "log"),
    ]
    for row, (key, label, scale) in enumerate(metrics):
        for col, opt in enumerate(("sgd", "adam")):
            ax = fig.add_subplot(grid[row, :half] if col == 0 else grid[row, half:])
            for n, name in enumerate(names):
                ys = [h[key] for h in curves["history"][opt][name]]
                ax.plot(range(len(ys)), ys, label=name, linewidth=2.2, linestyle=styles[n % len(styles)])
            ax.set_yscale(scale)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(f"{opt.upper()} on the logits: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=9)
    for col, name in enumerate(names):
        ax = fig.add_subplot(grid[2, col])
        im = ax.imshow(curves["final"]["adam"][name], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: p after Adam", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        "Blob study, one loss at a time: target = 24x24 region (top left); prediction adds a 4x4 false blob (bottom right)"
    )
    return _save(fig, path)


def run_figure9(
    cfg: LossConfig, plot: str | Path, study: str | Path | None = None, study_plot: str | Path | None = None
) -> dict[str, Any]:
    """Stage ``figure9``: draw Figure 9, run the blob study, write the JSON summary."""
    render_figure9(plot, cfg)
    result: dict[str, Any] = {"figure9": figure9_summary(cfg)}
    if study is not None or study_plot is not None:
        summary, curves = blob_study(cfg)
        result["blob_study"] = summary
        if study_plot is not None:
            render_blob_study(study_plot, curves)
    if study is not None:
        write_json(study, result)
    return result
