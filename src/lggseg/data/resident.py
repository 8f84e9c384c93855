"""Device-resident training data: a split of the manifest store as uint8 tensors on the training
device, batched, resized, normalised and augmented there (issue #11; paper section 4.1.3).

The DataLoader path (:mod:`lggseg.data.dataset`) decodes nothing but still runs the augmentation
(albumentations, per sample, on the CPU) in worker processes; on a GPU that trains faster than two
CPU cores can augment, the step waits for the data. Here the split is copied once to the device and
every epoch is tensor operations on whole batches, with the same meaning and parameters:

* resize to ``common.image_size`` once at load time, exactly as :func:`lggseg.data.dataset.resize_pair`
  does with OpenCV: area averaging for the images (the overlap weights of ``cv2.INTER_AREA`` as a
  matrix, rounded to uint8 as OpenCV rounds: half up for a factor of 2, half to even otherwise, which
  reproduces OpenCV bit for bit on the sizes we use), nearest neighbour for the masks (the same
  source pixel as ``cv2.INTER_NEAREST``);
* with ``augment.missing_sequence_p`` > 0, first: with that probability one of
  :data:`lggseg.data.dataset.MISSING_SEQUENCE_PATTERNS` (uniformly) replaces pre-contrast, post-contrast or
  both by FLAIR, as the Kaggle data stores a sequence that was not acquired;
* channel dropout (albumentations ``ChannelDropout(channel_drop_range=(1, 1), fill=0)``): with
  probability ``channel_dropout_p`` one of the three channels, chosen uniformly, is set to 0;
* colour jitter (albumentations 2.0.8 ``ColorJitter`` on uint8, hue 0): with probability
  ``color_jitter_p`` brightness, contrast and saturation factors uniform in ``[1 - x, 1 + x]`` are
  applied in a random order, each step on uint8 values as albumentations does: brightness
  ``floor(clip(v * f))``; contrast ``floor(clip(v * f + m * (1 - f)))`` with ``m`` the mean of the
  image's grey version; saturation ``round(clip(v * f + g * (1 - f)))`` with ``g`` the grey version
  (OpenCV's ``RGB2GRAY``, fixed point: ``(9798 R + 19235 G + 3735 B + 16384) >> 15``);
* with ``augment.extra``: a horizontal flip (p 0.5), then an affine transform (p 0.5; scale x and y
  each in [0.9, 1.1], translation x and y each a whole number of pixels ``int(U(-0.05, 0.05) * size)``,
  rotation in [-10, 10] degrees about the image centre, as albumentations ``Affine`` draws them)
  through ``affine_grid``/``grid_sample``: bilinear for images (rounded to uint8), nearest for masks,
  zeros outside;
* normalisation as :func:`lggseg.data.dataset.normalize_image` (x/255, ImageNet mean/std), the same
  float32 operations, so evaluation mode equals :class:`~lggseg.data.dataset.SliceDataset` exactly.

The random draws differ from the albumentations path (another generator, whole batches), so the two
paths give different weights; ``train.data_path`` is therefore part of a run's fingerprint. What is
the same is the distribution of every augmentation (``tests/test_resident.py`` measures it).

Every operation here draws its own numbers, independently of the others; so does every transform of
the DataLoader path, which seeds each from a stream of its own (``lggseg.data.dataset._STREAM``; albumentations
2.0.8's ``Compose.set_random_seed`` alone would hand all of them the same seed).

Randomness: a ``torch.Generator`` on the device seeded from ``(seed, epoch)`` (the batch order, the
same on every DDP rank) and one seeded from ``(seed, epoch, rank)`` (the augmentation), so an epoch
is a function of the epoch number alone and a run resumes exactly at an epoch boundary.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lggseg.config import AugmentConfig
from lggseg.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MISSING_SEQUENCE_PATTERNS,
    resize_images,
    resize_masks,
)
from lggseg.errors import DataError

if TYPE_CHECKING:
    from lggseg.data.store import Store

# A split is made resident under data_path auto only if it takes at most this share of the free
# device memory: the model, its activations and the optimizer state need the rest.
RESIDENT_SHARE = 0.25
_LOAD_CHUNK = 256  # slices copied and resized at a time (bounds the host and device staging memory)
_GRAY = (9798.0, 19235.0, 3735.0)  # OpenCV's fixed-point RGB2GRAY weights for uint8 (sum 2**15)
_STREAM_ORDER, _STREAM_AUGMENT = 0, 1


def stream_seed(*coords: int) -> int:
    """A well-mixed 63-bit seed from integer coordinates such as ``(seed, epoch, stream, rank)``."""
    state = np.random.SeedSequence([int(c) for c in coords]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def generator(device: torch.device, *coords: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``coords``."""
    return torch.Generator(device=device).manual_seed(stream_seed(*coords))


