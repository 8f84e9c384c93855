"""Where a run's batches come from: the DataLoader over the store or the device-resident split (``train.data_path``).

:func:`make_batches` gives one run's :class:`Batches`: the train batches of an epoch (shuffled by
``(seed, epoch)``, the last ragged batch dropped, this rank's share), the val batches (an interleaved
share of the val slices per rank; the sums are all-reduced) and the optional slices of the
BatchNorm recalibration. Both paths keep that contract; which one a run takes is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lggseg.config import ConfigError, RunConfig
from lggseg.data.dataset import EmptySliceSubsampler, EpochSampler, SliceDataset
from lggseg.data.store import Store
from lggseg.errors import DataError
from lggseg.runtime import DistInfo, all_sum
from lggseg.training.checkpoint import seed_worker
from lggseg.training.step import RECALIBRATION_BATCH

log = logging.getLogger(__name__)


@dataclass
class Batches:
    """One run's batches. ``train`` and ``sampler`` take ``set_epoch``; ``loader_gen`` is the generator the
    DataLoader draws its worker seeds from (part of a checkpoint); ``path`` is ``loader`` or ``resident``."""

    train: Any  # DataLoader or ResidentBatches
    val: Any
    recal: Any | None  # the slices of train.bn_recalibration_slices, or None
    sampler: Any  # what set_epoch reaches: the train sampler, or the resident batches themselves
    loader_gen: torch.Generator
    path: str
    n_attributes: int
    device: torch.device
    memory_format: torch.memory_format  # of the images on the device (and of the model)
    attributes: bool  # whether the model takes the attribute vectors

    def to_device(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(images, masks, attributes or None)`` of batch ``b`` on the device."""
        x = b["image"].to(self.device, non_blocking=True, memory_format=self.memory_format)
        y = b["mask"].to(self.device, non_blocking=True)
        a = b["attributes"].to(self.device, non_blocking=True) if self.attributes else None
        return x, y, a


