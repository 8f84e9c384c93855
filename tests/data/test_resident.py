"""Device-resident batches (lggseg.data.resident): each colour operation equals albumentations' on uint8,
the affine transform moves pixels as albumentations' does, both augmentation paths agree in
distribution, batches are a function of (seed, epoch), and evaluation mode equals SliceDataset."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lggseg.config import AugmentConfig
from lggseg.data.dataset import SliceDataset, item_seed
from lggseg.data.resident import (
    ResidentBatches,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    affine_theta,
    augment_batch,
    generator,
    gray,
    resident_bytes,
)

CPU = torch.device("cpu")
N, S, A = 6, 256, 5


def _store() -> SimpleNamespace:
    """Random-noise slices (the hardest case for resizing), a square tumour on odd rows."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8)
    masks = np.zeros((N, S, S), np.uint8)
    masks[1::2, 100:140, 60:120] = 1
    return SimpleNamespace(images=images, masks=masks, attributes=rng.random((N, A)).astype(np.float32))


def _smooth_images(n: int = 8, size: int = 64) -> np.ndarray:
    """uint8 (n, size, size, 3) images with structure and no zero pixel (so a dropped channel is all 0)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        for c in range(3):
            a, b, ph = rng.uniform(1, 4, 3)
            # at most 180, so that brightness x 1.3 does not clip and the factor can be read back
            out[i, :, :, c] = np.clip(100 + 60 * np.sin(a * 3 * xx + b * 2 * yy + ph) + rng.normal(0, 8, (size, size)),
                                      20, 180)
    return out


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------- single operations


@pytest.mark.parametrize("factor", [0.05, 0.8, 0.93, 1.0, 1.17, 1.2])
def test_colour_operations_equal_albumentations_on_uint8(factor):  # factors lie in (0, 2): train.augment.* < 1
    fp = pytest.importorskip("albumentations.augmentations.pixel.functional")
    img = _smooth_images(2)
    factor = float(np.float32(factor))  # our factors are float32 draws: give albumentations the same number
    x, f = _nchw(img), torch.full((2,), factor)
    for ours, theirs in ((adjust_brightness, fp.adjust_brightness_torchvision),
                         (adjust_contrast, fp.adjust_contrast_torchvision),
                         (adjust_saturation, fp.adjust_saturation_torchvision)):
        expected = np.stack([theirs(i, factor) for i in img])
        got = ours(x, f).permute(0, 2, 3, 1).numpy().astype(np.uint8)
        np.testing.assert_array_equal(got, expected, err_msg=f"{ours.__name__} at {factor}")


def test_gray_is_opencv_rgb2gray():
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected = np.stack([cv2.cvtColor(i, cv2.COLOR_RGB2GRAY) for i in img])
    np.testing.assert_array_equal(gray(_nchw(img))[:, 0].numpy().astype(np.uint8), expected)


@pytest.mark.parametrize(("scale", "shift", "degrees"), [((1.1, 0.9), (3, -2), 8.0), ((0.9, 1.05), (-3, 3), -10.0)])
def test_affine_moves_pixels_as_albumentations(scale, shift, degrees):
    cv2 = pytest.importorskip("cv2")
    fgeo = pytest.importorskip("albumentations.augmentations.geometric.functional")
    size = 64
    img = _smooth_images(1, size)[0]
    mask = np.zeros((size, size), np.uint8)
    mask[20:44, 12:40] = 1
    m = fgeo.create_affine_transformation_matrix({"x": shift[0], "y": shift[1]}, {"x": 0.0, "y": 0.0},
                                                 {"x": scale[0], "y": scale[1]}, degrees, fgeo.center((size, size)))
    ref_img = cv2.warpAffine(img, m[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    ref_mask = cv2.warpAffine(mask, m[:2], (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    theta = affine_theta(torch.tensor([scale]), torch.tensor([shift], dtype=torch.float32), torch.tensor([degrees]), size)
    grid = torch.nn.functional.affine_grid(theta, [1, 3, size, size], align_corners=False)
    got = torch.nn.functional.grid_sample(_nchw(img[None]), grid, mode="bilinear", align_corners=False)
    got_mask = torch.nn.functional.grid_sample(torch.from_numpy(mask)[None, None].float(), grid, mode="nearest",
                                               align_corners=False)
    # OpenCV quantises bilinear weights to 1/32 and rounds; a pixel's value may differ by a few levels
    diff = np.abs(got.round()[0].permute(1, 2, 0).numpy() - ref_img.astype(np.float32))
    assert diff.mean() < 1.0 and np.quantile(diff, 0.99) <= 4
    # nearest-neighbour ties on the mask border fall either way: 1 % of the pixels at most
    assert (got_mask[0, 0].numpy().astype(np.uint8) != ref_mask).mean() < 0.01
    assert 0.8 * mask.sum() < ref_mask.sum()  # the transform kept the square in view: a real comparison


# --------------------------------------------------------------------------- the two paths in distribution

DRAWS = 300  # per image; 8 images -> 2400 samples per path


def _albumentations_path(cfg: AugmentConfig, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from lggseg.data.dataset import build_augmentation

    aug = build_augmentation(cfg)
    outs, out_masks = [], []
    for d in range(DRAWS):
        for i in range(len(images)):
            aug.set_random_seed(item_seed(0, d, i))
            o = aug(image=images[i], mask=masks[i])
            outs.append(o["image"])
            out_masks.append(o["mask"])
    return np.stack(outs).transpose(0, 3, 1, 2).astype(np.float32), np.stack(out_masks).astype(np.float32)


def _resident_path(cfg: AugmentConfig, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gen = generator(CPU, 0, 0)
    x = _nchw(images).repeat(DRAWS, 1, 1, 1)
    m = torch.from_numpy(masks)[:, None].float().repeat(DRAWS, 1, 1, 1)
    out, out_mask = augment_batch(x, m, cfg, gen)
    return out.numpy(), out_mask[:, 0].numpy()


def _square() -> np.ndarray:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:48] = 1
    return mask


def _both(cfg: AugmentConfig) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    pytest.importorskip("albumentations")
    images = _smooth_images()
    masks = np.repeat(_square()[None], len(images), 0)
    src = _nchw(images).repeat(DRAWS, 1, 1, 1).numpy()
    return {"albumentations": (*_albumentations_path(cfg, images, masks), src),
            "resident": (*_resident_path(cfg, images, masks), src)}


def _agree(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Means of two independent samples agree within 5 standard errors of their difference.

    Both paths draw from the same distribution if they are right, so the difference of the sample
    means is ~N(0, se^2); 5 se makes a false alarm a 1-in-a-million event, while a wrong range,
    probability or order shifts the means by many se at 2400 samples.
    """
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) < 5 * se + 1e-9, f"{what}: {a.mean():.4f} vs {b.mean():.4f} (se {se:.4f})"


