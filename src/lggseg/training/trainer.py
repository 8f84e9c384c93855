"""The epochs of one training run: :class:`_Trainer` (loaders, model, optimiser, validation, best weights).

The epoch loop is built from generators so that several runs can be interleaved without a second
loop: :meth:`_Trainer.train_steps` yields after every optimisation step
(:func:`lggseg.training.step.train_step`), :meth:`_Trainer.epoch_steps` adds validation, the epoch's
record and the checkpoint; :func:`drain` runs one to its end. :class:`_Trainer` stays one class in one
file (about 450 of these lines): its generators share the run's state (model, optimiser, RNG, loaders,
best weights), and pieces of it elsewhere would have to pass that state around. Where a run starts
and what it writes at the end is :mod:`lggseg.training.session`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from lggseg.config import ConfigError, RunConfig
from lggseg.data.dataset import EmptySliceSubsampler, EpochSampler, SliceDataset
from lggseg.errors import DataError, TrainingError
from lggseg.runtime import (
    DistInfo,
    _all_sum,
    _barrier,
    machine_facts,
    software_versions,
)
from lggseg.training.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    _cpu_tensors,
    _flatten_optimizer,
    _numpy_rng_state,
    _python_rng_state,
    _set_numpy_rng_state,
    _set_python_rng_state,
    _strip,
    _torch_rng_states,
    _unflatten_optimizer,
    seed_worker,
)
from lggseg.training.records import _Logger
from lggseg.training.step import (
    RECALIBRATION_BATCH,
    StepSetup,
    adam,
    lr_factor,
    recalibrate_batchnorm,
    train_step,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def drain(gen: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end; returns its return value (the uninterleaved use of a step generator)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _slice_dice_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of per-slice Dice of ``logits > 0`` (p > 0.5) vs ``target``; empty/empty = 1."""
    pred = (logits.detach() > 0).flatten(1).float()
    truth = (target > 0.5).flatten(1).float()
    inter = (pred * truth).sum(1)
    denom = pred.sum(1) + truth.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return dice.sum()


# --------------------------------------------------------------------------- training


