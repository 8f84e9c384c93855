"""Tests of lggseg.losses against hand-computed values (paper eqs. 2-13)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lggseg.config import ConfigError, LossConfig
from lggseg.losses import (
    CompoundLoss,
    bce_loss,
    bce_map,
    box_sum,
    density_map,
    dice_loss,
    full_gamma_epoch,
    gamma_at,
    gamma_schedule,
    isolated_bce_loss,
    isolated_mask,
    outlier_loss,
    outlier_parts,
)

BIG = 50.0  # sigmoid(+-50) is 1 / 2e-22: a "perfect" prediction


def img(rows: list[str]) -> torch.Tensor:
    """(1, 1, H, W) float image from strings of '.' (0) and '#' (1)."""
    return torch.tensor([[[[1.0 if ch == "#" else 0.0 for ch in r] for r in rows]]])


def square(size: int, top: int, left: int, side: int, value: float = 1.0, fill: float = 0.0) -> torch.Tensor:
    x = torch.full((1, 1, size, size), fill)
    x[..., top : top + side, left : left + side] = value
    return x


def cfg_of(**kw) -> LossConfig:
    base = {"terms": ("outlier",), "gamma_warmup_epochs": 0, "gamma_ramp_epochs": 0}
    base.update(kw)
    return LossConfig(**base)


# --------------------------------------------------------------------------- BCE (eq. 2)


def _bce_by_hand(logit: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.mark.parametrize(
    ("logit", "y", "expected"),
    [
        (0.0, 0.0, math.log(2.0)),
        (0.0, 1.0, math.log(2.0)),
        (2.0, 1.0, _bce_by_hand(2.0, 1.0)),  # 0.12693
        (2.0, 0.0, _bce_by_hand(2.0, 0.0)),  # 2.12693
        (-3.0, 1.0, _bce_by_hand(-3.0, 1.0)),  # 3.04859
        (100.0, 0.0, 100.0),  # log(1 + e^100) = 100 + 3.7e-44: finite, no log(0)
        (-100.0, 0.0, 0.0),
    ],
)
def test_bce_table(logit, y, expected):
    logits = torch.full((1, 1, 2, 2), logit)
    target = torch.full((1, 1, 2, 2), y)
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert torch.allclose(bce_map(logits, target), torch.full_like(logits, expected), rtol=1e-5, atol=1e-6)


def test_bce_is_the_pixel_mean():
    logits = torch.tensor([[[[0.0, 2.0], [-3.0, 1.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    by_hand = sum(_bce_by_hand(a, b) for a, b in [(0, 1), (2, 0), (-3, 1), (1, 1)]) / 4
    assert bce_loss(logits, target).item() == pytest.approx(by_hand, rel=1e-6)


# --------------------------------------------------------------------------- Dice (eq. 3)

_T2 = [[1.0, 1.0], [0.0, 0.0]]  # 2 of 4 pixels
_E = [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize(
    ("logits", "target", "per_sample", "expected"),
    [
        # p = 0.5 everywhere, 2 target pixels: 1 - (2*1 + 1) / (2 + 2 + 1)
        ([[[[0.0] * 2] * 2]], [[_T2]], False, 1 - 3 / 5),
        # perfect prediction: 1 - (4 + 1) / (4 + 1)
        ([[[[BIG, BIG], [-BIG, -BIG]]]], [[_T2]], False, 0.0),
        # empty target, empty prediction: 1 - 1/1
        ([[[[-BIG] * 2] * 2]], [[_E]], False, 0.0),
        # empty target, full prediction of 4 pixels: 1 - 1 / (4 + 1)
        ([[[[BIG] * 2] * 2]], [[_E]], False, 0.8),
        # batch [empty target + full prediction, perfect]: pooled 1 - 5/9, per image (0.8 + 0) / 2
        ([[[[BIG] * 2] * 2], [[[BIG, BIG], [-BIG, -BIG]]]], [[_E], [_T2]], False, 1 - 5 / 9),
        ([[[[BIG] * 2] * 2], [[[BIG, BIG], [-BIG, -BIG]]]], [[_E], [_T2]], True, 0.4),
    ],
)
def test_dice_table(logits, target, per_sample, expected):
    got = dice_loss(torch.tensor(logits), torch.tensor(target), smooth=1.0, per_sample=per_sample)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="target shape"):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        bce_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


# --------------------------------------------------------------------------- box counts


def naive_box_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    r = k // 2
    out = torch.zeros_like(x, dtype=torch.float64)
    h, w = x.shape[-2:]
    for y in range(h):
        for c in range(w):
            out[..., y, c] = (
                x[..., max(0, y - r) : y + r + 1, max(0, c - r) : c + r + 1].double().sum((-2, -1))
            )
    return out


@pytest.mark.parametrize("k", [1, 3, 7, 21])
@pytest.mark.parametrize("shape", [(2, 1, 9, 11), (1, 1, 30, 25), (1, 2, 5, 40)])
def test_box_sum_equals_naive(k, shape):
    gen = torch.Generator().manual_seed(k * 100 + shape[-1])
    x = torch.rand(shape, generator=gen)
    got = box_sum(x, k)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got.double(), naive_box_sum(x, k), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "pos", "k", "expected"),
    [
        (10, (0, 0), 7, 16),  # corner: a 4x4 quadrant of the window is inside
        (10, (5, 5), 7, 49),
        (10, (0, 5), 7, 28),  # edge: 4 rows x 7 columns
        (10, (9, 9), 3, 4),
        (10, (5, 5), 21, 100),  # the window covers the whole image
        (20, (0, 0), 21, 121),
    ],
)
def test_box_sum_counts_only_pixels_inside_the_image(size, pos, k, expected):
    assert box_sum(torch.ones(1, 1, size, size), k)[0, 0][pos].item() == expected


def test_box_sum_is_exact_on_large_float32_images():
    # A float32 integral image of a 256x256 image of ~0.5 values reaches ~3.3e4, where float32 steps
    # are ~0.004; the float64 running sums must stay within float32 rounding of the true window sums.
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 256, 256, generator=gen)
    ref = F.conv2d(F.pad(x.double(), (10,) * 4), torch.ones(1, 1, 21, 21, dtype=torch.float64))
    assert (box_sum(x, 21).double() - ref).abs().max().item() < 1e-4
    binary = (x[..., :128, :128] > 0.5).float()
    assert torch.equal(box_sum(binary, 81), F.conv2d(F.pad(binary, (40,) * 4), torch.ones(1, 1, 81, 81)))


def test_box_sum_does_not_loop_over_k():
    """The same torch calls run for k = 3 and k = 81: the work per pixel does not depend on k."""

    class Recorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = torch.rand(1, 1, 100, 100)
    traces = []
    for k in (3, 81):
        with Recorder() as rec:
            box_sum(x, k)
        traces.append(rec.calls)
    assert traces[0] == traces[1]
    assert "cumsum" in traces[0] and len(traces[0]) < 30


def test_box_sum_gradient():
    x = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_sum(t, 5), (x,))


@pytest.mark.parametrize("k", [0, 2, -3, 4.0, True])
def test_box_sum_rejects_bad_windows(k):
    with pytest.raises(ValueError, match="positive odd integer"):
        box_sum(torch.zeros(1, 1, 4, 4), k)


# --------------------------------------------------------------------------- outlier region (eqs. 4-12)


@pytest.mark.parametrize(
    ("i", "rounding", "threshold"),
    [(7, "ceil", 33), (7, "floor", 40), (3, "ceil", 5), (3, "floor", 8), (5, "ceil", 16), (5, "floor", 21)],
)
def test_threshold_eq8(i, rounding, threshold):
    assert cfg_of(i=i, j=21, threshold_rounding=rounding).threshold == threshold


def _dmap(x: torch.Tensor, **kw) -> torch.Tensor:
    return outlier_parts(x, cfg_of(**kw)).density_map[0, 0]


@pytest.mark.parametrize("pos", [(4, 4), (0, 0), (0, 4), (8, 3)])
def test_single_white_pixel(pos):
    """i=3, j=5: CountWhite(N_3)=1, CountGapWhite=0 <= 5, CountGapBlack=25-9=16 -> (1+1)/(16+1).

    Outside the image counts as black, so the value is the same at a corner or an edge.
    """
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0][pos] = 1
    expected = torch.zeros(9, 9)
    expected[pos] = 2 / 17
    assert torch.allclose(_dmap(x, i=3, j=5), expected)


@pytest.mark.parametrize(
    ("pos", "expected", "why"),
    [
        ((4, 4), 10 / 17, "centre: 9 white in N_3, ring all black (16)"),
        ((3, 4), 7 / 14, "edge: 6 white in N_3, ring 3 white <= 5, 13 black"),
        ((3, 3), 5 / 12, "corner: 4 white in N_3, ring 5 white <= T=5 (eq. 8's boundary case), 11 black"),
        ((2, 4), 0.0, "black pixel: ring holds 13 black > 5, MaskBlack = 0"),
        ((0, 0), 0.0, "black background at the image corner"),
    ],
)
def test_three_by_three_block(pos, expected, why):
    x = square(9, 3, 3, 3)
    assert _dmap(x, i=3, j=5)[pos].item() == pytest.approx(expected, rel=1e-6), why


@pytest.mark.parametrize(("rounding", "expected"), [("ceil", 0.0), ("floor", 1.0)])
def test_threshold_rounding_changes_the_mask(rounding, expected):
    """4x4 block, pixel (4,4): 9 white in N_3, 16 in N_5 -> ring 7 white: > 5 (ceil), <= 8 (floor).

    With floor, DensityWhite = (9 + 1) / (9 + 1) with 16 - 7 = 9 black in the ring.
    """
    x = square(10, 3, 3, 4)
    assert _dmap(x, i=3, j=5, threshold_rounding=rounding)[4, 4].item() == pytest.approx(expected)


def test_small_black_hole_gets_density_black():
    """i=3, j=7: a one-pixel hole in white: CountBlack(N_3)=1, ring black 0, ring white 40 -> 2/41."""
    x = torch.ones(1, 1, 11, 11)
    x[0, 0, 5, 5] = 0
    expected = torch.zeros(11, 11)
    expected[5, 5] = 2 / 41
    assert torch.allclose(_dmap(x, i=3, j=7), expected)


def test_large_region_gets_no_value():
    x = square(40, 5, 5, 28)  # Figure 9's area 5
    assert _dmap(x, i=7, j=21).abs().max().item() == 0.0


@pytest.mark.parametrize(("kw", "refused"), [
    ({"i": 7, "j": 9}, True),  # ring 81 - 49 = 32 <= T = 33: every white pixel would pass eq. 9's mask
    ({"i": 7, "j": 9, "terms": ("bce",)}, True),  # the maps are drawn for Figure 9 without the term too
    ({"i": 7, "j": 9, "threshold_rounding": "floor"}, True),  # 32 <= 40
    ({"i": 7, "j": 11}, False),  # 121 - 49 = 72 > 33
    ({"i": 3, "j": 5}, False),  # 25 - 9 = 16 > 5
    ({"i": 7, "j": 9, "outlier_mode": "isolated_bce"}, False),  # no ring in that mode
])
def test_degenerate_ring_is_refused_by_the_config(kw, refused):
    """The one check of the ring rule is LossConfig's; the loss functions rely on a validated config."""
    if refused:
        with pytest.raises(ConfigError, match="ring"):
            cfg_of(**kw)
    else:
        assert cfg_of(**kw).j == kw["j"]


