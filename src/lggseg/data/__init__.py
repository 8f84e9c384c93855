"""The data layer (stages ``fetch`` and ``manifest``, and what training reads): raw LGG data to tensors.

Reading order: :mod:`~lggseg.data.fetch` (a source -> ``data/raw/kaggle_3m``, its fingerprint; zip
safety in :mod:`~lggseg.data.archive`, the synthetic demo cases in :mod:`~lggseg.data.synthetic`) ->
:mod:`~lggseg.data.manifest` (the Kaggle layout checked and decoded once into the slice store) ->
:mod:`~lggseg.data.dataset` (``SliceDataset``, augmentation) and :mod:`~lggseg.data.resident`
(the same batches held on the GPU). Imports only :mod:`lggseg.config`, :mod:`lggseg.errors`,
:mod:`lggseg.io`.
"""