def test_channel_dropout_rate_per_channel():
    p = 0.6
    for name, (out, _, _) in _both(AugmentConfig(channel_dropout_p=p, color_jitter_p=0.0)).items():
        zero = (out.reshape(len(out), 3, -1) == 0).all(-1)  # (samples, 3): channel entirely 0
        assert zero.sum(1).max() == 1, name  # never more than one channel
        rate = zero.mean(0)
        se = np.sqrt(p / 3 * (1 - p / 3) / len(out))
        np.testing.assert_allclose(rate, p / 3, atol=5 * se, err_msg=name)


def test_missing_sequence_patterns_rate_and_combination_with_dropout():
    """Each pattern (pre-contrast, post-contrast, both replaced by FLAIR) in p/3 of the samples on both
    paths; with channel dropout on as well, the substitution comes first, so a sample can lose FLAIR
    and keep the other sequences but never shows a zeroed channel copied into the others."""
    p = 0.6
    cfg = AugmentConfig(missing_sequence_p=p, channel_dropout_p=0.0, color_jitter_p=0.0)
    rates = {}
    for name, (out, _, src) in _both(cfg).items():
        same = (out[:, :, None] == out[:, None, :]).reshape(len(out), 3, 3, -1).all(-1)  # (samples, 3, 3)
        eq = lambda a, b, same=same: same[:, a, b]  # noqa: E731
        changed = (out != src).reshape(len(out), -1).any(1)
        kinds = np.stack([eq(0, 1) & ~eq(2, 1), eq(2, 1) & ~eq(0, 1), eq(0, 1) & eq(2, 1)], 1)
        assert (kinds.sum(1) == changed).all(), name  # every change is one of the three patterns
        np.testing.assert_array_equal(out[:, 1], src[:, 1], err_msg=name)  # FLAIR itself never changes
        se = np.sqrt(p / 3 * (1 - p / 3) / len(out))
        np.testing.assert_allclose(kinds.mean(0), p / 3, atol=5 * se, err_msg=name)
        rates[name] = kinds.argmax(1) + 3 * ~changed
    _agree(rates["albumentations"].astype(float), rates["resident"].astype(float), "pattern")
    both = AugmentConfig(missing_sequence_p=1.0, channel_dropout_p=1.0, color_jitter_p=0.0)
    for name, (out, _, _) in _both(both).items():
        zero = (out.reshape(len(out), 3, -1) == 0).all(-1)
        assert (zero.sum(1) == 1).all(), name  # exactly one channel dropped after the substitution