def test_eq12_is_bce_minus_density_map():
    target = square(32, 2, 2, 12)
    logits = (square(32, 2, 2, 12) + square(32, 22, 22, 4)) * 8 - 4
    cfg = cfg_of(i=7, j=21)
    per_pixel = bce_map(logits, target) - density_map(logits, cfg)
    assert density_map(logits, cfg).max() > 0  # the 4x4 blob is flagged
    assert outlier_loss(logits, target, cfg).item() == pytest.approx(per_pixel.mean().item(), rel=1e-6)
    summed = outlier_loss(logits, target, dataclasses.replace(cfg, reduction="sum")).item()
    assert summed == pytest.approx(per_pixel.sum().item(), rel=1e-5)


def test_sum_reduction_averages_over_the_batch():
    logits = torch.cat([square(32, 22, 22, 4) * 8 - 4, torch.full((1, 1, 32, 32), -4.0)])
    target = torch.zeros_like(logits)
    cfg = cfg_of(i=7, j=21, reduction="sum")
    per_pixel = bce_map(logits, target) - density_map(logits, cfg)
    assert outlier_loss(logits, target, cfg).item() == pytest.approx(per_pixel.sum().item() / 2, rel=1e-5)


def test_hard_counts_leave_only_the_bce_gradient():
    target = square(32, 2, 2, 12)
    logits = ((square(32, 2, 2, 12) + square(32, 22, 22, 4)) * 6 - 3).requires_grad_(True)
    outlier_loss(logits, target, cfg_of(counts="hard")).backward()
    g_hard = logits.grad.clone()
    logits.grad = None
    bce_loss(logits, target).backward()
    assert torch.allclose(g_hard, logits.grad)


