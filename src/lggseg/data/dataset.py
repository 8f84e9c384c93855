"""Slices of the manifest store as training/evaluation samples (paper section 4.1.3).

Images and masks come straight from the memory-mapped arrays of ``data/manifest`` (no TIFF is
decoded during an epoch), are resized to ``common.image_size`` when it is not the stored 256, and
in training mode pass through the paper's augmentation: random channel dropout and random
brightness, contrast and saturation (albumentations ``ChannelDropout`` and ``ColorJitter``).
Flips and a small affine transform are added only with ``train.augment.extra`` (not in the paper).

Augmentation randomness is a pure function of ``(seed, epoch, row)``: each item reseeds the
albumentations pipeline from those three numbers. The outcome is therefore the same whatever the
number of DataLoader workers, the order of the samples, the number of DDP ranks or where a resumed
run restarts. :class:`EpochSampler` passes the epoch to the workers with every index, which also
works with persistent workers (they never see a ``set_epoch`` made in the main process).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from lggseg.config import AugmentConfig
from lggseg.errors import DataError

if TYPE_CHECKING:
    from lggseg.data.store import Store

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize_image(image: np.ndarray) -> np.ndarray:
    """x/255, then ImageNet mean/std (the encoders' pretraining), channels first.

    Args:
        image: uint8 ``(H, W, 3)``; anything else raises :class:`~lggseg.errors.DataError`.

    Returns:
        float32 ``(3, H, W)``, C-contiguous.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"normalize_image expects an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise DataError(f"normalize_image expects uint8 pixels, got {image.dtype}")
    x = image.astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@functools.cache
def _opencv() -> Any:
    """OpenCV, or None where it is not installed (imported here, not at the top: see :func:`resize_pair`)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` x ``size``: area averaging for the image, nearest neighbour so the mask stays binary.

    With OpenCV (installed with albumentations) ``cv2.resize``; without it (a lean environment:
    the device-resident path and evaluation need neither) :func:`resize_images` / :func:`resize_masks`,
    which give OpenCV's pixels when downscaling (``tests/data/test_resident.py`` compares them).

    Args:
        image: uint8 ``(H, W, 3)``.
        mask: uint8 ``(H, W)``.
        size: target side.

    Returns:
        ``(image (size, size, 3), mask (size, size))`` uint8; the inputs themselves when already
        ``size`` x ``size``. An empty mask stays empty.
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image, mask
    cv2 = _opencv()
    if cv2 is None:
        return (resize_images(torch.from_numpy(np.ascontiguousarray(image))[None], size)[0].numpy(),
                resize_masks(torch.from_numpy(np.ascontiguousarray(mask))[None], size)[0].numpy())
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


def area_weights(src: int, dst: int, device: torch.device | None = None) -> torch.Tensor:
    """The matrix of ``cv2.INTER_AREA`` downscaling along one axis.

    Returns:
        float32 ``(dst, src)`` on ``device``: the share of each source pixel in each target pixel
        (each row sums to 1).
    """
    scale = src / dst
    i = torch.arange(dst, dtype=torch.float64)[:, None]
    j = torch.arange(src, dtype=torch.float64)[None, :]
    overlap = (torch.minimum((i + 1) * scale, j + 1) - torch.maximum(i * scale, j)).clamp_min(0)
    return (overlap / scale).to(device=device, dtype=torch.float32)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images resized as ``cv2.resize(..., INTER_AREA)`` does when downscaling.

    Upscaling (a size above the stored one) is bilinear, which is close to but not OpenCV's area upscaling.

    Args:
        images: uint8 ``(N, H, W, 3)``, on any device.
        size: target side.

    Returns:
        uint8 ``(N, size, size, 3)`` on the same device (``images`` itself when already that size).
    """
    n, h, w, _ = images.shape
    if h == size and w == size:
        return images
    x = images.permute(0, 3, 1, 2).float()
    if size > h or size > w:
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).round()
    else:
        wy, wx = area_weights(h, size, images.device), area_weights(w, size, images.device)
        out = wy @ x @ wx.T
        # OpenCV's factor-2 path rounds half up ((a+b+c+d+2)>>2); its general path rounds half to even.
        out = torch.floor(out + 0.5) if (h == 2 * size and w == 2 * size) else out.round()
    return out.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Masks resized by nearest neighbour (the pixels ``cv2.INTER_NEAREST`` picks), so they stay binary.

    Args:
        masks: uint8 ``(N, H, W)``.
        size: target side.

    Returns:
        uint8 ``(N, size, size)`` (``masks`` itself when already that size); empty masks stay empty.
    """
    if masks.shape[1] == size and masks.shape[2] == size:
        return masks
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)


# The Kaggle LGG images are (pre-contrast, FLAIR, post-contrast); a sequence that was not acquired is
# stored as a copy of FLAIR. In the 94-case copy 4 cases lack post-contrast (channel 2 == channel 1) and
# 4 have FLAIR only (all three equal), 2 of them in the 14-patient test split against 1 in the 66 train
# patients. ``train.augment.missing_sequence_p`` shows the network such slices: with that probability one
# of these patterns, chosen uniformly, replaces the marked channels by FLAIR.
MISSING_SEQUENCE_PATTERNS = ((True, False, False), (False, False, True), (True, False, True))


def missing_sequence_channels(image: np.ndarray, pattern: int) -> np.ndarray:
    """A copy of ``image (H, W, 3)`` with the channels of ``MISSING_SEQUENCE_PATTERNS[pattern]`` replaced by FLAIR (channel 1)."""
    out = image.copy()
    for c, missing in enumerate(MISSING_SEQUENCE_PATTERNS[pattern]):
        if missing:
            out[..., c] = image[..., 1]
    return out


def _missing_sequence_transform(p: float) -> Any:
    """An albumentations transform applying :func:`missing_sequence_channels` with probability ``p``."""
    import albumentations as A

    class MissingSequence(A.ImageOnlyTransform):
        def get_params(self) -> dict[str, Any]:
            return {"pattern": self.py_random.randrange(len(MISSING_SEQUENCE_PATTERNS))}

        def apply(self, img: np.ndarray, pattern: int = 0, **params: Any) -> np.ndarray:
            return missing_sequence_channels(img, pattern)

    return MissingSequence(p=p)


# Each transform draws from its own stream, numbered as below; a transform added later takes a new
# number, so the streams of the others (and the runs made before it) do not change.
_STREAM = {"ChannelDropout": 0, "ColorJitter": 1, "HorizontalFlip": 2, "Affine": 3, "MissingSequence": 4}


def build_augmentation(cfg: AugmentConfig) -> Any:
    """The section 4.1.3 augmentation (an albumentations ``Compose``); ``cfg.extra`` adds flips and a small
    affine transform, ``cfg.missing_sequence_p`` the missing-sequence patterns (before everything else). :mod:`lggseg.data.resident` implements the same operations as batched tensor operations."""
    # Imported here: evaluation and the device-resident training path must run without albumentations.
    try:
        import albumentations as A
    except ImportError as exc:
        raise DataError("training on the DataLoader path augments with albumentations, which cannot be imported "
                        f"({exc}); install it, or set train.data_path: resident (augmentation as tensor operations)") from exc

    transforms: list[Any] = []
    if cfg.missing_sequence_p > 0:
        # first: the acquisition comes before any augmentation of the paper's
        transforms.append(_missing_sequence_transform(cfg.missing_sequence_p))
    transforms += [
        # Drop one of the three MRI sequences (pre-contrast, FLAIR, post-contrast) at random.
        A.ChannelDropout(channel_drop_range=(1, 1), fill=0, p=cfg.channel_dropout_p),
        # The paper names brightness, contrast and saturation only, so hue is left alone.
        A.ColorJitter(
            brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=0.0, p=cfg.color_jitter_p
        ),
    ]
    if cfg.extra:
        transforms += [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.5),
        ]
    return A.Compose(transforms)


def item_seed(seed: int, epoch: int, row: int) -> int:
    """A well-mixed 32-bit seed for one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1)[0])


