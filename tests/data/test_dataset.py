"""SliceDataset: item shapes/dtypes, ImageNet normalisation, resizing, and augmentation that is
active only in training mode and a pure function of (seed, epoch, row)."""

from __future__ import annotations

import functools
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

from lggseg.config import AugmentConfig
from lggseg.data.dataset import EpochSampler, SliceDataset, item_seed, normalize_image
from lggseg.errors import DataError

N, S, A = 6, 256, 5


def _store(tmp_path=None) -> SimpleNamespace:
    """A store shaped like lggseg.data.manifest's: random slices, a square tumour on odd rows."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8)
    masks = np.zeros((N, S, S), np.uint8)
    masks[1::2, 100:140, 60:120] = 1
    attributes = rng.random((N, A)).astype(np.float32)
    if tmp_path is not None:  # memmaps, as load_store opens them
        np.save(tmp_path / "images.npy", images)
        np.save(tmp_path / "masks.npy", masks)
        images = np.load(tmp_path / "images.npy", mmap_mode="r")
        masks = np.load(tmp_path / "masks.npy", mmap_mode="r")
    return SimpleNamespace(images=images, masks=masks, attributes=attributes)


ALWAYS = AugmentConfig(channel_dropout_p=1.0, color_jitter_p=1.0, brightness=0.3, contrast=0.3, saturation=0.3)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("pixel", "expected"),
    [
        # (x/255 - mean) / std per channel, computed by hand
        ((0, 0, 0), (-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225)),
        ((255, 255, 255), ((1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225)),
        ((51, 102, 204), ((0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225)),
    ],
)
def test_normalize_image_values(pixel, expected):
    img = np.empty((2, 3, 3), np.uint8)
    img[:] = pixel
    out = normalize_image(img)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[c], expected[c], rtol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_normalize_image_rejects(bad):
    with pytest.raises(DataError, match="normalize_image"):
        normalize_image(bad)


# --------------------------------------------------------------------------- items


@pytest.mark.parametrize("size", [256, 64])
def test_item_shapes_and_types(size):
    store = _store()
    ds = SliceDataset(store, np.array([1, 4]), size, None)
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.float32
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert item["attributes"].dtype == torch.float32
    np.testing.assert_array_equal(item["attributes"].numpy(), store.attributes[1])
    assert item["row"].dtype == torch.int64 and int(item["row"]) == 1
    assert int(ds[1]["row"]) == 4


def test_eval_item_is_the_normalised_slice():
    store = _store()
    ds = SliceDataset(store, np.arange(N), S, None)
    for k in (0, 3):
        np.testing.assert_array_equal(ds[k]["image"].numpy(), normalize_image(store.images[k]))
        np.testing.assert_array_equal(ds[k]["mask"].numpy()[0], store.masks[k].astype(np.float32))


def test_resize_averages_image_and_keeps_mask_binary():
    # 4x4 constant blocks: area downsampling to 64 maps each block to one pixel of its value.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    store = _store()
    store.images = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[None].repeat(N, 0)
    ds = SliceDataset(store, np.array([1]), 64, None)
    item = ds[0]
    np.testing.assert_allclose(item["image"].numpy(), normalize_image(blocks), atol=1e-6)
    m = item["mask"].numpy()[0]
    assert set(np.unique(m)) == {0.0, 1.0}
    assert m.sum() == (40 // 4) * (60 // 4)  # the 40x60 square at a quarter of the size


def test_bad_indices_are_rejected():
    with pytest.raises(DataError, match="out of range"):
        SliceDataset(_store(), np.array([0, N]), 64, None)


# --------------------------------------------------------------------------- augmentation


def test_no_augmentation_in_eval_mode():
    ds = SliceDataset(_store(), np.arange(N), 64, None, seed=3)
    a, b = ds[(2, 0)], ds[(2, 5)]
    assert torch.equal(a["image"], b["image"])


def test_augmentation_is_a_function_of_seed_epoch_row():
    store = _store()
    ds = SliceDataset(store, np.arange(N), 64, ALWAYS, seed=7)
    twin = SliceDataset(store, np.arange(N), 64, ALWAYS, seed=7)
    other = SliceDataset(store, np.arange(N), 64, ALWAYS, seed=8)
    plain = SliceDataset(store, np.arange(N), 64, None)
    first = ds[(3, 1)]["image"]
    ds[(0, 0)]  # other items in between change nothing
    assert torch.equal(first, ds[(3, 1)]["image"])
    assert torch.equal(first, twin[(3, 1)]["image"])
    assert not torch.equal(first, ds[(3, 2)]["image"])  # next epoch: new augmentation
    assert not torch.equal(first, other[(3, 1)]["image"])  # other seed
    assert not torch.equal(first, plain[3]["image"])  # augmented at all
    ds.set_epoch(1)
    assert torch.equal(first, ds[3]["image"])  # integer keys use set_epoch


def test_channel_dropout_zeroes_one_channel_and_colour_leaves_the_mask():
    store = _store()
    cfg = AugmentConfig(channel_dropout_p=1.0, color_jitter_p=0.0)
    ds = SliceDataset(store, np.arange(N), S, cfg, seed=0)
    zero = normalize_image(np.zeros((1, 1, 3), np.uint8))[:, 0, 0]
    for k in range(N):
        item = ds[(k, 0)]
        img = item["image"].numpy()
        dropped = [c for c in range(3) if np.allclose(img[c], zero[c])]
        assert len(dropped) == 1
        np.testing.assert_array_equal(item["mask"].numpy()[0], store.masks[k])


@pytest.mark.parametrize(("extra", "geometric"), [(False, False), (True, True)])
def test_extra_augmentation_moves_the_mask_only_when_enabled(extra, geometric):
    store = _store()
    cfg = AugmentConfig(channel_dropout_p=0.0, color_jitter_p=0.0, extra=extra)
    ds = SliceDataset(store, np.arange(N), S, cfg, seed=0)
    moved = any(
        not np.array_equal(ds[(k, e)]["mask"].numpy()[0], store.masks[k]) for k in (1, 3, 5) for e in range(4)
    )
    assert moved is geometric


def test_workers_do_not_change_the_batches(tmp_path):
    ds = SliceDataset(_store(tmp_path), np.arange(N), 64, ALWAYS, seed=11)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(SequentialSampler(ds))
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)
        return [b["image"] for b in loader]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


def test_pickling_sends_memmap_references_not_pixels(tmp_path):
    ds = SliceDataset(_store(tmp_path), np.arange(N), 64, None)
    blob = pickle.dumps(ds)
    assert len(blob) < N * S * S  # far less than the pixels
    clone = pickle.loads(blob)
    assert isinstance(clone._images, np.memmap)
    assert torch.equal(clone[4]["image"], ds[4]["image"])


def test_item_seed_differs_between_coordinates():
    seeds = {item_seed(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(seeds) == 27


# --------------------------------------------------------------------------- EmptySliceSubsampler


def test_empty_slice_subsampler_keeps_every_tumour_slice_and_a_fresh_share_of_the_rest():
    from lggseg.data.dataset import EmptySliceSubsampler

    is_tumour = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=bool)  # 3 tumour, 7 empty
    s = EmptySliceSubsampler(is_tumour, 0.5, seed=4)
    assert len(s) == 3 + 4  # round(0.5 * 7) = 4 empty slices per epoch
    draws = []
    for epoch in range(3):
        s.set_epoch(epoch)
        got = list(s)
        assert len(got) == len(set(got)) == 7
        assert {0, 3, 8} <= set(got)
        draws.append(got)
    s.set_epoch(0)
    assert list(s) == draws[0]  # a function of (seed, epoch): a resumed run replays it
    assert draws[0] != draws[1]
    assert EmptySliceSubsampler(is_tumour, 1.0, seed=4).__len__() == 10


def test_empty_slice_subsampler_shards_like_distributed_sampler():
    from lggseg.data.dataset import EmptySliceSubsampler

    is_tumour = np.arange(11) % 3 == 0  # 4 tumour, 7 empty
    ranks = [EmptySliceSubsampler(is_tumour, 0.4, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    # 4 + round(2.8) = 7 positions, cut to 6 for 2 ranks; the ranks share them without overlap
    shards = [list(r) for r in ranks]
    assert [len(x) for x in shards] == [3, 3] and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(ranks[0].positions().tolist())


def test_empty_slice_subsampler_limit_takes_a_fresh_random_subset_each_epoch():
    from lggseg.data.dataset import EmptySliceSubsampler

    is_tumour = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=bool)  # 3 tumour, 7 empty
    full = EmptySliceSubsampler(is_tumour, 1.0, seed=4)
    cut = EmptySliceSubsampler(is_tumour, 1.0, seed=4, limit=4)
    assert len(cut) == 4
    seen = set()
    for epoch in range(4):
        full.set_epoch(epoch)
        cut.set_epoch(epoch)
        got = list(cut)
        assert got == list(full)[:4]  # the first `limit` of the epoch's order: a uniform random subset
        seen |= set(got)
    assert len(seen) > 4  # the subset changes from epoch to epoch
    assert len(EmptySliceSubsampler(is_tumour, 0.5, seed=4, limit=100)) == 7  # a limit above the draw changes nothing
    two = EmptySliceSubsampler(is_tumour, 1.0, seed=4, num_replicas=2, rank=0, limit=5)
    assert len(two) == 2  # 5 cut to a multiple of the 2 ranks, one half each
    with pytest.raises(DataError, match="limit"):
        EmptySliceSubsampler(is_tumour, 1.0, seed=4, limit=0)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_empty_slice_subsampler_rejects_a_bad_fraction(fraction):
    from lggseg.data.dataset import EmptySliceSubsampler

    with pytest.raises(DataError, match="fraction"):
        EmptySliceSubsampler(np.ones(3, dtype=bool), fraction, seed=0)


def test_each_augmentation_draws_its_own_decision():
    """Flip (p 0.5) and affine (p 0.5) are independent: about a quarter of the items are flipped only.

    albumentations' Compose.set_random_seed gives every transform the same seed; without a stream per
    transform the flip would only ever come with the affine (no item flipped only)."""
    store = _store()
    cfg = AugmentConfig(channel_dropout_p=0.0, color_jitter_p=0.0, extra=True)
    ds = SliceDataset(store, [0] * 1, 64, cfg, seed=3)
    plain = SliceDataset(store, [0], 64, None)[0]["image"].numpy()
    outcomes = {"none": 0, "flip only": 0, "other": 0}
    for epoch in range(120):
        x = ds[(0, epoch)]["image"].numpy()
        if np.array_equal(x, plain):
            outcomes["none"] += 1
        elif np.array_equal(x, plain[:, :, ::-1]):
            outcomes["flip only"] += 1
        else:
            outcomes["other"] += 1
    # Binomial(120, 1/4): 30 expected; 12 is more than 4 standard deviations below
    assert outcomes["flip only"] >= 12 and outcomes["none"] >= 12 and outcomes["other"] >= 40, outcomes


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [  # pixel (pre-contrast 10, FLAIR 20, post-contrast 30) under each missing-sequence pattern
        (0, (20, 20, 30)),  # pre-contrast not acquired
        (1, (10, 20, 20)),  # post-contrast not acquired
        (2, (20, 20, 20)),  # FLAIR only
    ],
)
def test_missing_sequence_channels_copies_flair(pattern, expected):
    from lggseg.data.dataset import missing_sequence_channels

    image = np.zeros((2, 2, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    out = missing_sequence_channels(image, pattern)
    assert out.dtype == np.uint8 and (out == np.array(expected, np.uint8)).all()
    assert (image == np.array([10, 20, 30])).all()  # the input is left alone


def test_missing_sequence_transform_streams_keep_earlier_runs():
    """The augmentation of a run without missing_sequence_p is unchanged by the option's existence: the
    transforms keep their stream numbers (0..3 in the order of the paper's and the extra transforms)."""
    from lggseg.data.dataset import _STREAM, build_augmentation

    names = [type(t).__name__ for t in build_augmentation(AugmentConfig(extra=True)).transforms]
    assert [_STREAM[n] for n in names] == [0, 1, 2, 3]
    with_it = [type(t).__name__ for t in build_augmentation(AugmentConfig(missing_sequence_p=0.5)).transforms]
    assert with_it[0] == "MissingSequence" and _STREAM["MissingSequence"] not in (0, 1, 2, 3)


def test_missing_sequence_in_training_items():
    store = _store()
    cfg = AugmentConfig(missing_sequence_p=1.0, channel_dropout_p=0.0, color_jitter_p=0.0)
    ds = SliceDataset(store, np.arange(N), S, cfg, seed=5)
    plain = SliceDataset(store, np.arange(N), S, None)
    seen = set()
    for epoch in range(6):
        for k in range(N):
            x, ref = ds[(k, epoch)]["image"].numpy(), plain[k]["image"].numpy()
            # normalised per channel, so compare the de-normalised uint8 values
            back = lambda t: np.round((t * np.array([0.229, 0.224, 0.225])[:, None, None]  # noqa: E731
                                       + np.array([0.485, 0.456, 0.406])[:, None, None]) * 255)
            xb, rb = back(x), back(ref)
            np.testing.assert_array_equal(xb[1], rb[1])
            pattern = (np.array_equal(xb[0], rb[1]), np.array_equal(xb[2], rb[1]))
            assert pattern in {(True, False), (False, True), (True, True)}
            seen.add(pattern)
    assert len(seen) == 3  # every pattern occurs over 36 draws
    with pytest.raises(Exception, match="missing_sequence_p"):
        AugmentConfig(missing_sequence_p=1.5)


@pytest.mark.parametrize("size", [64, 96, 128])
def test_resize_without_opencv_gives_opencvs_pixels(size, monkeypatch):
    """A lean environment (no albumentations, so no OpenCV) resizes with torch and gets the same slices."""
    import sys

    from lggseg.data.dataset import resize_pair

    pytest.importorskip("cv2")
    store = _store()
    with_cv2 = [resize_pair(np.asarray(store.images[i]), np.asarray(store.masks[i]), size) for i in range(N)]
    import lggseg.data.dataset as D

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    D._opencv.cache_clear()
    monkeypatch.setattr(D, "_opencv", functools.cache(D._opencv.__wrapped__))  # a fresh cache, dropped afterwards
    assert D._opencv() is None
    for i, (image, mask) in enumerate(with_cv2):
        got_image, got_mask = resize_pair(np.asarray(store.images[i]), np.asarray(store.masks[i]), size)
        assert got_image.dtype == np.uint8 and got_image.shape == (size, size, 3)
        np.testing.assert_array_equal(got_image, image)
        np.testing.assert_array_equal(got_mask, mask)


def test_loader_augmentation_without_albumentations_is_a_user_error(monkeypatch):
    import sys

    from lggseg.data.dataset import build_augmentation
    from lggseg.errors import LggsegError

    monkeypatch.setitem(sys.modules, "albumentations", None)
    with pytest.raises(LggsegError, match="train.data_path: resident"):
        build_augmentation(AugmentConfig())
