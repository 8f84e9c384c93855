"""The training layer (stage ``train@<variant>``): one variant's seeds from the store to ``models/<variant>``.

From the stage to the optimiser in five calls: ``stages/train.py`` ``main`` -> :func:`train_all_seeds`
-> :func:`train_variant` -> :meth:`Trainer.fit` -> :meth:`Trainer.step` ->
:func:`~lggseg.training.step.train_step` -> ``optimizer.step()``.

Modules: :mod:`~lggseg.training.trainer` (the loop, :class:`Trainer`, and the two entry points),
:mod:`~lggseg.training.step` (the one optimisation step and its switches, shared with the benchmark
and preflight), :mod:`~lggseg.training.batches` (DataLoader or device-resident batches),
:mod:`~lggseg.training.checkpoint` (run identity, :class:`~lggseg.training.checkpoint.TrainState`
and its checkpoint, where a run starts), :mod:`~lggseg.training.records` (per-epoch logs) and
:mod:`~lggseg.training.concurrent` (several runs in one process, their steps taken in turns:
:func:`train_variants`). Imports :mod:`lggseg.models`, :mod:`lggseg.losses`, :mod:`lggseg.data` and
below, never evaluation.
"""

from lggseg.training.concurrent import train_variants
from lggseg.training.trainer import Trainer, train_all_seeds, train_variant

__all__ = ["Trainer", "train_all_seeds", "train_variant", "train_variants"]