def test_missing_sequence_off_draws_nothing():
    """p 0 leaves the resident path's random stream (and so every earlier run) as it was."""
    x = _nchw(_smooth_images(4))
    m = torch.zeros(4, 1, 64, 64)
    a, _ = augment_batch(x, m, AugmentConfig(), generator(CPU, 3, 1))
    b, _ = augment_batch(x, m, AugmentConfig(missing_sequence_p=0.0), generator(CPU, 3, 1))
    c, _ = augment_batch(x, m, AugmentConfig(missing_sequence_p=1e-9), generator(CPU, 3, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # a non-zero p draws first: the later draws move


def _implied(name: str, out: np.ndarray, src: np.ndarray) -> np.ndarray:
    """The factor each sample was given, recovered from the output (clipping and rounding aside)."""
    out, src = out.reshape(len(out), 3, -1).astype(np.float64), src.reshape(len(src), 3, -1).astype(np.float64)
    if name == "brightness":
        return out.sum((1, 2)) / src.sum((1, 2))
    if name == "contrast":  # deviations from the grey mean scale by f
        return out.std((1, 2)) / src.std((1, 2))
    g = gray(torch.from_numpy(src.reshape(len(src), 3, 64, 64)))[:, 0].numpy().reshape(len(src), 1, -1)
    return (out - g).std((1, 2)) / (src - g).std((1, 2))  # saturation: deviations from the grey image


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_colour_factor_ranges_agree(name):
    x = 0.3
    cfg = AugmentConfig(channel_dropout_p=0.0, color_jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    cfg = AugmentConfig(**{**cfg.__dict__, name: x})
    factors = {}
    for path, (out, _, src) in _both(cfg).items():
        f = _implied(name, out, src)
        # uniform in [1 - x, 1 + x] (a rounding step may move the recovered value by ~1 %)
        assert f.min() > 1 - x - 0.02 and f.max() < 1 + x + 0.02, path
        assert f.min() < 1 - x + 0.03 and f.max() > 1 + x - 0.03, path  # the whole range is drawn
        factors[path] = f
    _agree(factors["albumentations"], factors["resident"], name)
    _agree(factors["albumentations"] ** 2, factors["resident"] ** 2, f"{name} (second moment)")


def test_jitter_probability_and_order_agree():
    """With p 0.5 half the samples are untouched; with all three operations the result depends on their
    order (contrast after a brightness change sees another mean), so the spread of outputs must agree too."""
    cfg = AugmentConfig(channel_dropout_p=0.0, color_jitter_p=0.5, brightness=0.3, contrast=0.3, saturation=0.3)
    stats = {}
    for path, (out, _, src) in _both(cfg).items():
        untouched = (out == src).reshape(len(out), -1).all(1)
        se = np.sqrt(0.25 / len(out))
        assert abs(untouched.mean() - 0.5) < 5 * se, path
        flat = out.reshape(len(out), -1)
        stats[path] = (flat.mean(1), flat.std(1))
    for k, what in enumerate(("image mean", "image std")):
        _agree(stats["albumentations"][k], stats["resident"][k], what)


def test_full_augmentation_with_extra_agrees_in_mean_std_and_mask_area():
    cfg = AugmentConfig(extra=True)  # the params.yaml strengths plus flip and affine
    stats = {}
    for path, (out, mask, _) in _both(cfg).items():
        flat = out.reshape(len(out), -1)
        area = mask.reshape(len(mask), -1).sum(1)
        # the mask's centre of mass in x: flips move it, and only flips and the affine move the mask
        cx = (mask * np.arange(64)[None, None, :]).reshape(len(mask), -1).sum(1) / np.maximum(area, 1)
        moved = (mask != _square()[None]).any((1, 2))
        stats[path] = (flat.mean(1), flat.std(1), area, cx, moved.astype(np.float64))
        assert set(np.unique(mask)) <= {0.0, 1.0}
    for k, what in enumerate(("image mean", "image std", "mask area", "mask centre x")):
        _agree(stats["albumentations"][k], stats["resident"][k], what)
    # Flip and affine, each with p 0.5 and independent: 3 masks in 4 move. (The albumentations path
    # moves only half: Compose.set_random_seed gives every transform the same seed, so their
    # apply decisions coincide; see the note in lggseg.data.resident.)
    se = np.sqrt(0.75 * 0.25 / len(stats["resident"][4]))
    assert abs(stats["resident"][4].mean() - 0.75) < 5 * se


# --------------------------------------------------------------------------- the batcher


ALWAYS = AugmentConfig(channel_dropout_p=1.0, color_jitter_p=1.0, brightness=0.3, contrast=0.3, saturation=0.3,
                       extra=True)


def _batches(store, epoch: int, seed: int = 7, batch: int = 4, **kw) -> list[dict[str, torch.Tensor]]:
    rb = ResidentBatches(store, np.arange(N), 64, CPU, batch, augment=ALWAYS, seed=seed, shuffle=True, **kw)
    rb.set_epoch(epoch)
    return list(rb)


def test_batches_are_a_function_of_seed_and_epoch():
    store = _store()
    first = _batches(store, 3)
    again = _batches(store, 3)
    assert len(first) == 2 and [len(b["row"]) for b in first] == [4, 2]
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for other in (_batches(store, 4), _batches(store, 3, seed=8)):
        assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))
    rows = torch.cat([b["row"] for b in first])
    assert sorted(rows.tolist()) == list(range(N))  # a permutation of the split


def test_ranks_share_one_permutation_without_overlap():
    store = _store()
    shares = [[b["row"] for b in _batches(store, 2, batch=2, rank=r, world_size=2, drop_last=True)] for r in (0, 1)]
    assert [len(s) for s in shares] == [1, 1]  # 3 rows per rank, one full batch of 2 (drop_last)
    rows = [set(s[0].tolist()) for s in shares]
    assert not rows[0] & rows[1]
    one = torch.cat([b["row"] for b in _batches(store, 2, batch=1)]).tolist()  # the single-process order
    assert shares[0][0].tolist() == one[0:4:2] and shares[1][0].tolist() == one[1:4:2]


@pytest.mark.parametrize("size", [256, 128, 96, 64])
def test_eval_mode_equals_slice_dataset(size):
    store = _store()
    rows = np.array([5, 0, 3, 1])
    rb = ResidentBatches(store, rows, size, CPU, batch_size=3)
    ds = SliceDataset(store, rows, size, None)
    got = list(rb)
    assert len(rb) == 2 and [len(b["row"]) for b in got] == [3, 1]
    batch = {k: torch.cat([b[k] for b in got]) for k in got[0]}
    ref = torch.utils.data.default_collate([ds[k] for k in range(len(ds))])
    assert batch.keys() == ref.keys()
    for k in ref:
        assert batch[k].dtype == ref[k].dtype and batch[k].shape == ref[k].shape, k
        assert torch.equal(batch[k], ref[k]), k  # bit for bit: same resize, same float32 normalisation
    assert batch["image"].shape == (4, 3, size, size) and batch["mask"].shape == (4, 1, size, size)


def test_training_batches_keep_dtypes_and_binary_masks():
    b = _batches(_store(), 0)[0]
    assert b["image"].dtype == torch.float32 and b["mask"].dtype == torch.float32
    assert set(torch.unique(b["mask"]).tolist()) <= {0.0, 1.0}
    assert b["attributes"].shape == (4, A) and b["row"].dtype == torch.int64


def test_resident_bytes():
    # 10 slices at 64 px: 3 image bytes + 1 mask byte per pixel, 4 bytes per attribute, 8 for the row
    assert resident_bytes(10, 64, 5) == 10 * (64 * 64 * 4 + 20 + 8)


@pytest.mark.parametrize(
    ("setting", "device", "free_gib", "expected"),
    [
        ("auto", "cpu", None, "loader"),  # CPU results stay those of the DataLoader path
        ("resident", "cpu", None, "resident"),
        ("loader", "cuda", 80.0, "loader"),
        ("auto", "cuda", 80.0, "resident"),  # 1000 slices at 256 px: 250 MiB, far below a quarter of 80 GiB
        ("auto", "cuda", 0.5, "loader"),  # 250 MiB > a quarter of 0.5 GiB
    ],
)
def test_choose_data_path(monkeypatch, setting, device, free_gib, expected):
    import lggseg.data.resident as R

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(free_gib * 2**30), int(80 * 2**30)))
    path, why = R.choose_data_path(setting, torch.device(device), 1000, 256, 30)
    assert path == expected and why.startswith("train.data_path")


