"""``lggseg bench`` (the ``bench`` stage): training, loss, data-loading and inference throughput on this device.

:mod:`~lggseg.bench.run` times the step training runs (:func:`lggseg.training.step.train_step`) and
writes ``metrics/bench.json``, with the measurements of :mod:`~lggseg.bench.step` (step, losses and
inference on one fixed batch) and :mod:`~lggseg.bench.loader` (the DataLoader and the loop it feeds);
:mod:`~lggseg.bench.paths` compares the data paths and concurrent training; :mod:`~lggseg.bench.timing`
holds the parameters and the timers.
"""