class _Trainer:
    """The state of one seed's training: data, network, optimizer, best weights, history."""

    def __init__(self, run: RunConfig, store_dir: Path, out_dir: Path, seed: int, info: DistInfo, fingerprint: str,
                 setup: StepSetup, *, store: Any = None, shared: dict[tuple, Any] | None = None,
                 progress: bool = True):
        """``store``: the opened manifest store of ``store_dir`` (opened here when None). ``shared``: a
        cache of device-resident splits that variants trained in one process share (see
        :mod:`lggseg.training.concurrent`). ``progress``: per-step progress bars."""
        from lggseg.data.store import load_store
        from lggseg.losses import CompoundLoss

        self.run, self.cfg, self.seed, self.info = run, run.train, seed, info
        self.out_dir, self.fingerprint = out_dir, fingerprint
        self.label = f"{run.variant} seed {seed}"
        self.cuda = info.device.type == "cuda"
        self.progress = progress
        cfg = run.train

        self.store = store = load_store(store_dir) if store is None else store
        train_idx, val_idx = store.indices("train"), store.indices("val")
        if len(val_idx) == 0:
            raise DataError(f"{store_dir}: the val split is empty; training needs it to pick the best epoch")
        if cfg.batch_size % info.world_size:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
        if len(train_idx) < cfg.batch_size:
            raise DataError(f"{store_dir}: {len(train_idx)} train slices, fewer than train.batch_size {cfg.batch_size}")
        self.n_attributes = int(store.attributes.shape[1])
        if run.model.attributes and self.n_attributes == 0:
            raise DataError(f"{store_dir}: variant {run.variant} uses attributes but the store has none")
        size = run.common.image_size
        batch = cfg.batch_size // info.world_size

        # Each rank validates an interleaved share of the val slices; the sums are all-reduced.
        val_share = val_idx[info.rank :: info.world_size]
        cached = shared is not None and ("train", size) in shared
        self.data_path = self._data_path(len(train_idx) + len(val_share), size, cached)
        self.loader_gen = torch.Generator().manual_seed(seed)
        if self.data_path == "resident":
            if cfg.subsamples_epochs:
                raise ConfigError("train.empty_slice_fraction < 1 and train.epoch_slices need train.data_path: loader "
                                  "(the resident path draws every slice each epoch)")

            # the same contract as the loaders below: shuffled by (seed, epoch), drop_last, the rank's share
            self.train_loader = self._resident(shared, "train", train_idx, size, batch, augment=cfg.augment,
                                               seed=seed, shuffle=True, drop_last=True, rank=info.rank,
                                               world_size=info.world_size)
            self.sampler = self.train_loader
            self.val_loader = self._resident(shared, "val", val_share, size, batch)
            recal = self._recalibration_indices(train_idx)
            self.recal_loader = self._resident(None, "recal", recal, size, RECALIBRATION_BATCH) if len(recal) else None
        else:
            train_ds = SliceDataset(store, train_idx, size, cfg.augment, seed=seed)
            val_ds = SliceDataset(store, val_share, size, None)
            # One shuffling code path for 1..N processes: seeded with seed + epoch, the same on every rank.
            if cfg.subsamples_epochs:
                is_tumour = store.table["tumour_pixels"].to_numpy()[train_idx] > 0
                base = EmptySliceSubsampler(is_tumour, cfg.empty_slice_fraction, seed, info.world_size, info.rank,
                                            limit=cfg.epoch_slices)
            else:
                base = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=seed, drop_last=True)
            self.sampler = EpochSampler(base)
            # drop_last: no ragged last batch (BatchNorm on a batch of one fails; compiled graphs stay static)
            self.train_loader = self._loader(train_ds, batch, self.sampler, drop_last=True)
            self.val_loader = self._loader(val_ds, batch, None, drop_last=False)
            recal = self._recalibration_indices(train_idx)
            self.recal_loader = (self._loader(SliceDataset(store, recal, size, None), RECALIBRATION_BATCH, None, drop_last=False)
                                 if len(recal) else None)

        from lggseg.models import build_model

        torch.manual_seed(seed)  # the same initial weights on every rank and in every rerun
        model = build_model(run.model, self.n_attributes, size)
        if info.distributed:
            torch.manual_seed(seed * 1000 + info.rank)  # but independent dropout / drop-path per rank
        self.setup = setup  # the switches train_variant has applied
        self.memory_format = torch.channels_last if self.setup.channels_last else torch.contiguous_format
        model = model.to(info.device, memory_format=self.memory_format)
        if info.distributed and self.cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # per-GPU batches are small
        self.model = model
        self.optimizer = adam(model.parameters(), cfg)
        self.loss_fn = CompoundLoss(run.loss).to(info.device)

        self.net: nn.Module = torch.compile(model) if self.setup.compile else model
        self.train_net: nn.Module = self.net
        if info.distributed:
            self.train_net = nn.parallel.DistributedDataParallel(self.net, device_ids=[info.device.index] if self.cuda else None)
        # Validation runs at the precision of lggseg.predict (bf16 on CUDA, float32 on CPU), so the
        # stored best_val_dice is what inference with the saved weights reproduces.
        self.val_autocast = torch.autocast(device_type=info.device.type, dtype=torch.bfloat16,
                                           enabled=self.setup.bf16 and self.cuda)

        self.epoch = 0  # epochs completed
        # Epochs this run will do: train.epochs, or fewer once a time budget has measured an epoch.
        self.planned_epochs = cfg.epochs
        self.stop_reason = "completed"
        self.steps_per_epoch = len(self.train_loader)
        self.history: list[dict[str, float]] = []
        self.best_dice, self.best_epoch = -1.0, 0
        self.best_weights: dict[str, torch.Tensor] = {}
        self.files: dict[str, str | None] = {"state": None, "best": None}
        self.best_unsaved = False  # best weights newer than the checkpoint's (train.checkpoint_every > 1)
        self.train_seconds, self.wall_seconds, self.images = 0.0, 0.0, 0

    def _recalibration_indices(self, train_idx: np.ndarray) -> np.ndarray:
        """The train slices of ``train.bn_recalibration_slices`` (a fixed seeded draw; this rank's share)."""
        n = min(self.cfg.bn_recalibration_slices, len(train_idx))
        if n == 0:
            return train_idx[:0]
        chosen = np.sort(np.random.default_rng(self.seed).permutation(len(train_idx))[:n])
        return train_idx[chosen][self.info.rank :: self.info.world_size]

    def _data_path(self, n: int, size: int, cached: bool = False) -> str:
        """``train.data_path`` resolved on this device (the same on every rank); logged once.

        ``cached``: another variant of this process already holds the splits on the device at this
        size, so ``auto`` takes the resident path without asking for more memory.
        """
        from lggseg.data.resident import choose_data_path

        if self.cfg.subsamples_epochs and self.cfg.data_path == "auto":
            path, why = "loader", "train.data_path: auto, and the epoch draw of train.empty_slice_fraction/epoch_slices needs it"
        elif cached and self.cfg.data_path == "auto" and self.info.device.type == "cuda":
            path, why = "resident", "train.data_path: auto, the splits are already on the device (shared)"
        else:
            path, why = choose_data_path(self.cfg.data_path, self.info.device, n, size, self.n_attributes)
        if self.info.distributed and self.cfg.data_path == "auto":
            # resident only if it fits on every rank: all ranks must iterate the same way
            agree = _all_sum(self.info, torch.tensor([float(path == "resident")], device=self.info.device))
            if path == "resident" and int(agree.item()) != self.info.world_size:
                path, why = "loader", f"{why}; another rank lacks the memory"
        if self.info.is_main:
            log.info("%s: data path %s (%s)", self.label, path, why)
        return path

    def _resident(self, shared: dict[tuple, Any] | None, split: str, rows: np.ndarray, size: int, batch: int,
                  **options: Any) -> Any:
        """A :class:`~lggseg.data.resident.ResidentBatches` of ``rows``; with ``shared``, over the one device copy of
        that split at that size that every variant of the process reads (loaded by the first to ask)."""
        from lggseg.data.resident import ResidentBatches

        if shared is None:
            return ResidentBatches(self.store, rows, size, self.info.device, batch, **options)
        key = (split, size)
        if key not in shared:
            shared[key] = ResidentBatches(self.store, rows, size, self.info.device, batch)
        return shared[key].view(batch, **options)

    def _loader(self, ds: SliceDataset, batch: int, sampler: Any, drop_last: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.cuda,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            generator=self.loader_gen,
            drop_last=drop_last,
        )

    # ------------------------------------------------------------------ checkpoint state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a committed checkpoint (an epoch boundary)."""
        tensors, info = state["tensors"], self.info
        self.model.load_state_dict(_strip("model.", tensors))
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        self.best_weights = state["best_tensors"]
        self.epoch, self.history, self.files = state["epoch"], state["history"], state["files"]
        self.best_dice, self.best_epoch = state["best_val_dice"], state["best_epoch"]
        self.train_seconds, self.images = state["train_seconds"], state["train_images"]
        self.wall_seconds = state.get("wall_seconds", self.train_seconds)
        self.planned_epochs = state.get("planned_epochs", self.cfg.epochs)
        self.stop_reason = state.get("stop_reason", "completed")
        _set_python_rng_state(state["rng"]["python"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        self.loader_gen.set_state(tensors["rng.loader"])
        if state["world_size"] == info.world_size:
            torch.set_rng_state(tensors[f"rng.torch_cpu.rank{info.rank}"])
            if self.cuda and f"rng.torch_cuda.rank{info.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.torch_cuda.rank{info.rank}"], info.device)
        else:
            log.warning("%s: checkpoint of %d processes resumed by %d; random streams restart",
                        self.label, state["world_size"], info.world_size)
            torch.manual_seed(self.seed * 1000 + self.epoch * 100 + info.rank)

    def checkpoint(self, ckpt: Checkpoint, improved: bool) -> None:
        """Commit the state after ``self.epoch`` (collective; rank 0 writes)."""
        rng = _torch_rng_states(self.info)
        if not self.info.is_main:
            return
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer)
        tensors = {
            **_cpu_tensors("model.", self.model.state_dict()),
            **_cpu_tensors("", opt_tensors),
            **rng,
            "rng.loader": self.loader_gen.get_state(),
        }
        record = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "variant": self.run.variant,
            "seed": self.seed,
            "epoch": self.epoch,
            "world_size": self.info.world_size,
            "best_val_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "planned_epochs": self.planned_epochs,
            "stop_reason": self.stop_reason,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "train_images": self.images,
            "history": self.history,
            "optimizer": opt_meta,
            "rng": {"python": _python_rng_state(), "numpy": _numpy_rng_state()},
            "files": self.files,
        }
        self.files = ckpt.save(record, tensors, self.best_weights if improved else None)

    # ------------------------------------------------------------------ one epoch

    def _to_device(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dev = self.info.device
        x = b["image"].to(dev, non_blocking=True, memory_format=self.memory_format)
        y = b["mask"].to(dev, non_blocking=True)
        a = b["attributes"].to(dev, non_blocking=True) if self.run.model.attributes else None
        return x, y, a

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pass over the train split; returns device sums ``[loss*n, Dice, n]`` and per-term loss sums."""
        return drain(self.train_steps(epoch))

    def train_steps(self, epoch: int) -> Generator[None, None, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """:meth:`train_epoch` as a generator that yields after every optimisation step, so that
        :mod:`lggseg.training.concurrent` can interleave the steps of several variants; returns the sums."""
        self.sampler.set_epoch(epoch)
        self.train_net.train()
        sums = torch.zeros(3, device=self.info.device)
        parts_sum: dict[str, torch.Tensor] = {}
        steps = len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not (self.info.is_main and self.progress))
        scheduled = self.cfg.lr_schedule != "constant" or self.cfg.warmup_epochs > 0
        for step, b in enumerate(bar, 1):
            x, y, a = self._to_device(b)
            if scheduled:
                lr = self.cfg.lr * lr_factor(self.cfg, epoch * steps + step - 1, steps, self.planned_epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            logits, total, parts = train_step(self.train_net, self.optimizer, self.loss_fn, x, y, a, epoch, self.setup.bf16)
            n = x.shape[0]
            sums[0] += total.detach() * n
            sums[1] += _slice_dice_sums(logits, y)
            sums[2] += n
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float() * n
            if self.progress and (step % self.cfg.log_every == 0 or step == steps):  # the loop's only host syncs
                bar.set_postfix(loss=f"{(sums[0] / sums[2]).item():.4f}")
            yield
        return sums, parts_sum

    @torch.no_grad()
    def validate(self, epoch: int) -> torch.Tensor:
        """``[loss*n, Dice sum, n]`` over the val split, summed over all ranks."""
        self.net.eval()
        sums = torch.zeros(3, device=self.info.device)
        for b in self.val_loader:
            x, y, a = self._to_device(b)
            with self.val_autocast:
                logits = self.net(x, a)
            total, _ = self.loss_fn(logits.float(), y, epoch=epoch)
            sums[0] += total * x.shape[0]
            sums[1] += _slice_dice_sums(logits, y)
            sums[2] += x.shape[0]
        return _all_sum(self.info, sums)

    def run_epoch(self, epoch: int, ckpt: Checkpoint, live: _Logger) -> float:
        """Train and validate epoch ``epoch``, commit the checkpoint; returns the epoch's wall seconds."""
        return drain(self.epoch_steps(epoch, ckpt, live))

    def epoch_steps(self, epoch: int, ckpt: Checkpoint, live: _Logger) -> Generator[None, None, float]:
        """:meth:`run_epoch` as a generator: yields after each training step (validation, the epoch's
        record and the checkpoint follow the last one without a yield). Its wall seconds run from
        the first step to the end, including any other variant's work interleaved with them."""
        t0 = time.perf_counter()
        sums, parts = yield from self.train_steps(epoch)
        t_train = time.perf_counter() - t0
        if self.recal_loader is not None:
            recalibrate_batchnorm(self.model, ((x, a) for x, _, a in map(self._to_device, self.recal_loader)),
                                  self.setup.bf16 and self.cuda)
        val = self.validate(epoch)
        sums = _all_sum(self.info, sums)
        names = sorted(parts)
        part_sums = _all_sum(self.info, torch.stack([parts[k] for k in names])) if names else []
        n = float(sums[2])
        row = {
            "epoch": epoch + 1,
            "train/loss": float(sums[0]) / n,
            "train/dice": float(sums[1]) / n,
            "val/loss": float(val[0] / val[2]),
            "val/dice": float(val[1] / val[2]),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "gamma": self.loss_fn.weights(epoch).get("outlier", 0.0),
        }
        row.update({f"train/loss_{k}": float(v) / n for k, v in zip(names, part_sums, strict=True)})  # unweighted eq. 13 terms
        if not math.isfinite(row["train/loss"]):
            raise TrainingError(f"{self.label}: the training loss became {row['train/loss']} in epoch {epoch + 1}; try a lower train.lr")
        improved = self.selectable(epoch) and row["val/dice"] > self.best_dice
        if improved:
            self.best_dice, self.best_epoch = row["val/dice"], epoch + 1
            self.best_weights = _cpu_tensors("", self.model.state_dict())
        self.epoch = epoch + 1
        self.history.append(row)
        self.train_seconds += t_train
        self.images += int(n)
        seconds = time.perf_counter() - t0
        self.wall_seconds += seconds
        self.plan(seconds)
        self.best_unsaved = self.best_unsaved or improved
        # Not after the run's last epoch: the model and result.json written next are the commit, and the
        # checkpoint would be deleted right after them (for a 1-epoch demo variant of 80M parameters it was
        # 1.3 GB, fsync'd, of nothing). A run that dies in between replays the epochs since the last commit.
        if self.epoch % self.cfg.checkpoint_every == 0 and self.epoch < self.planned_epochs:
            self.checkpoint(ckpt, self.best_unsaved)
            self.best_unsaved = False
        if self.info.is_main:
            # after the commit: a replayed epoch is never logged twice (a resumed run rebuilds the log
            # from the checkpoint's history, so epochs after the last checkpoint are logged anew, once)
            live.log(row)
        _barrier(self.info)
        return seconds

    def selectable(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` may be kept as the best one: its outlier weight is the full ``loss.gamma``.

        During the gamma warm-up and ramp the run is not yet the configured loss; a model picked
        there (often the best early Dice, before the outlier term weighs in) would be reported as
        the outlier variant without having been trained with it. Without the term, any epoch.
        """
        if "outlier" not in self.run.loss.terms:
            return True
        return self.loss_fn.weights(epoch)["outlier"] == float(self.run.loss.gamma)

    def select_last_if_none(self) -> None:
        """No epoch was selectable (training stopped before full gamma): keep the last epoch."""
        if self.best_epoch == 0 and self.history:
            self.best_dice, self.best_epoch = self.history[-1]["val/dice"], self.epoch
            self.best_weights = _cpu_tensors("", self.model.state_dict())

    def selection_rule(self) -> str:
        """How ``best_epoch`` was chosen, in words (recorded in the result)."""
        rule = "best val/dice (slice mean at the model's resolution, empty/empty = 1)"
        if "outlier" not in self.run.loss.terms:
            return f"{rule} over all epochs (no outlier term)"
        gamma = float(self.run.loss.gamma)
        first = next((e + 1 for e in range(self.cfg.epochs) if self.selectable(e)), None)
        if self.best_epoch and self.selectable(self.best_epoch - 1):
            return f"{rule} among the epochs at the full outlier weight gamma={gamma:g} (epoch {first} on)"
        reached = f"not before epoch {first}" if first else "never within train.epochs"
        return (f"last epoch: no trained epoch reached the full outlier weight gamma={gamma:g} ({reached}), "
                f"so the best-validation rule could not apply")

    def plan(self, epoch_seconds: float) -> None:
        """Under ``train.max_minutes``: fix the number of epochs after the first and stop before an
        epoch that would overrun the budget (judged by the last epoch's time).

        Every rank gets the same decision (rank 0's clock), so DDP processes stop together.
        """
        budget = self.cfg.max_minutes
        if budget is None or self.epoch >= self.planned_epochs:
            return
        seconds = torch.tensor([self.wall_seconds, epoch_seconds], dtype=torch.float64)
        if self.info.distributed:
            dist.broadcast(seconds, src=0)
        spent, last = (float(v) for v in seconds)
        budget_s = budget * 60.0
        if self.epoch == 1:
            fits = max(1, int(budget_s // max(last, 1e-9)))
            if fits < self.planned_epochs:
                self.planned_epochs = fits
                self.stop_reason = (f"time budget: train.max_minutes={budget:g} fits {fits} of "
                                    f"{self.cfg.epochs} epochs at {last:.0f} s for the first")
        if self.epoch < self.planned_epochs and spent + last > budget_s:
            self.planned_epochs = self.epoch
            self.stop_reason = (f"time budget: train.max_minutes={budget:g} reached after {self.epoch} of "
                                f"{self.cfg.epochs} epochs ({spent:.0f} s spent, last epoch {last:.0f} s)")

    # ------------------------------------------------------------------ the end

    def result(self) -> dict[str, Any]:
        return {
            "variant": self.run.variant,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
            "best_epoch_gamma": self.history[self.best_epoch - 1]["gamma"] if self.best_epoch else None,
            "selection_rule": self.selection_rule(),
            "epochs": self.cfg.epochs,
            "epochs_done": self.epoch,
            "epochs_planned": self.planned_epochs,
            "stop_reason": self.stop_reason,
            "max_minutes": self.cfg.max_minutes,
            "final": self.history[-1],
            "history": self.history,
            "wall_seconds": round(self.wall_seconds, 3),
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_epoch": round(self.wall_seconds / len(self.history), 3),
            "images_per_second": round(self.images / self.train_seconds, 2) if self.train_seconds > 0 else None,
            "device": self.info.device.type,
            "data_path": self.data_path,
            "world_size": self.info.world_size,
            "hardware": machine_facts(self.info.device, self.setup.bf16),
            "software": software_versions(),
            "pretrained": self.run.model.pretrained,
        }

    def save_best(self, result: dict[str, Any]) -> None:
        from lggseg.models import save_model

        self.model.load_state_dict(self.best_weights)
        meta = {
            "run_config": self.run.to_dict(),
            "seed": self.seed,
            "attribute_names": list(self.store.attribute_names),
            "n_attributes": self.n_attributes,
            "image_size": self.run.common.image_size,
            **{k: result[k] for k in ("best_epoch", "best_val_dice", "epochs", "epochs_done", "stop_reason",
                                      "wall_seconds", "train_seconds",
                                      "images_per_second", "fingerprint")},
            # provenance that evaluation copies into metrics/<variant>.json
            **{k: result[k] for k in ("best_epoch_gamma", "selection_rule", "epochs_planned", "max_minutes", "device",
                                      "world_size", "hardware", "software", "pretrained")},
        }
        save_model(self.model, self.out_dir, meta)