# --------------------------------------------------------------------------- no host data in the training step


class _HostWatch(TorchDispatchMode):
    """Records, while active, every tensor made from host data (``torch.tensor``, ``as_tensor``, ``from_numpy``,
    ``asarray``: on CUDA a copy that the step waits for) and every value read back by the host (``.item()``,
    ``float(t)``, ``bool(t)``, ``if t:``: on CUDA a sync)."""

    FACTORIES = ("tensor", "as_tensor", "from_numpy", "asarray")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.active = False
        for name in self.FACTORIES:
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def factory(*args, **kwargs):
            if self.active:
                self.seen.append(f"torch.{name}")
            return real(*args, **kwargs)

        return factory

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.lift_fresh):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_watch_sees_host_data_and_host_reads(monkeypatch):
    watch = _HostWatch(monkeypatch)
    with watch:
        torch.ones(2) + 1  # device work only
    assert watch.seen == []
    with watch:
        torch.as_tensor(np.zeros(3, np.float32))
        torch.tensor([1.0, 2.0])
        float(torch.ones(2).sum())
    assert set(watch.seen) == {"torch.as_tensor", "torch.tensor", "aten.lift_fresh.default",
                               "aten._local_scalar_dense.default"}


@pytest.mark.parametrize("missing_sequence_p", [0.0, 0.5])
def test_training_steps_on_resident_batches_take_no_host_data(monkeypatch, missing_sequence_p):
    """The resident batch producer and :func:`lggseg.training.step.train_step` (fused Adam, the lease's
    setting) neither make tensors from host data nor read device values, so on CUDA the host can queue
    steps ahead of the device. The first step is outside the watch: Adam creates its state there."""
    from lggseg.config import LossConfig, ModelConfig, TrainConfig
    from lggseg.losses import CompoundLoss
    from lggseg.models import build_model
    from lggseg.training.step import adam, train_step

    torch.manual_seed(0)
    augment = dataclasses.replace(ALWAYS, missing_sequence_p=missing_sequence_p)
    batches = ResidentBatches(_store(), np.arange(N), 64, CPU, 2, augment=augment, seed=1, shuffle=True)
    model = build_model(ModelConfig(encoder="test_efficientnet", pretrained=False, decoder_channels=16,
                                    attribute_hidden=8), A, 64)
    optimizer = adam(model.parameters(), TrainConfig(fused_adam=True))
    loss_fn = CompoundLoss(LossConfig(terms=["bce", "dice", "outlier"], gamma_warmup_epochs=0, gamma_ramp_epochs=0))

    def step(batch):
        return train_step(model, optimizer, loss_fn, batch["image"], batch["mask"], batch["attributes"], 1, False)

    step(next(iter(batches)))
    watch = _HostWatch(monkeypatch)
    batches.set_epoch(1)
    with watch:
        totals = [step(batch)[1] for batch in batches]  # the producer runs inside: batches made as they are needed
    assert watch.seen == []
    assert len(totals) == 3 and all(torch.isfinite(t) for t in totals)
