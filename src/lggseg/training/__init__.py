"""The training layer (stage ``train@<variant>``): one variant's seeds from the store to ``models/<variant>``.

Reading order: :func:`lggseg.training.session.train_all_seeds` -> ``train_variant`` -> ``Session``
-> ``_Trainer.epoch_steps`` -> ``train_step`` (the one optimisation step, shared with the benchmark
and preflight); :mod:`~lggseg.training.concurrent` interleaves several runs in one process. Imports
:mod:`lggseg.models`, :mod:`lggseg.losses`, :mod:`lggseg.data` and below, never evaluation.
"""