def resident_bytes(n: int, image_size: int, n_attributes: int) -> int:
    """Device bytes a split of ``n`` slices takes: uint8 images and masks at ``image_size``, float32 attributes."""
    return n * (image_size * image_size * 4 + 4 * n_attributes + 8)


def fits_device(n: int, image_size: int, n_attributes: int, device: torch.device) -> tuple[bool, str]:
    """Whether a split fits comfortably (:data:`RESIDENT_SHARE` of the free memory) on CUDA ``device``; and why."""
    need = resident_bytes(n, image_size, n_attributes)
    free, _ = torch.cuda.mem_get_info(device)
    ok = need <= RESIDENT_SHARE * free
    return ok, f"{need / 2**20:.0f} MiB of data, {free / 2**30:.1f} GiB free on {device}"


# --------------------------------------------------------------------------- resizing (load time)


# --------------------------------------------------------------------------- augmentation (per batch)


def gray(x: torch.Tensor) -> torch.Tensor:
    """Grey version ``(B, 1, H, W)`` of integer-valued float ``(B, 3, H, W)`` RGB, as OpenCV's uint8 ``RGB2GRAY``."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2] + 16384.0) / 32768.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``floor(clip(v * f))`` per sample (``f`` of shape ``(B,)``): albumentations' uint8 lookup table."""
    return torch.floor((x * f.view(-1, 1, 1, 1)).clamp(0, 255))


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``floor(clip(v * f + m * (1 - f)))`` with ``m`` the mean of each image's grey version."""
    f = f.view(-1, 1, 1, 1)
    # the offset in float64, then float32, as albumentations builds its lookup table
    offset = (gray(x).double().mean(dim=(1, 2, 3), keepdim=True) * (1 - f.double())).float()
    return torch.floor((x * f + offset).clamp(0, 255))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``round(clip(v * f + g * (1 - f)))`` with ``g`` the grey image (``cv2.addWeighted``)."""
    f = f.view(-1, 1, 1, 1)
    # OpenCV computes fma(v, f, g * (1 - f)) in float32; float64 reproduces the single rounding of the fma,
    # which decides the ties at .5 the same way
    partial = gray(x) * (1 - f.double()).float()
    return (x.double() * f.double() + partial.double()).float().clamp(0, 255).round()


_CONSTANTS: dict[torch.device, dict[str, torch.Tensor]] = {}


def device_constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The constant tensors of a batch on ``device``, copied from the host once per device and process:
    a copy in every step would make each step wait for the host (no host data enters the step)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _CONSTANTS:
        _CONSTANTS[device] = {
            "mean": torch.as_tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device),
            "std": torch.as_tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device),
            "patterns": torch.tensor(MISSING_SEQUENCE_PATTERNS).to(device),
            "channels": torch.arange(3).to(device),
        }
    return _CONSTANTS[device]


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def affine_theta(scale: torch.Tensor, shift_px: torch.Tensor, degrees: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 2, 3)`` ``affine_grid`` matrices (output -> input, normalised coordinates) of albumentations'
    forward transform ``x' = R(degrees) diag(scale) (x - c) + c + shift`` about the centre ``c``."""
    rad = torch.deg2rad(degrees)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # forward: albumentations' rotation [[cos, sin], [-sin, cos]] times diag(sx, sy); its inverse in
    # closed form, diag(1/sx, 1/sy) R^T (torch.linalg.inv would sync with the host to check for errors)
    sx, sy = scale[:, 0], scale[:, 1]
    inv = torch.stack([torch.stack([cos / sx, -sin / sx], -1), torch.stack([sin / sy, cos / sy], -1)], -2)
    t = shift_px * (2.0 / size)  # pixels -> normalised coordinates (align_corners=False, square image)
    return torch.cat([inv, -(inv @ t[..., None])], dim=-1)