def test_soft_density_term_raises_the_blob():
    """The literal -DensityMap has a negative gradient on the blob's logits: descent grows the blob."""
    logits = ((square(32, 2, 2, 12) + square(32, 22, 22, 4)) * 6 - 3).requires_grad_(True)
    (-density_map(logits, cfg_of()).mean()).backward()
    blob_grad = logits.grad[0, 0, 22:26, 22:26]
    assert (blob_grad < 0).all()
    # The large region is not flagged; only its corner inside the blob's 21x21 reach gets a push.
    assert logits.grad[0, 0, 2:12, 2:14].abs().max() == 0


# --------------------------------------------------------------------------- isolated_bce (ours)


@pytest.mark.parametrize(
    ("side", "flagged"),
    [(1, 1), (4, 16), (7, 49), (8, 0)],  # i=7: up to 49 pixels in the 21x21 window
)
def test_isolated_mask_white_blobs(side, flagged):
    logits = square(48, 20, 20, side) * 8 - 4
    assert int(isolated_mask(logits, 7, 21).sum()) == flagged


def test_isolated_mask_black_hole_and_border():
    logits = square(48, 0, 0, 48) * 8 - 4  # all white
    logits[..., 20:23, 20:23] = -4  # 3x3 hole
    mask = isolated_mask(logits, 7, 21)
    assert int(mask.sum()) == 9 and bool(mask[0, 0, 21, 21])
    background = torch.full((1, 1, 48, 48), -4.0)
    assert int(isolated_mask(background, 7, 21).sum()) == 0  # outside counts as black


