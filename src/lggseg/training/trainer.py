"""Training of one variant (paper section 4.1.3: Adam, lr 1e-3, seed 23; losses of eq. 13): :class:`Trainer`.

:func:`train_all_seeds` trains every seed of ``run.seeds``, :func:`train_variant` one seed into
``models/<variant>/seed_<seed>/``: a stored result of the same configuration is returned, else a
:class:`Trainer` (fresh or from the checkpoint, :func:`~lggseg.training.checkpoint.resume_point`) runs
:meth:`Trainer.fit`: while epochs remain, :meth:`Trainer.step` (one optimisation step on the next batch;
after the epoch's last batch :meth:`Trainer.end_epoch`: validate, select the best weights, log the epoch,
re-plan under the time budget, commit a checkpoint); then :meth:`Trainer.finish` writes the best
weights (:func:`lggseg.models.save_model`) and ``result.json``, the completion marker, and removes the
checkpoint. :func:`lggseg.training.concurrent.train_variants` calls the ``step`` of several trainers in turns.

One code path serves CPU, one GPU and ``torchrun --nproc_per_node N`` (DistributedDataParallel;
``train.batch_size`` is the global batch, split over the ranks; only rank 0 logs and writes). The
shuffle order and the augmentation are functions of ``(seed, epoch)`` (:mod:`lggseg.training.batches`),
so a run resumed from its last checkpoint (:mod:`lggseg.training.checkpoint`, every
``train.checkpoint_every`` epochs but the last) ends, on CPU, with the weights of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from lggseg.config import RunConfig
from lggseg.data.store import Store, load_store
from lggseg.errors import TrainingError
from lggseg.io import write_json
from lggseg.runtime import DistInfo, all_sum, barrier, init_distributed
from lggseg.training.batches import Batches, make_batches
from lggseg.training.budget import epoch_estimate, plan_epochs
from lggseg.training.checkpoint import (
    RESULT_FILE,
    Checkpoint,
    TrainState,
    capture_rng,
    cpu_copy,
    restore_rng,
    resume_point,
    seed_everything,
)
from lggseg.training.records import EpochLog, model_meta, run_result
from lggseg.training.step import (
    StepSetup,
    adam,
    applied,
    lr_factor,
    recalibrate_batchnorm,
    step_setup,
    train_step,
)

log = logging.getLogger(__name__)


def slice_dice_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of per-slice Dice of ``logits > 0`` (p > 0.5) vs ``target``; empty/empty = 1."""
    pred = (logits.detach() > 0).flatten(1).float()
    truth = (target > 0.5).flatten(1).float()
    inter = (pred * truth).sum(1)
    denom = pred.sum(1) + truth.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return dice.sum()