def make_batches(run: RunConfig, store: Store, store_dir: Path, seed: int, info: DistInfo, channels_last: bool,
                 label: str, shared: dict[tuple, Any] | None = None) -> Batches:
    """The batches of ``run`` (seed ``seed``) on ``info``'s device, images moved there ``channels_last`` or not.
    ``shared``: a cache of device-resident splits that the runs of one process share
    (:mod:`lggseg.training.concurrent`); ``label`` names the run in logs."""
    cfg = run.train
    train_idx, val_idx = store.indices("train"), store.indices("val")
    if len(val_idx) == 0:
        raise DataError(f"{store_dir}: the val split is empty; training needs it to pick the best epoch")
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
    if len(train_idx) < cfg.batch_size:
        raise DataError(f"{store_dir}: {len(train_idx)} train slices, fewer than train.batch_size {cfg.batch_size}")
    n_attributes = int(store.attributes.shape[1])
    if run.model.attributes and n_attributes == 0:
        raise DataError(f"{store_dir}: variant {run.variant} uses attributes but the store has none")
    size = run.common.image_size
    batch = cfg.batch_size // info.world_size
    val_share = val_idx[info.rank :: info.world_size]
    cached = shared is not None and ("train", size) in shared
    path = _data_path(run, info, len(train_idx) + len(val_share), size, n_attributes, cached, label)
    loader_gen = torch.Generator().manual_seed(seed)
    recal = _recalibration_indices(cfg.bn_recalibration_slices, train_idx, seed, info)
    placement = (info.device, torch.channels_last if channels_last else torch.contiguous_format, run.model.attributes)
    if path == "resident":
        if cfg.subsamples_epochs:
            raise ConfigError("train.empty_slice_fraction < 1 and train.epoch_slices need train.data_path: loader "
                              "(the resident path draws every slice each epoch)")

        def resident(cache: dict[tuple, Any] | None, split: str, rows: np.ndarray, batch: int, **options: Any) -> Any:
            # with a cache: a view of the one device copy of that split at that size (loaded by the first to ask)
            from lggseg.data.resident import ResidentBatches

            if cache is None:
                return ResidentBatches(store, rows, size, info.device, batch, **options)
            if (split, size) not in cache:
                cache[split, size] = ResidentBatches(store, rows, size, info.device, batch)
            return cache[split, size].view(batch, **options)

        train = resident(shared, "train", train_idx, batch, augment=cfg.augment, seed=seed, shuffle=True,
                         drop_last=True, rank=info.rank, world_size=info.world_size)
        val = resident(shared, "val", val_share, batch)
        recal_batches = resident(None, "recal", recal, RECALIBRATION_BATCH) if len(recal) else None
        return Batches(train, val, recal_batches, train, loader_gen, path, n_attributes, *placement)

    def loader(ds: SliceDataset, batch: int, sampler: Any, drop_last: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=cfg.num_workers,
                          pin_memory=info.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                          worker_init_fn=seed_worker, generator=loader_gen, drop_last=drop_last)

    train_ds = SliceDataset(store, train_idx, size, cfg.augment, seed=seed)
    # One shuffling code path for 1..N processes: seeded with seed + epoch, the same on every rank.
    if cfg.subsamples_epochs:
        is_tumour = store.table["tumour_pixels"].to_numpy()[train_idx] > 0
        base = EmptySliceSubsampler(is_tumour, cfg.empty_slice_fraction, seed, info.world_size, info.rank,
                                    limit=cfg.epoch_slices)
    else:
        base = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                                  drop_last=True)
    sampler = EpochSampler(base)
    # drop_last: no ragged last batch (BatchNorm on a batch of one fails; compiled graphs stay static)
    train = loader(train_ds, batch, sampler, drop_last=True)
    val = loader(SliceDataset(store, val_share, size, None), batch, None, drop_last=False)
    recal_batches = (loader(SliceDataset(store, recal, size, None), RECALIBRATION_BATCH, None, drop_last=False)
                     if len(recal) else None)
    return Batches(train, val, recal_batches, sampler, loader_gen, path, n_attributes, *placement)


def _recalibration_indices(n: int, train_idx: np.ndarray, seed: int, info: DistInfo) -> np.ndarray:
    """The train slices of ``train.bn_recalibration_slices`` (a fixed seeded draw; this rank's share)."""
    n = min(n, len(train_idx))
    if n == 0:
        return train_idx[:0]
    chosen = np.sort(np.random.default_rng(seed).permutation(len(train_idx))[:n])
    return train_idx[chosen][info.rank :: info.world_size]


def _data_path(run: RunConfig, info: DistInfo, n: int, size: int, n_attributes: int, cached: bool, label: str) -> str:
    """``train.data_path`` resolved on this device (the same on every rank); logged once.

    ``cached``: another variant of this process already holds the splits on the device at this
    size, so ``auto`` takes the resident path without asking for more memory.
    """
    from lggseg.data.resident import choose_data_path

    cfg = run.train
    if cfg.subsamples_epochs and cfg.data_path == "auto":
        path, why = "loader", "train.data_path: auto, and the epoch draw of train.empty_slice_fraction/epoch_slices needs it"
    elif cached and cfg.data_path == "auto" and info.device.type == "cuda":
        path, why = "resident", "train.data_path: auto, the splits are already on the device (shared)"
    else:
        path, why = choose_data_path(cfg.data_path, info.device, n, size, n_attributes)
    if info.distributed and cfg.data_path == "auto":
        # resident only if it fits on every rank: all ranks must iterate the same way
        agree = all_sum(info, torch.tensor([float(path == "resident")], device=info.device))
        if path == "resident" and int(agree.item()) != info.world_size:
            path, why = "loader", f"{why}; another rank lacks the memory"
    if info.is_main:
        log.info("%s: data path %s (%s)", label, path, why)
    return path