class SliceDataset(Dataset):
    """Slices ``indices`` of a manifest store as dicts of tensors.

    Item ``k`` (or ``(k, epoch)``, as :class:`EpochSampler` yields) is
    ``{"image": float32 (3,H,W), "mask": float32 (1,H,W) in {0,1}, "attributes": float32 (A,), "row": int64}``.
    ``augment=None`` gives evaluation mode (no randomness at all).
    """

    def __init__(
        self,
        store: Store,
        indices: np.ndarray | list[int],
        image_size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self._images = store.images
        self._masks = store.masks
        self.indices = np.asarray(indices, dtype=np.int64)
        n = len(store.images)
        if store.images.shape[1:3] != store.masks.shape[1:3] or len(store.masks) != n:
            raise DataError(f"SliceDataset: images {store.images.shape} and masks {store.masks.shape} do not match")
        if self.indices.ndim != 1:
            raise DataError(f"SliceDataset: indices must be 1-D, got shape {self.indices.shape}")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n):
            raise DataError(f"SliceDataset: indices out of range for a store of {n} slices")
        if image_size <= 0:
            raise DataError(f"SliceDataset: image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._transform = build_augmentation(augment) if augment is not None else None
        attrs = np.asarray(store.attributes, dtype=np.float32)
        self._attributes = attrs if attrs.ndim == 2 else attrs.reshape(n, -1)

    def __len__(self) -> int:
        return len(self.indices)

    # Pickling a np.memmap copies its whole content; DataLoader workers started with spawn or
    # forkserver would each receive the full image array. Send the file reference instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_images", "_masks"):
            arr = state[key]
            if isinstance(arr, np.memmap) and arr.filename is not None:
                state[key] = ("memmap", arr.filename, arr.dtype.str, arr.shape, arr.offset)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("_images", "_masks"):
            ref = state[key]
            if isinstance(ref, tuple) and ref and ref[0] == "memmap":
                _, filename, dtype, shape, offset = ref
                state[key] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer keys (``EpochSampler`` keys carry their own)."""
        self.epoch = int(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        k, epoch = (key if isinstance(key, tuple) else (key, self.epoch))
        row = int(self.indices[k])
        image = np.asarray(self._images[row])
        mask = np.asarray(self._masks[row])
        image, mask = resize_pair(image, mask, self.image_size)
        if self._transform is not None:
            seed = item_seed(self.seed, epoch, row)
            self._transform.set_random_seed(seed)
            # albumentations 2.0's Compose.set_random_seed hands every transform the same seed, so their
            # draws would coincide (a flip only ever with the affine, channel dropout only with colour
            # jitter); each transform gets a stream of its own.
            for transform in self._transform.transforms:
                transform.set_random_seed(item_seed(seed, _STREAM[type(transform).__name__], 1))
            out = self._transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(normalize_image(image)),
            "mask": torch.from_numpy((mask > 0).astype(np.float32)[None]),
            "attributes": torch.from_numpy(self._attributes[row].copy()),
            "row": torch.tensor(row, dtype=torch.int64),
        }


class EpochSampler(Sampler):
    """Wraps an index sampler (e.g. ``DistributedSampler``) and yields ``(index, epoch)`` keys.

    ``set_epoch`` reaches the wrapped sampler too, so one call per epoch sets both the shuffle
    order and the augmentation stream.
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.sampler:
            yield (int(i), self.epoch)

    def __len__(self) -> int:
        return len(self.sampler)


class EmptySliceSubsampler(Sampler):
    """Each epoch: every tumour slice plus a fresh random ``fraction`` of the tumour-free ones, shuffled
    (and, with ``limit``, cut to the first ``limit`` of that order: a random subset of that size).

    Two thirds of the LGG slices have an empty mask; on a small compute budget (the laptop recipe)
    seeing all of them every epoch spends most of the time on the easy case. The draw and the order
    are functions of ``(seed, epoch)`` alone, so a resumed run replays them; with ``num_replicas``
    processes each rank takes an interleaved share (the total cut to a multiple of the ranks), like
    ``DistributedSampler``. Yields positions into the dataset (``0..len(is_tumour)-1``).
    """

    def __init__(self, is_tumour: np.ndarray, fraction: float, seed: int, num_replicas: int = 1, rank: int = 0,
                 limit: int | None = None) -> None:
        is_tumour = np.asarray(is_tumour, dtype=bool)
        if is_tumour.ndim != 1:
            raise DataError(f"EmptySliceSubsampler: is_tumour must be 1-D, got shape {is_tumour.shape}")
        if not 0 < fraction <= 1:
            raise DataError(f"EmptySliceSubsampler: fraction must be in (0, 1], got {fraction!r}")
        self.tumour = np.flatnonzero(is_tumour)
        self.empty = np.flatnonzero(~is_tumour)
        self.n_empty = int(round(fraction * len(self.empty)))
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.epoch = 0
        if limit is not None and limit < 1:
            raise DataError(f"EmptySliceSubsampler: limit must be None or positive, got {limit!r}")
        drawn = len(self.tumour) + self.n_empty
        self.total = min(drawn, limit if limit is not None else drawn) // self.num_replicas * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def positions(self) -> np.ndarray:
        """All ranks' positions of this epoch, in order (before sharding).

        Returns:
            int ``(total,)`` positions into the dataset: every tumour slice and this epoch's draw of
            empty ones, shuffled, cut to a multiple of the ranks.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        chosen = np.concatenate([self.tumour, rng.choice(self.empty, self.n_empty, replace=False)])
        return rng.permutation(chosen)[: self.total]

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self.positions()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.total // self.num_replicas
