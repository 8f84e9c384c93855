"""The evaluation layer (stage ``evaluate@<variant>``): test metrics of a variant's models.

:mod:`~lggseg.evaluation.metrics` (pure numpy, explicit empty-mask rules), :mod:`~lggseg.evaluation.postprocess`
(small-component removal, largest 3D region) and :mod:`~lggseg.evaluation.evaluate` (store -> probabilities
through :mod:`lggseg.inference` -> per-slice rows -> ``metrics/<variant>.json``).
"""
