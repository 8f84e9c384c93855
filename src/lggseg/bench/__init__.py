"""``lggseg bench`` (the ``bench`` stage): training, loss, data-loading and inference throughput on this device.

:mod:`~lggseg.bench.run` times the step training runs (:func:`lggseg.training.step.train_step`) and
writes ``metrics/bench.json``; :mod:`~lggseg.bench.paths` compares the data paths and concurrent training.
"""
