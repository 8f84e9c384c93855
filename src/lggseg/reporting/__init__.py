"""The reporting layer (stages ``report`` and ``figure9``): the paper's tables and figures from the metrics.

:mod:`~lggseg.reporting.report` (Tables 2-4 and the report stage), :mod:`~lggseg.reporting.plotting`
(figures), :mod:`~lggseg.reporting.folder` (a ``lggseg reproduce`` folder's files and report),
:mod:`~lggseg.reporting.compare` (``lggseg compare``), :mod:`~lggseg.reporting.outlier_study` (Figure 9),
:mod:`~lggseg.reporting.snapshot` (``results/<name>/``). Reads results; imports evaluation and below.
"""
