"""Training losses of Wan et al. 2023, section 3.4: BCE (eq. 2), Dice (eq. 3), the density-based
outlier-region loss (eqs. 4-12) and their weighted sum (eq. 13), plus ``isolated_bce``, our variant of
the outlier term.

Every loss takes logits ``(B, 1, H, W)`` and a target ``(B, 1, H, W)`` in {0, 1}; probabilities are
``X = sigmoid(logits)``. Losses are computed in float32 whatever the autocast dtype of the logits.

BCE and Dice
------------
* **BCE** (eq. 2) is ``F.binary_cross_entropy_with_logits`` (log-sum-exp form, finite for any
  logit), averaged over all pixels of the batch.
* **Dice** (eq. 3) is the soft Dice ``1 - (2 sum(X*Y) + smooth) / (sum(X) + sum(Y) + smooth)`` on
  probabilities, with the sums taken over the **whole batch** (as smp's ``DiceLoss`` does in binary
  mode). Per-image Dice (``per_sample=True``) is available but not used: about two thirds of the
  LGG slices (2556 of 3929) have an empty mask, and on such a slice per-image Dice stays near 1 until the summed probability
  falls well below ``smooth``, so it would dominate training with a push towards exact zeros.
  Empty masks: an empty target and an empty prediction give ``1 - smooth/smooth = 0``; an empty target
  with predicted mass ``m`` gives ``m / (m + smooth)``.

Box counts
----------
``box_sum(x, k)`` sums ``x`` over the ``k x k`` window centred on every pixel in O(1) per pixel:
two separable running sums (``cumsum`` then a difference ``k`` apart), done in float64 so that the
cancellation of large prefix sums loses nothing (counts of 0/1 images are exact), then cast back.
Pixels outside the image contribute 0. It is plain autograd (cumsum, pad, slicing), device agnostic.

The outlier-region loss (eqs. 4-12): how we read the ambiguous points
--------------------------------------------------------------------
For every pixel ``O``, ``N_k`` is the ``k x k`` window centred on ``O`` (``i < j``, both odd).
``CountWhite(N_k)`` is the white mass in the window, ``CountGapWhite = CountWhite(N_j) -
CountWhite(N_i)`` the white mass in the ring between the two windows (eq. 4), likewise for black
(eq. 5). ``DensityWhite = (CountWhite(N_i) + smooth) / (CountGapBlack + smooth)`` (eq. 6),
``DensityBlack = (CountBlack(N_i) + smooth) / (CountGapWhite + smooth)`` (eq. 7). The printed text
leaves six points open; we settle them as follows.

(a) **Soft or hard counts** (``loss.counts``). The text says X is the sigmoid output in (0, 1), so
    the literal reading counts *probability mass*: ``CountWhite(N_k) = sum of X over N_k`` and
    ``CountBlack(N_k) = sum of (1 - X)``. This is our default (``soft``) and the only way any gradient
    flows through the density; the masks of eqs. 9-10 threshold the same soft counts. ``hard``
    counts ``Round(X)`` instead; the density is then a constant and the outlier term's gradient is
    that of its BCE part alone. In both modes the thresholded masks and ``Round(X)`` are step
    functions and carry no gradient.
(b) **Threshold** (eq. 8, ``loss.threshold_rounding``). Printed as ``i^2 - Ceil(i/2)^2`` while the
    text calls Ceil "a round-down". ``ceil`` (default) gives 33 for i = 7 and is what Figure 5
    describes: with ``O1`` on the corner of an ``i x i`` noise square, ``N_i`` holds a
    ``ceil(i/2) x ceil(i/2)`` = 16-pixel quadrant of it, so the other 49 - 16 = 33 noise pixels
    lie in the ring - the boundary case. ``floor`` gives 49 - 9 = 40.
(c) **Which mask goes with which colour** (eqs. 9-11). Eq. 9 names its mask "MaskBlack" but
    thresholds ``CountGapWhite``; eq. 10 is "MaskBlack" of ``CountGapBlack``; eq. 11 uses
    ``MaskWhite`` and ``MaskBlack``. The text fixes the meaning: the threshold counts "points of the
    same color in the interval area", i.e. the white points between Figure 5's yellow and green
    lines when ``O`` is white. A white pixel of a small noise blob has at most ``Threshold`` white
    pixels in its ring (33 at the blob's corner ``O1``), while a white pixel on the border of a real
    object (``O2``) has about half the ring white (203 of 392 next to a straight edge). So we read eq. 9 as
    ``MaskWhite = 1[CountGapWhite <= Threshold]`` and pair it with ``DensityWhite``, and eq. 10 as
    ``MaskBlack = 1[CountGapBlack <= Threshold]`` paired with ``DensityBlack`` (small black holes).
    The opposite pairing, ``1[CountGapBlack <= T]`` for white pixels, would switch the term *off*
    on every noise blob (at least 359 of its 392 ring pixels are black) and on only inside large
    objects - the reverse of the stated purpose.
(d) **Image border**. Pixels outside the image count as **black** (background):
    ``CountWhite`` zero-pads, and ``CountBlack(N_k) = k^2 - CountWhite(N_k)``. MRI slices have
    background at their borders, and this keeps ``CountWhite + CountBlack = k^2`` everywhere, so a
    noise blob touching the border is judged like one in the middle. Consequence: a white region
    covering an image *corner* looks like the corner of a small blob when its in-image ring,
    ``((j+1)/2)^2 - ((i+1)/2)^2`` pixels, is at most ``Threshold`` (with ``ceil``: when
    ``j < 2 i``, e.g. i = 3, j = 5); the paper's i = 7, j = 21 (105 > 33) is safe. Counting outside
    as neither colour would instead flag the black background at every image corner under the same
    condition.
(e) **Sum or mean** (``loss.reduction``, applies to the outlier term only; BCE is always a mean
    and Dice a ratio). ``mean`` averages eq. 12's per-pixel map over all pixels of the batch;
    ``sum`` sums it over each image's pixels and averages over the batch, so it does not grow with
    the batch size. ``sum`` makes the term H*W times larger than ``mean``.
(f) **Round(X) in eq. 11** selects the density by the *predicted* colour of ``O``:
    ``Round(X) = 1[X > 0.5] = 1[logit > 0]`` (``torch.round`` sends 0.5 to 0); white pixels take
    ``DensityWhite * MaskWhite``, black ones ``DensityBlack * MaskBlack``.

Eq. 12 is then ``L_outlier = reduce(BCE(X, Y) - DensityMap(X))``. Read literally, the DensityMap
is >= 0 and non-zero only on pixels flagged as belonging to a small region, so those pixels get a
*lower* loss than every other pixel, and with soft counts the gradient of ``-DensityMap`` raises
the probability of every pixel in ``N_j`` of a flagged white pixel, i.e. it grows small blobs
rather than removing them. ``lggseg.reporting.outlier_study`` measures this; the paper's results may depend
on details of their code that the text does not give. We implement the formula as printed
(``outlier_mode: paper``).

``isolated_bce`` (ours, ``outlier_mode: isolated_bce``)
------------------------------------------------------
What the paper intends - extra loss on small isolated predicted regions - done with a loss whose
gradient points the right way. From the hard prediction ``P = 1[logit > 0]`` (no gradient needed
through the mask) a pixel is **isolated** when

* it is predicted white and its ``j x j`` window holds at most ``i*i`` predicted-white pixels, or
* it is predicted black and its ``j x j`` window holds at most ``i*i`` predicted-black pixels
  (outside the image counts as black, so the background at the border is never isolated).

So every pixel of a predicted blob of area <= i*i with no other foreground within ``(j-1)/2``
pixels is isolated, while no pixel of a square larger than ``i x i`` is (its corner pixel sees
``min(side, (j+1)/2)^2 > i*i`` pixels of it). Elongated regions narrower than ``i*i / ((j+1)/2)``
pixels (4 for i = 7, j = 21) are flagged at their tips; blobs closer than ``(j-1)/2`` pixels to other
foreground are not flagged (the window cannot tell them apart from the nearby region). The term is
the BCE against the label averaged over the isolated pixels (``mean``: over all isolated pixels of
the batch; ``sum``: summed per image, averaged over the batch), and 0 when none is isolated. With
``gamma = 1`` the isolated pixels as a group weigh as much as the whole image in the BCE term, so a
4x4 false-positive blob on a single 256x256 slice is pushed towards its label 65536 / 16 = 4096 times
harder than by the BCE term, and a true small lesion is pushed towards white just as hard. The term
stops acting on a pixel once its prediction flips (it is then no longer in a predicted small
region); BCE and Dice do the rest.

``CompoundLoss`` (eq. 13) sums ``alpha * BCE + beta * Dice + gamma_at(epoch) * Outlier`` over the
terms listed in ``loss.terms`` and returns the unweighted, detached term values alongside. The paper
adds the outlier term "once basic stability has been achieved" without numbers: :func:`gamma_at` keeps
it at 0 for a warm-up, then ramps it linearly to ``loss.gamma``, over epoch counts or over fractions of
the run's planned epochs (:func:`gamma_schedule`).

One module on purpose (over 450 lines): this docstring is the specification of eqs. 2-13 and of the
readings (a)-(f), and the functions below implement it term by term; split, the readings would sit
apart from the code they decide.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lggseg.config import LossConfig

__all__ = [
    "CompoundLoss",
    "full_gamma_epoch",
    "gamma_at",
    "gamma_schedule",
    "OutlierParts",
    "bce_loss",
    "bce_map",
    "box_sum",
    "density_map",
    "dice_loss",
    "isolated_bce_loss",
    "isolated_mask",
    "outlier_loss",
    "outlier_parts",
]


_EPS = 1e-6  # floor of denominators; only reached with smooth = 0


def _check_pair(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"losses: logits must have shape (B, 1, H, W), got {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(
            f"losses: target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}"
        )


def _check_window(k: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"box window {name} must be a positive odd integer, got {k!r}")


# --------------------------------------------------------------------------- BCE and Dice


def bce_map(logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel BCE of eq. 2 from logits (stable for any logit).

    Args:
        logits: ``(B, 1, H, W)``, any float dtype (computed in float32).
        target: ``(B, 1, H, W)`` in {0, 1}.

    Returns:
        float32 ``(B, 1, H, W)``.
    """
    _check_pair(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Eq. 2 averaged over every pixel of the batch.

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1} (empty masks need no special case).

    Returns:
        float32 scalar.
    """
    _check_pair(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0, per_sample: bool = False) -> Tensor:
    """Soft Dice loss of eq. 3 on ``sigmoid(logits)``.

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1}.
        smooth: added to numerator and denominator, >= 0.
        per_sample: one loss per image, averaged, instead of sums over the whole batch.

    Returns:
        float32 scalar in [0, 1]. Empty target and empty prediction give 0 (with ``smooth > 0``);
        an empty target with predicted mass ``m`` gives ``m / (m + smooth)``.
    """
    _check_pair(logits, target)
    if smooth < 0:
        raise ValueError(f"dice_loss: smooth must be >= 0, got {smooth}")
    prob = torch.sigmoid(logits.float())
    tgt = target.float()
    dims = (1, 2, 3) if per_sample else (0, 1, 2, 3)
    inter = (prob * tgt).sum(dims)
    denom = prob.sum(dims) + tgt.sum(dims)
    loss = 1.0 - (2.0 * inter + smooth) / (denom + smooth).clamp_min(_EPS)
    return loss.mean()


# --------------------------------------------------------------------------- box counts


def _box_sum_1d(x: Tensor, k: int, dim: int) -> Tensor:
    """Sum over a centred window of length k along ``dim`` (zeros outside), via one cumsum."""
    r = k // 2
    # One extra leading zero turns the inclusive cumsum into prefix sums P with P[0] = 0,
    # so window t is P[t + k] - P[t] whatever k is.
    prefix = torch.cumsum(F.pad(x, _pad_spec(x.dim(), dim, r + 1, r)), dim=dim)
    n = x.shape[dim]
    return prefix.narrow(dim, k, n) - prefix.narrow(dim, 0, n)


def _pad_spec(ndim: int, dim: int, before: int, after: int) -> list[int]:
    # F.pad lists (before, after) pairs starting from the last dimension.
    spec = [0, 0] * (ndim - dim)
    spec[-2], spec[-1] = before, after
    return spec


def box_sum(x: Tensor, k: int) -> Tensor:
    """Sum of ``x`` over the ``k x k`` window centred on each pixel.

    O(1) work per pixel for any odd ``k`` (separable running sums in float64); differentiable.

    Args:
        x: ``(B, C, H, W)``.
        k: window side, a positive odd integer.

    Returns:
        ``(B, C, H, W)`` in the dtype of ``x``; pixels outside the image count as 0.
    """
    _check_window(k)
    if x.dim() != 4:
        raise ValueError(f"box_sum: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if k == 1:
        return x.clone()
    acc = x.to(torch.float64)
    acc = _box_sum_1d(acc, k, dim=3)
    acc = _box_sum_1d(acc, k, dim=2)
    return acc.to(x.dtype)


# --------------------------------------------------------------------------- outlier region (eqs. 4-12)


class OutlierParts(NamedTuple):
    """Intermediate maps of eqs. 4-11, each ``(B, 1, H, W)``."""

    white_i: Tensor  # CountWhite(N_i)
    black_i: Tensor  # CountBlack(N_i)
    gap_white: Tensor  # eq. 4
    gap_black: Tensor  # eq. 5
    density_white: Tensor  # eq. 6
    density_black: Tensor  # eq. 7
    mask_white: Tensor  # eq. 9 (bool): CountGapWhite <= Threshold
    mask_black: Tensor  # eq. 10 (bool): CountGapBlack <= Threshold
    white: Tensor  # Round(X) (bool)
    density_map: Tensor  # eq. 11


def outlier_parts(prob: Tensor, cfg: LossConfig, white: Tensor | None = None) -> OutlierParts:
    """Eqs. 4-11 on probabilities.

    Args:
        prob: ``(B, 1, H, W)`` in [0, 1] (computed in float32).
        cfg: ``i``, ``j``, ``threshold``, ``smooth``; counts use ``prob`` itself (``counts: soft``)
            or ``Round(prob)`` (``hard``). Its ring ``j^2 - i^2`` exceeds ``threshold`` (else every
            white pixel, even inside a large object, would pass the mask of eq. 9): a paper-mode
            :class:`LossConfig` refuses any other, the one check of that rule.
        white: ``Round(X)`` as a bool ``(B, 1, H, W)``; by default ``prob > 0.5`` (pass
            ``logits > 0`` to avoid the sigmoid's rounding near 0.5).

    Returns:
        :class:`OutlierParts`, every map ``(B, 1, H, W)``: counts and densities float32, masks and
        ``white`` bool. ``density_map`` is 0 wherever the mask of the pixel's predicted colour does
        not hold, so an empty prediction gets 0 wherever its ring holds more than ``threshold``
        black mass.
    """
    if prob.dim() != 4 or prob.shape[1] != 1:
        raise ValueError(
            f"outlier loss: expected probabilities of shape (B, 1, H, W), got {tuple(prob.shape)}"
        )
    prob = prob.float()
    if white is None:
        white = prob > 0.5
    mass = white.float() if cfg.counts == "hard" else prob
    i, j, s = cfg.i, cfg.j, float(cfg.smooth)
    white_i = box_sum(mass, i)
    white_j = box_sum(mass, j)
    black_i = i * i - white_i  # outside the image counts as black
    gap_white = white_j - white_i
    gap_black = (j * j - i * i) - gap_white
    # smooth = 0 is allowed by LossConfig; a zero denominator then only arises in the density of a
    # pixel that its mask switches off. The floor keeps that unused value, and the zero gradient
    # torch.where sends back through it, finite (a float32-tiny floor would give 0 * inf = NaN).
    density_white = (white_i + s) / (gap_black + s).clamp_min(_EPS)
    density_black = (black_i + s) / (gap_white + s).clamp_min(_EPS)
    with torch.no_grad():
        mask_white = gap_white <= cfg.threshold
        mask_black = gap_black <= cfg.threshold
    zero = torch.zeros((), dtype=prob.dtype, device=prob.device)
    dmap = torch.where(white & mask_white, density_white, zero) + torch.where(
        ~white & mask_black, density_black, zero
    )
    return OutlierParts(
        white_i=white_i,
        black_i=black_i,
        gap_white=gap_white,
        gap_black=gap_black,
        density_white=density_white,
        density_black=density_black,
        mask_white=mask_white,
        mask_black=mask_black,
        white=white,
        density_map=dmap,
    )


def density_map(logits: Tensor, cfg: LossConfig) -> Tensor:
    """DensityMap of eq. 11 (see the module docstring for the choices).

    Args:
        logits: ``(B, 1, H, W)``; ``Round(X)`` is ``logits > 0``.
        cfg: the outlier settings, as for :func:`outlier_parts`.

    Returns:
        float32 ``(B, 1, H, W)``, >= 0 (0 off the masks of eqs. 9-10).
    """
    return outlier_parts(torch.sigmoid(logits.float()), cfg, white=logits > 0).density_map


def _reduce(per_pixel: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_pixel.mean()
    return per_pixel.flatten(1).sum(1).mean()


def outlier_loss(logits: Tensor, target: Tensor, cfg: LossConfig) -> Tensor:
    """Eq. 12, ``reduce(BCE - DensityMap)`` (the paper's outlier term).

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1}.
        cfg: the outlier settings; ``cfg.reduction`` ``mean`` (over all pixels of the batch) or
            ``sum`` (per image, averaged over the batch).

    Returns:
        float32 scalar; may be negative (the DensityMap is subtracted).
    """
    _check_pair(logits, target)
    per_pixel = bce_map(logits, target) - density_map(logits, cfg)
    return _reduce(per_pixel, cfg.reduction)


# --------------------------------------------------------------------------- isolated_bce (ours)


def isolated_mask(logits: Tensor, i: int, j: int) -> Tensor:
    """Pixels in a predicted region of at most ``i*i`` pixels within ``N_j``.

    A predicted-white pixel is isolated when its ``j x j`` window holds at most ``i*i`` predicted-white
    pixels; a predicted-black one when it holds at most ``i*i`` predicted-black pixels, outside the
    image counting as black.

    Args:
        logits: ``(B, 1, H, W)``; the prediction is ``logits > 0``.
        i: largest region side, odd.
        j: window side, odd.

    Returns:
        bool ``(B, 1, H, W)``, without gradient. An empty prediction has no isolated pixel.
    """
    _check_window(i, "i")
    _check_window(j, "j")
    with torch.no_grad():
        white = logits > 0
        n_white = box_sum(white.float(), j)
        n_black = j * j - n_white
        limit = i * i
        return (white & (n_white <= limit)) | (~white & (n_black <= limit))


def isolated_bce_loss(logits: Tensor, target: Tensor, cfg: LossConfig) -> Tensor:
    """BCE over the isolated pixels of :func:`isolated_mask`.

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1}.
        cfg: ``i``, ``j`` and ``reduction`` (``mean``: over all isolated pixels of the batch;
            ``sum``: summed per image, averaged over the batch).

    Returns:
        float32 scalar; 0 when no pixel is isolated (e.g. an empty prediction).
    """
    _check_pair(logits, target)
    weight = isolated_mask(logits, cfg.i, cfg.j).float()
    weighted = bce_map(logits, target) * weight
    if cfg.reduction == "mean":
        return weighted.sum() / weight.sum().clamp_min(1.0)
    return weighted.flatten(1).sum(1).mean()


# --------------------------------------------------------------------------- eq. 13


def gamma_schedule(cfg: LossConfig, planned_epochs: int | None = None) -> tuple[int, int]:
    """``(warm-up epochs, ramp epochs)`` of the outlier weight in a run of ``planned_epochs`` epochs.

    ``loss.gamma_warmup_epochs`` and ``gamma_ramp_epochs``; a ``loss.gamma_warmup_fraction`` or
    ``gamma_ramp_fraction`` that is set replaces its count by ``floor(fraction * planned_epochs)``.
    The plan is the run's current one: ``train.epochs``, or what ``train.max_minutes`` re-plans after
    each epoch, so the schedule follows the plan. Rounding down keeps warm-up + ramp below the plan
    (the fractions sum below 1), so the last planned epoch is always at the full weight.
    """

    def count(fraction: float | None, epochs: int) -> int:
        if fraction is None:
            return epochs
        if planned_epochs is None:
            raise ValueError("loss.gamma_warmup_fraction / gamma_ramp_fraction need the run's planned epochs")
        return math.floor(fraction * planned_epochs + 1e-9)  # 1e-9: 0.3 * 10 is 3, not 2.9999...

    return count(cfg.gamma_warmup_fraction, cfg.gamma_warmup_epochs), count(cfg.gamma_ramp_fraction, cfg.gamma_ramp_epochs)


def gamma_at(cfg: LossConfig, epoch: int, planned_epochs: int | None = None) -> float:
    """Outlier weight at 0-based ``epoch``: 0 during the warm-up, then a linear ramp to ``cfg.gamma``
    (``gamma * min(1, (epoch - warmup + 1) / ramp)``), with the counts of :func:`gamma_schedule`."""
    warmup, ramp = gamma_schedule(cfg, planned_epochs)
    if epoch < warmup:
        return 0.0
    if ramp == 0:
        return float(cfg.gamma)
    return float(cfg.gamma) * min(1.0, (epoch - warmup + 1) / ramp)


def full_gamma_epoch(cfg: LossConfig, planned_epochs: int | None = None) -> int:
    """The first 0-based epoch at which :func:`gamma_at` gives the full ``cfg.gamma``."""
    warmup, ramp = gamma_schedule(cfg, planned_epochs)
    return warmup + max(ramp - 1, 0)


class CompoundLoss(nn.Module):
    """Eq. 13: ``alpha * BCE + beta * Dice + gamma_at(epoch) * Outlier`` over ``cfg.terms``.

    A term whose weight is 0 at this epoch (the outlier term during warm-up) is still reported but
    computed without autograd. ``planned_epochs``: the run's current plan, which a gamma schedule in
    fractions needs (the trainer updates it when it re-plans).
    """

    def __init__(self, cfg: LossConfig, planned_epochs: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.planned_epochs = planned_epochs

    def weights(self, epoch: int = 0) -> dict[str, float]:
        """Each term of ``cfg.terms`` -> its weight at ``epoch``."""
        w = {t: float(self.cfg.weight(t)) for t in self.cfg.terms}
        if "outlier" in w:
            w["outlier"] = gamma_at(self.cfg, epoch, self.planned_epochs)
        return w

    def _term(self, name: str, logits: Tensor, target: Tensor) -> Tensor:
        if name == "bce":
            return bce_loss(logits, target)
        if name == "dice":
            return dice_loss(logits, target, smooth=self.cfg.smooth)
        if self.cfg.outlier_mode == "isolated_bce":
            return isolated_bce_loss(logits, target, self.cfg)
        return outlier_loss(logits, target, self.cfg)

    def forward(self, logits: Tensor, target: Tensor, epoch: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Args:
            logits: ``(B, 1, H, W)``, any float dtype (the loss is float32).
            target: ``(B, 1, H, W)`` in {0, 1}.
            epoch: picks the outlier weight (:func:`gamma_at`).

        Returns:
            ``(total, parts)``: float32 scalar with a graph, and each term of ``cfg.terms`` ->
            its unweighted value (detached scalar).
        """
        _check_pair(logits, target)
        logits = logits.float()
        total = logits.new_zeros(())
        parts: dict[str, Tensor] = {}
        for name, w in self.weights(epoch).items():
            if w == 0:
                with torch.no_grad():
                    parts[name] = self._term(name, logits, target).detach()
                continue
            value = self._term(name, logits, target)
            parts[name] = value.detach()
            total = total + w * value
        if not total.requires_grad and logits.requires_grad:
            # Every weight is 0 this epoch: keep a (zero-gradient) graph so backward() still works.
            total = total + 0.0 * logits.sum()
        return total, parts