def test_isolated_mask_ignores_blobs_near_other_foreground():
    """A 3x3 blob 4 px beside a 20x20 region: each blob window holds >= 4 x 20 region pixels."""
    pred = square(48, 4, 4, 20)
    pred[..., 12:15, 28:31] = 1
    assert int(isolated_mask(pred * 8 - 4, 7, 21).sum()) == 0
    pred[..., 12:15, 38:41] = 1  # a second blob, 15 px from the region, is isolated
    assert int(isolated_mask(pred * 8 - 4, 7, 21).sum()) == 9


@pytest.mark.parametrize(("reduction", "expected_factor"), [("mean", 1.0), ("sum", 49 / 2)])
def test_isolated_bce_value(reduction, expected_factor):
    """A 7x7 false blob at logit +2 (target 0): BCE log(1 + e^2) on each of its 49 pixels."""
    blob = square(48, 20, 20, 7) * 4 - 2
    empty = torch.full((1, 1, 48, 48), -2.0)
    logits = torch.cat([blob, empty])
    cfg = cfg_of(outlier_mode="isolated_bce", reduction=reduction)
    got = isolated_bce_loss(logits, torch.zeros_like(logits), cfg).item()
    assert got == pytest.approx(math.log1p(math.exp(2.0)) * expected_factor, rel=1e-5)


def test_isolated_bce_without_isolated_pixels_is_zero_with_a_graph():
    logits = (square(48, 4, 4, 20) * 8 - 4).requires_grad_(True)
    loss = isolated_bce_loss(logits, torch.zeros_like(logits), cfg_of(outlier_mode="isolated_bce"))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max() == 0


# --------------------------------------------------------------------------- eq. 13


