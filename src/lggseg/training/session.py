"""One seed's training from its checkpoint to ``result.json`` (:class:`Session`), and the entry points of
the ``train`` stage: :func:`train_variant` (one seed) and :func:`train_all_seeds` (every seed of a variant).

:func:`resume_point` decides where a run starts: a stored result of the same configuration is returned
as it is, a checkpoint of it is resumed, anything else starts afresh. The epochs themselves are
:class:`lggseg.training.trainer._Trainer`'s.

Training of one variant (paper section 4.1.3: Adam, lr 1e-3, seed 23; losses of eq. 13).

:func:`train_variant` trains one seed of a :class:`~lggseg.config.RunConfig` into
``models/<variant>/seed_<seed>/`` and keeps the weights of the epoch with the best validation Dice
(thresholded predictions at the model resolution, mean over slices, an empty prediction of an
empty mask counts 1). With the outlier term only epochs at its full weight ``loss.gamma`` count (section
3.4: the term is added once training is stable, so an epoch of the warm-up or ramp is not yet the
configured loss); a run that stops before reaching it keeps its last epoch, and ``selection_rule``
in the result says which rule applied. Every epoch is logged with DVCLive (``seed_<seed>/dvclive``) so that
``dvc plots show`` draws the curves; without dvclive installed the same files (``plots/metrics/*.tsv``,
``metrics.json``, ``params.yaml``) and a ``metrics.csv`` are written by :class:`_Logger` itself.
:func:`train_all_seeds` runs every seed of ``run.seeds``.

One code path serves CPU, one GPU and ``torchrun --nproc_per_node N`` (DistributedDataParallel;
``train.batch_size`` is the global batch, split over the ranks; only rank 0 logs and writes).

Reproducibility and resumption
    The shuffle order (``DistributedSampler``, seeded with ``seed + epoch``) and the augmentation
    (seeded per sample from ``(seed, epoch, row)``, see :mod:`lggseg.data.dataset`) are functions of
    the epoch alone; so are the batches of the device-resident path (:mod:`lggseg.data.resident`,
    ``train.data_path``). After every ``train.checkpoint_every`` epochs, and after the last epoch
    of the run, a checkpoint in ``seed_<seed>/checkpoint/`` holds the
    model, the Adam state, the best weights so far, the history and the RNG states (python,
    numpy, torch CPU/CUDA of every rank, DataLoader generator): tensors in safetensors files,
    everything else in ``state.json``, which is written last and atomically and names the tensor
    files it belongs to. A process killed at any moment therefore leaves the previous or the new
    checkpoint, and a restart replays from that epoch boundary; on CPU (deterministic algorithms)
    the final weights and metrics equal those of an uninterrupted run. Nothing is ever unpickled.
    When training ends the best model is written with :func:`lggseg.models.save_model`, then
    ``result.json`` (the completion marker), and the checkpoint is removed; a rerun returns the
    stored result. A checkpoint or result of a different configuration is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lggseg.config import RunConfig
from lggseg.io import write_json
from lggseg.runtime import (
    DistInfo,
    _barrier,
    init_distributed,
)
from lggseg.training.checkpoint import (
    RESULT_FILE,
    Checkpoint,
    _store_fingerprint,
    run_fingerprint,
    seed_everything,
)
from lggseg.training.records import _Logger
from lggseg.training.step import StepSetup, applied, step_setup
from lggseg.training.trainer import _Trainer

log = logging.getLogger(__name__)


def resume_point(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool, info: DistInfo,
                 setup: StepSetup) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """``(fingerprint, stored result, checkpoint state)`` of one seed's run in ``out_dir``.

    A stored result of the same fingerprint means the run is done (returned as is); otherwise the
    committed checkpoint to continue from, if any, and a stale checkpoint or result is removed.
    """
    fingerprint = run_fingerprint(run, seed, _store_fingerprint(store_dir), info.device.type, setup.bf16)
    ckpt = Checkpoint(out_dir)
    result_path = out_dir / RESULT_FILE
    if resume and result_path.is_file() and (out_dir / "model.safetensors").is_file():
        stored = json.loads(result_path.read_text())
        if stored.get("fingerprint") == fingerprint:
            _barrier(info)
            if info.is_main:
                ckpt.remove()  # left behind if the previous run died right after result.json
            return fingerprint, stored, None
    state = ckpt.load(fingerprint) if resume else None
    _barrier(info)  # every rank has read the checkpoint before rank 0 may delete it
    if info.is_main and state is None:
        ckpt.remove()
        result_path.unlink(missing_ok=True)
    return fingerprint, None, state


class Session:
    """One seed's training from its first epoch (or checkpoint) to ``result.json``, in the pieces that
    :func:`train_variant` runs one after another and :func:`lggseg.training.concurrent.train_variants` interleaves.

    Create it under :func:`applied` of its ``setup``; it seeds every random stream itself.
    ``progress=False`` replaces the progress bars by one log line per epoch (several sessions at once).
    """

    def __init__(self, run: RunConfig, store_dir: Path, out_dir: Path, seed: int, info: DistInfo, setup: StepSetup,
                 fingerprint: str, state: dict[str, Any] | None, *, store: Any = None,
                 shared: dict[tuple, Any] | None = None, progress: bool = True) -> None:
        self.info, self.out_dir, self.progress = info, out_dir, progress
        seed_everything(seed + info.rank)
        self.trainer = trainer = _Trainer(run, store_dir, out_dir, seed, info, fingerprint, setup, store=store,
                                          shared=shared, progress=progress)
        if state is not None:
            trainer.restore(state)
        params = {"variant": run.variant, "seed": seed, "encoder": run.model.encoder, "image_size": run.common.image_size,
                  "epochs": run.train.epochs, "batch_size": run.train.batch_size, "lr": run.train.lr,
                  "world_size": info.world_size, "device": info.device.type}
        self.ckpt = Checkpoint(out_dir)
        self.live = _Logger(out_dir, info.is_main, params, trainer.history)
        self.bar = tqdm(desc=trainer.label, unit="epoch", initial=trainer.epoch, total=trainer.planned_epochs,
                        disable=not (info.is_main and progress))

    @property
    def done(self) -> bool:
        return self.trainer.epoch >= self.trainer.planned_epochs

    def run_epoch(self) -> None:
        """The next epoch, uninterrupted."""
        self.trainer.run_epoch(self.trainer.epoch, self.ckpt, self.live)
        self._epoch_done()

    def steps(self) -> Iterator[None]:
        """Every remaining epoch as a generator that yields after each training step."""
        while not self.done:
            yield from self.trainer.epoch_steps(self.trainer.epoch, self.ckpt, self.live)
            self._epoch_done()

    def _epoch_done(self) -> None:
        t = self.trainer
        self.bar.total = t.planned_epochs
        self.bar.update(1)
        self.bar.set_postfix(val_dice=f"{t.history[-1]['val/dice']:.4f}", best=f"{t.best_dice:.4f}")
        if not self.progress and self.info.is_main:
            log.info("%s: epoch %d/%d val/dice %.4f (best %.4f)", t.label, t.epoch, t.planned_epochs,
                     t.history[-1]["val/dice"], t.best_dice)

    def finish(self) -> dict[str, Any]:
        """Keep the best weights, write the model and ``result.json``, drop the checkpoint; the result."""
        trainer, info = self.trainer, self.info
        self.bar.close()
        if trainer.stop_reason != "completed" and info.is_main:
            log.warning("%s: %s", trainer.label, trainer.stop_reason)
        trainer.select_last_if_none()
        result = trainer.result()
        if info.is_main:
            trainer.save_best(result)
            write_json(self.out_dir / RESULT_FILE, result)  # the completion marker, after the model
            self.ckpt.remove()
            self.live.end()
        _barrier(info)
        return result


def train_variant(run: RunConfig, store_dir: Path, out_dir: Path, seed: int, resume: bool = True) -> dict[str, Any]:
    """Train seed ``seed`` of ``run`` on the manifest store ``store_dir`` into ``out_dir``.

    Returns the result also written to ``out_dir/result.json`` (best epoch and val Dice, the
    per-epoch history, timings). With ``resume`` a finished run is returned as stored and an
    interrupted one continues from its last checkpoint; without, training starts over.
    """
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    info = init_distributed(run.common.device)
    setup = step_setup(run.train, info.device)
    fingerprint, stored, state = resume_point(run, store_dir, out_dir, seed, resume, info, setup)
    if stored is not None:
        return stored
    with applied(setup, info.device):
        session = Session(run, store_dir, out_dir, seed, info, setup, fingerprint, state)
        del state
        while not session.done:
            session.run_epoch()
        return session.finish()


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