@torch.no_grad()
def validation_sums(net: nn.Module, data: Batches, loss_fn: nn.Module, epoch: int, bf16: bool) -> torch.Tensor:
    """``[loss*n, Dice sum, n]`` of ``net`` over ``data.val`` (this process's share; the caller sums over ranks).

    What :meth:`Trainer.end_epoch` validates with (and ``lggseg preflight``). ``net`` is left in eval
    mode; ``loss_fn`` is the run's loss at ``epoch``; ``bf16``: the run's (:class:`StepSetup`). Validation runs
    at the precision of :mod:`lggseg.inference` (bf16 autocast on CUDA if ``bf16``, float32 on the CPU),
    so the stored ``best_val_dice`` is what inference with the saved weights reproduces.
    """
    net.eval()
    device = data.device
    sums = torch.zeros(3, device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    for b in data.val:
        x, y, a = data.to_device(b)
        with autocast:
            logits = net(x, a)
        total, _ = loss_fn(logits.float(), y, epoch=epoch)
        sums[0] += total * x.shape[0]
        sums[1] += slice_dice_sums(logits, y)
        sums[2] += x.shape[0]
    return sums


class Trainer:
    """One seed's training: batches, network, optimiser, loss and its :class:`TrainState`.

    Create it under :func:`applied` of ``setup``; it seeds every random stream itself. ``state``: a
    checkpoint's, to continue from (its tensors go into the model and optimiser). ``store``: the opened
    store of ``store_dir``; ``shared``: device-resident splits shared by the runs of one process
    (:mod:`lggseg.training.concurrent`); ``progress=False`` logs one line per epoch instead of bars.
    """

    def __init__(self, run: RunConfig, store_dir: Path, out_dir: Path, seed: int, info: DistInfo, setup: StepSetup,
                 fingerprint: str, state: TrainState | None = None, *, store: Store | None = None,
                 shared: dict[tuple, Any] | None = None, progress: bool = True) -> None:
        from lggseg.losses import CompoundLoss
        from lggseg.models import build_model

        self.run, self.cfg, self.seed, self.info, self.setup = run, run.train, seed, info, setup
        self.out_dir, self.fingerprint, self.progress = out_dir, fingerprint, progress
        self.label = f"{run.variant} seed {seed}"
        self.cuda = info.device.type == "cuda"
        seed_everything(seed + info.rank)
        self.store = load_store(store_dir) if store is None else store
        self.data = make_batches(run, self.store, store_dir, seed, info, setup.channels_last, self.label, shared)
        self.steps_per_epoch = len(self.data.train)

        torch.manual_seed(seed)  # the same initial weights on every rank and in every rerun
        model = build_model(run.model, self.data.n_attributes, run.common.image_size)
        if info.distributed:
            torch.manual_seed(seed * 1000 + info.rank)  # but independent dropout / drop-path per rank
        model = model.to(info.device, memory_format=self.data.memory_format)
        if info.distributed and self.cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # per-GPU batches are small
        self.model = model
        self.optimizer = adam(model.parameters(), self.cfg)
        self.loss_fn = CompoundLoss(run.loss, self.cfg.epochs).to(info.device)
        self.net: nn.Module = torch.compile(model) if setup.compile else model
        self.train_net: nn.Module = self.net
        if info.distributed:
            self.train_net = nn.parallel.DistributedDataParallel(self.net, device_ids=[info.device.index] if self.cuda else None)

        self.state = TrainState(planned_epochs=self.cfg.epochs)
        if state is not None:
            self.restore(state)
        self.loss_fn.planned_epochs = self.state.planned_epochs  # a gamma schedule in fractions follows the plan
        self.best_unsaved = False  # best weights newer than the checkpoint's (train.checkpoint_every > 1)
        self.batches: Any = None  # the running epoch's batch iterator; None between epochs
        self.t_mark: float | None = None  # when the previous epoch's wall seconds were taken (the budget's clock)
        self.checkpoint = Checkpoint(out_dir, fingerprint)
        params = {"variant": run.variant, "seed": seed, "encoder": run.model.encoder, "image_size": run.common.image_size,
                  "epochs": self.cfg.epochs, "batch_size": self.cfg.batch_size, "lr": self.cfg.lr,
                  "world_size": info.world_size, "device": info.device.type}
        self.epoch_log = EpochLog(out_dir, info.is_main, params, self.state.history)
        self.bar = tqdm(desc=self.label, unit="epoch", initial=self.state.epoch, total=self.state.planned_epochs,
                        disable=not (info.is_main and progress))

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.state.planned_epochs

    def fit(self) -> dict[str, Any]:
        """Every planned epoch, one :meth:`step` at a time; then the best model and ``result.json``."""
        while not self.done:
            self.step()
        return self.finish()

    def step(self) -> None:
        """One optimisation step on the epoch's next batch; after the epoch's last batch, :meth:`end_epoch`."""
        if self.batches is None:
            self.start_epoch()
        epoch, k = self.state.epoch, self.batch
        b = next(self.batches)
        x, y, a = self.data.to_device(b)
        if self.cfg.lr_schedule != "constant" or self.cfg.warmup_epochs > 0:
            lr = self.cfg.lr * lr_factor(self.cfg, epoch * self.steps_per_epoch + k, self.steps_per_epoch,
                                         self.state.planned_epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        logits, total, parts = train_step(self.train_net, self.optimizer, self.loss_fn, x, y, a, epoch, self.setup.bf16)
        n = x.shape[0]
        self.sums[0] += total.detach() * n
        self.sums[1] += slice_dice_sums(logits, y)
        self.sums[2] += n
        for name, v in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + v.detach().float() * n
        self.batch = k = k + 1
        self.step_bar.update(1)
        if self.progress and (k % self.cfg.log_every == 0 or k == self.steps_per_epoch):  # the loop's only host syncs
            self.step_bar.set_postfix(loss=f"{(self.sums[0] / self.sums[2]).item():.4f}")
        if k == self.steps_per_epoch:
            self.end_epoch()

    def start_epoch(self) -> None:
        """The epoch's shuffle order and augmentation, its sums and its clock. Its wall seconds (the time
        budget's) run from where the previous epoch's stopped (here, for the first of this process) to the
        end of this one's validation: contiguous, so the previous epoch's checkpoint and log, and any
        other run's turns in between (its validation, checkpoint, a finished run's evaluation), count."""
        self.t0 = time.perf_counter()
        self.t_wall0 = self.t0 if self.t_mark is None else self.t_mark
        self.data.sampler.set_epoch(self.state.epoch)
        self.train_net.train()
        self.sums = torch.zeros(3, device=self.info.device)  # [loss * n, Dice sum, n] on the device
        self.parts: dict[str, torch.Tensor] = {}  # per-term loss sums
        self.batch = 0
        self.batches = iter(self.data.train)
        self.step_bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.state.epoch + 1}/{self.cfg.epochs}",
                             leave=False, disable=not (self.info.is_main and self.progress))

    def end_epoch(self) -> None:
        """Validate, select the best weights, record and log the epoch, re-plan, commit a checkpoint."""
        state, epoch = self.state, self.state.epoch
        self.batches = None
        self.step_bar.close()
        t_train = time.perf_counter() - self.t0
        if self.data.recal is not None:
            recalibrate_batchnorm(self.model, ((x, a) for x, _, a in map(self.data.to_device, self.data.recal)),
                                  self.setup.bf16 and self.cuda)
        val = self.validate(epoch)
        sums = all_sum(self.info, self.sums)
        names = sorted(self.parts)
        part_sums = all_sum(self.info, torch.stack([self.parts[k] for k in names])) if names else []
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
        improved = self.selectable(row) and row["val/dice"] > state.best_val_dice
        if improved:
            state.best_val_dice, state.best_epoch = row["val/dice"], epoch + 1
            state.best_weights = cpu_copy(self.model.state_dict())
        state.epoch = epoch + 1
        state.history.append(row)
        state.train_seconds += t_train
        state.train_images += int(n)
        self.t_mark = time.perf_counter()
        seconds = self.t_mark - self.t_wall0
        state.wall_seconds += seconds
        state.epoch_seconds.append(seconds)
        self.plan()
        self.best_unsaved = self.best_unsaved or improved
        # Not after the run's last epoch: the model and result.json written next are the commit, and the
        # checkpoint would be deleted right after them (for a 1-epoch demo variant of 80M parameters it was
        # 1.3 GB, fsync'd, of nothing). A run that dies in between replays the epochs since the last commit.
        if state.epoch % self.cfg.checkpoint_every == 0 and not self.done:
            self.save_checkpoint()
        if self.info.is_main:
            # after the commit: a replayed epoch is never logged twice (a resumed run rebuilds the log
            # from the checkpoint's history, so epochs after the last checkpoint are logged anew, once)
            self.epoch_log.log(row)
        barrier(self.info)
        self.bar.total = state.planned_epochs
        self.bar.update(1)
        self.bar.set_postfix(val_dice=f"{row['val/dice']:.4f}", best=f"{state.best_val_dice:.4f}")
        if not self.progress and self.info.is_main:
            log.info("%s: epoch %d/%d val/dice %.4f (best %.4f)", self.label, state.epoch, state.planned_epochs,
                     row["val/dice"], state.best_val_dice)

    def validate(self, epoch: int) -> torch.Tensor:
        """``[loss*n, Dice sum, n]`` over the val split, summed over all ranks."""
        return all_sum(self.info, validation_sums(self.net, self.data, self.loss_fn, epoch, self.setup.bf16))

    # ------------------------------------------------------------------ selection and the time budget

    def selectable(self, row: dict[str, float]) -> bool:
        """Whether an epoch (its history ``row``) may be kept as the best one: it trained at the full ``loss.gamma``.

        During the gamma warm-up and ramp the run is not yet the configured loss; a model picked
        there (often the best early Dice, before the outlier term weighs in) would be reported as
        the outlier variant without having been trained with it. Without the term, any epoch.
        """
        return "outlier" not in self.run.loss.terms or row["gamma"] == float(self.run.loss.gamma)

    def plan(self) -> None:
        """Re-plan the epochs under ``train.max_minutes`` (:mod:`lggseg.training.budget`) on rank 0's clock."""
        if self.cfg.max_minutes is None or self.done:
            return
        seconds = [self.state.wall_seconds, epoch_estimate(self.state.epoch_seconds)]
        if self.info.distributed:  # NCCL broadcasts device tensors only, gloo host ones
            device = self.info.device if dist.get_backend() == "nccl" else torch.device("cpu")
            shared = torch.tensor(seconds, dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            seconds = shared.tolist()
        planned, reason = plan_epochs(self.cfg.max_minutes, self.cfg.epochs, self.state.epoch, *seconds)
        self.state.planned_epochs, self.state.stop_reason = planned, reason or "completed"
        self.loss_fn.planned_epochs = planned

    # ------------------------------------------------------------------ checkpoint and the end

    def save_checkpoint(self) -> None:
        """Commit the state after this epoch (collective: every rank's random streams; rank 0 writes)."""
        rng = capture_rng(self.info, self.data.loader_gen)
        if self.info.is_main:
            self.checkpoint.save(dataclasses.replace(self.state, model=self.model.state_dict(),
                                                     optimizer=self.optimizer.state_dict(), rng=rng), self.best_unsaved)
        self.best_unsaved = False

    def restore(self, state: TrainState) -> None:
        """Continue from a checkpoint's state (an epoch boundary)."""
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        if not restore_rng(state.rng, self.info, self.data.loader_gen):
            log.warning("%s: checkpoint of %d processes resumed by %d; random streams restart",
                        self.label, state.rng["world_size"], self.info.world_size)
            torch.manual_seed(self.seed * 1000 + state.epoch * 100 + self.info.rank)
        self.state = dataclasses.replace(state, model={}, optimizer={}, rng={})

    def finish(self) -> dict[str, Any]:
        """Keep the best weights, write the model and ``result.json``, drop the checkpoint; the result."""
        state, info = self.state, self.info
        self.bar.close()
        if state.stop_reason != "completed" and info.is_main:
            log.warning("%s: %s", self.label, state.stop_reason)
        if state.best_epoch == 0 and state.history:  # no epoch was selectable (stopped before full gamma): the last
            state.best_val_dice, state.best_epoch = state.history[-1]["val/dice"], state.epoch
            state.best_weights = cpu_copy(self.model.state_dict())
        result = self.result()
        if result["gamma_reached_full"] is False and info.is_main:
            log.warning("%s: the outlier weight never reached loss.gamma=%g (at most %g in %d epochs); this model was "
                        "not trained with the loss its variant names", self.label, self.run.loss.gamma,
                        result["gamma_max"], state.epoch)
        if info.is_main:
            self.save_best(result)
            write_json(self.out_dir / RESULT_FILE, result)  # the completion marker, after the model
            self.checkpoint.remove()
            self.epoch_log.end()
        barrier(info)
        return result

    def result(self) -> dict[str, Any]:
        return run_result(self.run, self.seed, self.fingerprint, self.state, self.data.path, self.info, self.setup.bf16)

    def save_best(self, result: dict[str, Any]) -> None:
        from lggseg.models import save_model

        self.model.load_state_dict(self.state.best_weights)
        meta = model_meta(self.run, self.seed, list(self.store.attribute_names), self.data.n_attributes, result)
        save_model(self.model, self.out_dir, meta)


# --------------------------------------------------------------------------- the train stage's entry points


def train_variant(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool = True) -> dict[str, Any]:
    """Train seed ``seed`` of ``run`` on the manifest store ``store_dir`` into ``out_dir``.

    Returns the result also written to ``out_dir/result.json`` (best epoch and val Dice, the
    per-epoch history, timings). With ``resume`` a finished run is returned as stored and an
    interrupted one continues from its last checkpoint; without, training starts over.
    """
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    info = init_distributed(run.common.device)
    setup = step_setup(run.train, info.device)
    fingerprint, stored, state = resume_point(run, store_dir, out_dir, seed, resume, info, setup.bf16)
    if stored is not None:
        return stored
    with applied(setup, info.device):
        trainer = Trainer(run, store_dir, out_dir, seed, info, setup, fingerprint, state)
        del state  # its tensors are in the model and the optimiser now
        return trainer.fit()


def train_all_seeds(run: RunConfig, store_dir: Path, models_dir: Path, resume: bool = True) -> dict[str, Any]:
    """Train every seed of ``run.seeds`` into ``models_dir/seed_<s>/``; write ``models_dir/summary.json``.

    ``seed_<s>/`` folders of seeds no longer in ``run.seeds`` are removed first, so that a kept
    output folder (DVC ``persist: true``, needed to resume inside ``dvc repro``) holds exactly the
    models that evaluation should read.
    """
    models_dir = Path(models_dir)
    if int(os.environ.get("RANK", "0")) == 0 and models_dir.is_dir():
        wanted = {f"seed_{s}" for s in run.seeds}
        for stale in models_dir.glob("seed_*"):
            if stale.is_dir() and stale.name not in wanted:
                shutil.rmtree(stale)
    results = {str(s): train_variant(run, store_dir, models_dir / f"seed_{s}", s, resume=resume) for s in run.seeds}
    dices = np.array([r["best_val_dice"] for r in results.values()], dtype=float)
    summary = {
        "variant": run.variant,
        "seeds": list(run.seeds),
        "best_val_dice_mean": float(dices.mean()),
        "best_val_dice_std": float(dices.std(ddof=1)) if len(dices) > 1 else 0.0,
        "per_seed": {s: {k: v for k, v in r.items() if k != "history"} for s, r in results.items()},
    }
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(models_dir / "summary.json", summary)
    return summary