@pytest.mark.parametrize(
    "terms", [("bce",), ("dice",), ("outlier",), ("bce", "dice"), ("bce", "dice", "outlier")]
)
def test_compound_loss_terms_and_weights(terms):
    cfg = LossConfig(terms=terms, alpha=0.5, beta=2.0, gamma=3.0, gamma_warmup_epochs=0, gamma_ramp_epochs=0)
    target = square(32, 2, 2, 12)
    logits = (square(32, 2, 2, 12) + square(32, 22, 22, 4)) * 6 - 3
    total, parts = CompoundLoss(cfg)(logits, target)
    assert set(parts) == set(terms)
    singles = {
        "bce": bce_loss(logits, target),
        "dice": dice_loss(logits, target),
        "outlier": outlier_loss(logits, target, cfg),
    }
    weights = {"bce": 0.5, "dice": 2.0, "outlier": 3.0}
    for t in terms:
        assert parts[t].item() == pytest.approx(singles[t].item(), rel=1e-6)
        assert not parts[t].requires_grad
    assert total.item() == pytest.approx(sum(weights[t] * singles[t].item() for t in terms), rel=1e-6)


@pytest.mark.parametrize(
    ("epoch", "gamma"),
    [(0, 0.0), (1, 0.0), (2, 0.5), (3, 1.0), (4, 1.5), (5, 2.0), (40, 2.0)],
)
def test_gamma_warmup_and_ramp(epoch, gamma):
    cfg = LossConfig(terms=("bce", "outlier"), gamma=2.0, gamma_warmup_epochs=2, gamma_ramp_epochs=4)
    assert gamma_at(cfg, epoch) == pytest.approx(gamma)
    loss = CompoundLoss(cfg)
    assert loss.weights(epoch) == {"bce": 1.0, "outlier": pytest.approx(gamma)}
    logits, target = square(32, 22, 22, 4) * 6 - 3, torch.zeros(1, 1, 32, 32)
    total, parts = loss(logits, target, epoch=epoch)
    assert total.item() == pytest.approx(parts["bce"].item() + gamma * parts["outlier"].item(), rel=1e-6)


@pytest.mark.parametrize(
    ("warmup", "ramp", "epoch", "expected"),
    [(0, 0, 0, 1.0), (2, 0, 1, 0.0), (2, 0, 2, 1.0), (1, 4, 0, 0.0), (1, 4, 1, 0.25), (1, 4, 4, 1.0), (1, 4, 9, 1.0)],
)
def test_gamma_schedule_in_epochs(warmup, ramp, epoch, expected):
    cfg = LossConfig(terms=("bce", "outlier"), gamma=1.0, gamma_warmup_epochs=warmup, gamma_ramp_epochs=ramp)
    assert gamma_at(cfg, epoch) == pytest.approx(expected)
    assert gamma_at(cfg, epoch, planned_epochs=3) == gamma_at(cfg, epoch)  # counts ignore the plan


# (warm-up fraction, ramp fraction, planned epochs) -> (warm-up, ramp epochs) = floor(fraction * planned),
# the first epoch (0-based) at full gamma, and gamma (2.0) at each epoch of the plan
FRACTIONS = [
    (0.2, 0.3, 10, (2, 3), 4, [0, 0, 2 / 3, 4 / 3, 2, 2, 2, 2, 2, 2]),
    (0.2, 0.3, 8, (1, 2), 2, [0, 1, 2, 2, 2, 2, 2, 2]),  # 1.6 -> 1, 2.4 -> 2
    (0.25, 0.25, 8, (2, 2), 3, [0, 0, 1, 2, 2, 2, 2, 2]),  # params.cpu.yaml's 2 + 2 at its 8 epochs
    (0.2, 0.3, 3, (0, 0), 0, [2, 2, 2]),  # a plan cut to 3 epochs: full gamma from the start
    (0.5, 0.0, 5, (2, 0), 2, [0, 0, 2, 2, 2]),
    (0.0, 0.9, 5, (0, 4), 3, [0.5, 1, 1.5, 2, 2]),  # warm-up + ramp < 1: the last epoch is at full gamma
    (0.3, 0.6, 10, (3, 6), 8, [0, 0, 0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 2]),  # 0.3 * 10 is 3, not 2.999...
]