def augment_batch(x: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment float ``(B, 3, H, W)`` images with integer values in [0, 255] and ``(B, 1, H, W)`` masks.

    The operations and their parameters are those of :func:`lggseg.data.dataset.build_augmentation`, in
    its order (missing-sequence patterns when ``cfg.missing_sequence_p`` > 0, channel dropout, colour
    jitter, then with ``cfg.extra`` flip and affine). No host sync.
    """
    b, dev = x.shape[0], x.device
    const = device_constants(dev)
    if cfg.missing_sequence_p > 0:  # drawn only when on, so the streams of runs without it stay as they were
        chosen = torch.rand(b, generator=gen, device=dev) < cfg.missing_sequence_p
        pattern = torch.randint(0, len(MISSING_SEQUENCE_PATTERNS), (b,), generator=gen, device=dev)
        replace = (chosen[:, None] & const["patterns"][pattern])[:, :, None, None]
        x = torch.where(replace, x[:, 1:2].expand_as(x), x)
    # channel dropout: one of the three channels, uniformly, with probability channel_dropout_p
    drop = torch.rand(b, generator=gen, device=dev) < cfg.channel_dropout_p
    channel = torch.randint(0, 3, (b,), generator=gen, device=dev)
    dropped = drop[:, None] & (channel[:, None] == const["channels"][None])
    x = x * (~dropped).to(x.dtype)[:, :, None, None]
    # colour jitter: per sample three factors and a random order of the three operations
    jitter = torch.rand(b, generator=gen, device=dev) < cfg.color_jitter_p
    factors = torch.stack([_uniform(b, max(1 - s, 0.0), 1 + s, gen, dev)
                           for s in (cfg.brightness, cfg.contrast, cfg.saturation)], 1)
    factors = torch.where(jitter[:, None], factors, torch.ones_like(factors))
    order = torch.argsort(torch.rand(b, 3, generator=gen, device=dev), dim=1)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    for position in range(3):
        for k, op in enumerate(ops):
            # a factor of 1 is the identity of every operation: each sample applies only the
            # operation its order puts at this position
            f = torch.where(order[:, position] == k, factors[:, k], torch.ones_like(factors[:, k]))
            x = op(x, f)
    if cfg.extra:
        flip = (torch.rand(b, generator=gen, device=dev) < 0.5)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
        mask = torch.where(flip, mask.flip(-1), mask)
        size = x.shape[-1]
        warp = (torch.rand(b, generator=gen, device=dev) < 0.5)[:, None, None, None]
        scale = _uniform(2 * b, 0.9, 1.1, gen, dev).view(b, 2)
        shift = torch.trunc(_uniform(2 * b, -0.05, 0.05, gen, dev).view(b, 2) * size)
        degrees = _uniform(b, -10.0, 10.0, gen, dev)
        theta = affine_theta(scale, shift, degrees, size)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped_mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        x = torch.where(warp, warped.round().clamp(0, 255), x)
        mask = torch.where(warp, warped_mask, mask)
    return x, mask


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float ``(B, 3, H, W)`` in [0, 255] -> x/255, then ImageNet mean/std (as :func:`lggseg.data.dataset.normalize_image`)."""
    const = device_constants(x.device)
    return (x / 255.0 - const["mean"]) / const["std"]


# --------------------------------------------------------------------------- the batcher


class ResidentBatches:
    """Rows ``indices`` of a manifest store on ``device``, iterated as batches of dicts.

    Each batch is ``{"image": float32 (B,3,H,W), "mask": float32 (B,1,H,W) in {0,1}, "attributes":
    float32 (B,A), "row": int64 (B,)}``, all on ``device``, the keys and meaning of a
    :class:`~lggseg.data.dataset.SliceDataset` batch. ``shuffle``: a permutation per epoch from
    ``(seed, epoch)``, the same on every rank, of which rank ``rank`` takes every ``world_size``-th
    (as ``DistributedSampler``); ``augment=None`` is evaluation mode (no randomness at all).
    Images are channels-last in memory (a free permute of the stored HWC layout).
    """

    def __init__(self, store: Store, indices: np.ndarray, image_size: int, device: torch.device, batch_size: int,
                 augment: AugmentConfig | None = None, seed: int = 0, shuffle: bool = False, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        n_store = len(store.images)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= n_store)):
            raise DataError(f"ResidentBatches: indices must be 1-D rows of a store of {n_store} slices")
        if batch_size <= 0:
            raise DataError(f"ResidentBatches: batch_size must be positive, got {batch_size}")
        self.device, self.image_size, self.batch_size = torch.device(device), int(image_size), int(batch_size)
        self.augment, self.seed, self.shuffle, self.drop_last = augment, int(seed), shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.rows = torch.from_numpy(indices).to(self.device)
        images, masks = [], []
        for start in range(0, len(indices), _LOAD_CHUNK):
            part = indices[start : start + _LOAD_CHUNK]
            images.append(resize_images(torch.from_numpy(np.asarray(store.images[part])).to(self.device), image_size))
            masks.append(resize_masks(torch.from_numpy(np.asarray(store.masks[part])).to(self.device), image_size))
        self.images = torch.cat(images) if images else torch.zeros((0, image_size, image_size, 3), dtype=torch.uint8,
                                                                   device=self.device)
        self.masks = torch.cat(masks) if masks else torch.zeros((0, image_size, image_size), dtype=torch.uint8,
                                                                device=self.device)
        attrs = np.asarray(store.attributes, dtype=np.float32).reshape(n_store, -1)
        self.attributes = torch.from_numpy(attrs[indices]).to(self.device)

    def view(self, batch_size: int, augment: AugmentConfig | None = None, seed: int = 0, shuffle: bool = False,
             drop_last: bool = False, rank: int = 0, world_size: int = 1) -> ResidentBatches:
        """Another batcher over the same device tensors, with its own batching, order and augmentation.

        Several variants trained in one process (:mod:`lggseg.training.concurrent`) read one copy of a split
        this way; nothing is copied, and the tensors are only ever read.
        """
        if batch_size <= 0:
            raise DataError(f"ResidentBatches: batch_size must be positive, got {batch_size}")
        other = copy.copy(self)
        other.batch_size, other.augment, other.seed = int(batch_size), augment, int(seed)
        other.shuffle, other.drop_last, other.rank, other.world_size = shuffle, drop_last, rank, world_size
        other.epoch = 0
        return other

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def _positions(self) -> torch.Tensor:
        """Positions (into this split) that this rank visits this epoch, in order."""
        n = len(self.rows)
        if self.shuffle:
            order = torch.randperm(n, generator=generator(self.device, self.seed, self.epoch, _STREAM_ORDER),
                                   device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        if self.world_size > 1:
            total = (n // self.world_size) * self.world_size if self.drop_last else n
            order = order[:total][self.rank :: self.world_size]
        return order

    def _n_positions(self) -> int:
        n = len(self.rows)
        if self.world_size > 1:
            return n // self.world_size if self.drop_last else len(range(self.rank, n, self.world_size))
        return n

    def __len__(self) -> int:
        n = self._n_positions()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch(self, positions: torch.Tensor, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch of split positions ``positions`` (augmented with ``gen`` in training mode)."""
        x = self.images[positions].permute(0, 3, 1, 2).float()
        y = self.masks[positions][:, None].float()
        if self.augment is not None:
            if gen is None:
                raise ValueError("ResidentBatches.batch: training mode needs a generator")
            x, y = augment_batch(x, y, self.augment, gen)
        return {"image": normalize(x), "mask": (y > 0).float(), "attributes": self.attributes[positions],
                "row": self.rows[positions]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        positions = self._positions()
        gen = (generator(self.device, self.seed, self.epoch, _STREAM_AUGMENT, self.rank)
               if self.augment is not None else None)
        for k in range(len(self)):
            yield self.batch(positions[k * self.batch_size : (k + 1) * self.batch_size], gen)


def choose_data_path(setting: str, device: torch.device, n: int, image_size: int, n_attributes: int) -> tuple[str, str]:
    """``train.data_path`` (auto | loader | resident) -> the path used and why, in words.

    ``auto`` keeps the DataLoader on the CPU (so CPU runs stay exactly as they were) and takes the
    resident path on CUDA when the ``n`` slices fit in :data:`RESIDENT_SHARE` of the free memory.
    """
    if setting != "auto":
        return setting, f"train.data_path: {setting}"
    if device.type != "cuda":
        return "loader", "train.data_path: auto on the CPU"
    fits, facts = fits_device(n, image_size, n_attributes, device)
    return ("resident" if fits else "loader"), f"train.data_path: auto, {facts}"