@pytest.mark.parametrize(("warmup", "ramp", "planned", "counts", "first_full", "gammas"), FRACTIONS)
def test_gamma_schedule_in_fractions_of_the_plan(warmup, ramp, planned, counts, first_full, gammas):
    cfg = LossConfig(terms=("bce", "outlier"), gamma=2.0, gamma_warmup_fraction=warmup, gamma_ramp_fraction=ramp)
    assert gamma_schedule(cfg, planned) == counts
    assert full_gamma_epoch(cfg, planned) == first_full
    assert [gamma_at(cfg, e, planned) for e in range(planned)] == pytest.approx(gammas)
    loss = CompoundLoss(cfg, planned_epochs=planned)
    assert loss.weights(first_full)["outlier"] == 2.0
    with pytest.raises(ValueError, match="planned epochs"):  # a fraction of nothing
        CompoundLoss(cfg).weights(0)


def test_one_fraction_replaces_only_its_own_count():
    cfg = LossConfig(terms=("outlier",), gamma_warmup_epochs=5, gamma_ramp_epochs=10, gamma_ramp_fraction=0.5)
    assert gamma_schedule(cfg, 8) == (5, 4)


def test_compound_loss_backward_during_warmup_only_outlier():
    cfg = LossConfig(terms=("outlier",), gamma_warmup_epochs=3)
    logits = torch.zeros(1, 1, 32, 32, requires_grad=True)
    total, parts = CompoundLoss(cfg)(logits, torch.zeros(1, 1, 32, 32), epoch=0)
    total.backward()
    assert total.item() == 0.0 and "outlier" in parts and logits.grad.abs().max() == 0


_MODES = [
    {"outlier_mode": "paper", "counts": "soft"},
    {"outlier_mode": "paper", "counts": "hard"},
    {"outlier_mode": "isolated_bce"},
]


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("smooth", [1.0, 0.0])
@pytest.mark.parametrize(("logit", "y"), [(-30.0, 0.0), (30.0, 1.0), (-30.0, 1.0), (30.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_nan_on_constant_inputs(mode, smooth, logit, y, reduction):
    cfg = LossConfig(terms=("bce", "dice", "outlier"), gamma_warmup_epochs=0, gamma_ramp_epochs=0, smooth=smooth, reduction=reduction, **mode)
    logits = torch.full((2, 1, 32, 32), logit, requires_grad=True)
    total, parts = CompoundLoss(cfg)(logits, torch.full((2, 1, 32, 32), y))
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("mode", _MODES)
def test_gradients_finite_on_random_logits(mode):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 1, 48, 48, generator=gen) * 5).requires_grad_(True)
    target = (torch.rand(2, 1, 48, 48, generator=gen) > 0.7).float()
    total, _ = CompoundLoss(LossConfig(terms=("bce", "dice", "outlier"), gamma_warmup_epochs=0, gamma_ramp_epochs=0, **mode))(logits, target)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_logits_are_computed_in_float32():
    logits = (square(32, 22, 22, 4) * 6 - 3).half()
    total, _ = CompoundLoss(LossConfig(terms=("bce", "dice", "outlier"), gamma_warmup_epochs=0, gamma_ramp_epochs=0))(logits, torch.zeros(1, 1, 32, 32))
    assert total.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", _MODES)
def test_cuda_matches_cpu(mode):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 64, 64, generator=gen) * 4
    logits[..., 40:44, 40:44] = 5.0
    target = (torch.rand(2, 1, 64, 64, generator=gen) > 0.8).float()
    assert torch.allclose(box_sum(logits.cuda(), 21).cpu(), box_sum(logits, 21), atol=1e-4)
    loss = CompoundLoss(LossConfig(terms=("bce", "dice", "outlier"), gamma_warmup_epochs=0, gamma_ramp_epochs=0, **mode))
    results = []
    for device in ("cpu", "cuda"):
        lg = logits.to(device).requires_grad_(True)
        total, _ = loss(lg, target.to(device))
        total.backward()
        results.append((total.item(), lg.grad.cpu()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
